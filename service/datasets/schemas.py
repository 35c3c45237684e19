from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class DatasetRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    format: str
    size_bytes: int
    sha256: str
    count: int
    # Shape of the whole `images` array, the sample count first; for image files N,C,H,W with
    # None where the images differ.
    shape: list[int | None]
    dtype: str
    # How the images are laid out: NCHW, NHWC or NHW (single channel without a channel axis);
    # "files" for a zip of image files.
    layout: str
    has_labels: bool
    num_classes: int | None
    classes: list[str] | None = None
    preprocess: dict[str, Any] = {}
    created_at: datetime


class DatasetList(BaseModel):
    items: list[DatasetRead]
    next_cursor: str | None
