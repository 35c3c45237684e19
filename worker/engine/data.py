"""Datasets as arrays the model takes: decoded, scaled and laid out like the model's input.

Default preprocessing (the common convention): uint8 pixels become float32 in [0, 1] (divided by
255, no mean/std); float images are used as they are.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker.engine.errors import EngineError
from worker.engine.shapes import check_fits, model_layout


@dataclass
class ImageSet:
    images: np.ndarray  # float32, laid out like the model input (batch first)
    labels: np.ndarray | None  # int64 class indices, or None for unlabelled data

    def __len__(self) -> int:
        return len(self.images)

    def head(self, n: int) -> "ImageSet":
        return ImageSet(self.images[:n], None if self.labels is None else self.labels[:n])


def load_npz(path: Path, *, layout: str, model_shape: list[int | None] | None, role: str, input_name: str = "input") -> ImageSet:
    try:
        with np.load(path, allow_pickle=False) as archive:
            images = archive["images"]
            labels = archive["labels"].astype(np.int64) if "labels" in archive.files else None
    except (OSError, ValueError, KeyError) as exc:
        raise EngineError("invalid_dataset", f"the {role} dataset cannot be read: {exc}") from exc
    check_fits(list(images.shape), layout, model_shape, role=role, input_name=input_name)

    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    else:
        images = images.astype(np.float32, copy=False)
    if layout == "NHW":
        images = images[:, None, :, :]
    elif layout == "NHWC":
        images = images.transpose(0, 3, 1, 2)
    target = model_layout(model_shape)
    if target is not None and target.channels_last:
        images = images.transpose(0, 2, 3, 1)
    return ImageSet(np.ascontiguousarray(images), labels)
