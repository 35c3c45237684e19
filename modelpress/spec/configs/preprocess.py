"""How a dataset's images become model input (stored with the dataset, not a step)."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from modelpress.spec.configs.base import validation_problems
from modelpress.spec.errors import EngineError


class PreprocessSpec(BaseModel):
    """How a dataset's images become model input, stored with the dataset and applied the same way
    wherever it is used. Every field is optional; without one the defaults apply: uint8 pixels are
    divided by 255 (float arrays used as they are), decoded images take the model's channel count
    (1: grayscale, 3: RGB) and its spatial size when it is fixed."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    version: Literal[1] = 1
    # An int resizes the shorter side (keeping the aspect ratio); [h, w] resizes exactly. Image files only.
    resize: int | tuple[int, int] | None = None
    center_crop: tuple[int, int] | None = None  # [h, w], after resize. Image files only.
    channels: Literal["rgb", "bgr", "gray"] | None = None
    # Bounded so that preprocessed pixels stay far inside float32 (an extreme scale made inf inputs).
    scale: float | None = Field(None, ge=1e-6, le=1e6)  # multiplies pixel values; default 1/255 for uint8, 1 for float
    mean: list[Annotated[float, Field(ge=-1e6, le=1e6)]] | None = Field(None, min_length=1, max_length=4)  # subtracted after scaling
    std: list[Annotated[float, Field(ge=1e-6, le=1e6)]] | None = Field(None, min_length=1, max_length=4)  # divides after the mean
    layout: Literal["NCHW", "NHWC", "NHW"] | None = None  # of an .npz's images, when the guess is wrong

    @model_validator(mode="after")
    def _check(self) -> "PreprocessSpec":
        sizes = [self.resize] if isinstance(self.resize, int) else list(self.resize or ())
        sizes += list(self.center_crop or ())
        if any(not 1 <= size <= 4096 for size in sizes):
            raise ValueError("resize and center_crop sizes must be between 1 and 4096")
        if self.std is not None and any(value <= 0 for value in self.std):
            raise ValueError("std values must be positive")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError("mean and std need the same number of values")
        return self


def parse_preprocess(raw: dict | None) -> PreprocessSpec:
    try:
        return PreprocessSpec.model_validate(raw or {})
    except ValidationError as exc:
        raise EngineError("invalid_preprocess", f"preprocess: {validation_problems(exc, 'preprocess')}") from exc
