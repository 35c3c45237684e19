"""How a dataset's images map onto a model's image input (pure shape logic, no arrays).

Used twice: by the API to refuse a job whose data cannot fit the model (422), and by the engine to
lay the arrays out before running the model.
"""

from dataclasses import dataclass

from modelpress.spec.errors import EngineError


@dataclass(frozen=True)
class InputLayout:
    """The model input seen as batch + (channels, height, width); `channels_last` for NHWC inputs."""

    channels: int | None
    height: int | None
    width: int | None
    channels_last: bool = False


def model_layout(shape: list[int | None] | None) -> InputLayout | None:
    """None when the model gives no shape (TorchScript): the dataset's own shape is taken then."""
    if shape is None:
        return None
    if len(shape) != 4:
        raise EngineError(
            "unsupported_model_input",
            f"the model's input has rank {len(shape)} ({shape}); image models with a 4-D input "
            "(N,C,H,W or N,H,W,C) are supported",
        )
    _, d1, d2, d3 = shape
    if d3 in (1, 3, 4) and d1 not in (1, 3, 4):
        return InputLayout(channels=d3, height=d1, width=d2, channels_last=True)
    return InputLayout(channels=d1, height=d2, width=d3)


def dataset_chw(shape: list[int], layout: str) -> tuple[int, int, int]:
    if layout == "NHW":
        return 1, shape[1], shape[2]
    if layout == "NHWC":
        return shape[3], shape[1], shape[2]
    return shape[1], shape[2], shape[3]


def check_fits(dataset_shape: list[int], dataset_layout: str, model_shape: list[int | None] | None, *, role: str, input_name: str = "input") -> None:
    target = model_layout(model_shape)
    if target is None:
        return
    channels, height, width = dataset_chw(dataset_shape, dataset_layout)
    for axis, have, want in (("C (channels)", channels, target.channels), ("H (height)", height, target.height), ("W (width)", width, target.width)):
        if want is not None and have != want:
            raise EngineError(
                "dataset_shape_mismatch",
                f"the {role} dataset's images have {axis} = {have}, but the model input '{input_name}' "
                f"(shape {model_shape}) expects {want}",
            )


def decoded_size(image_hw: tuple[int | None, int | None], preprocess: dict, target: InputLayout | None) -> tuple[int | None, int | None]:
    """The (height, width) decoded image files end with: crop, else an exact resize, else the
    model's fixed size (images are resized to it by default), else their own size."""
    if preprocess.get("center_crop"):
        return tuple(preprocess["center_crop"])
    resize = preprocess.get("resize")
    if isinstance(resize, (list, tuple)):
        return tuple(resize)
    if resize is None and target is not None and target.height and target.width:
        return target.height, target.width
    if isinstance(resize, int):
        height, width = image_hw
        if height and width:
            shorter = min(height, width)
            return round(height * resize / shorter), round(width * resize / shorter)
        return None, None
    return image_hw


def check_dataset_fits(dataset_shape: list[int | None], dataset_layout: str, preprocess: dict,
                       model_shape: list[int | None] | None, *, role: str, input_name: str = "input") -> None:
    """check_fits for any dataset: image files are decoded to the model's channels and size."""
    if dataset_layout != "files":
        check_fits(dataset_shape, preprocess.get("layout") or dataset_layout, model_shape, role=role, input_name=input_name)
        return
    target = model_layout(model_shape)
    height, width = decoded_size((dataset_shape[2], dataset_shape[3]), preprocess, target)
    if height is None and (target is None or target.height is None):
        raise EngineError("dataset_shape_mismatch",
                          f"the {role} dataset's images differ in size and the model input takes any size: "
                          "give a resize or center_crop in the dataset's preprocess spec")
    if target is None:
        return
    for axis, have, want in (("H (height)", height, target.height), ("W (width)", width, target.width)):
        if have is not None and want is not None and have != want:
            raise EngineError("dataset_shape_mismatch",
                              f"the {role} dataset's images are preprocessed to {axis} = {have}, but the model input "
                              f"'{input_name}' (shape {model_shape}) expects {want}")
