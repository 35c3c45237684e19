from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, computed_field

from modelpress.spec.labels import kinds


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
    # Task labels beyond class ids, a summary per kind (README "Labelled datasets"); None: none.
    labels: dict[str, Any] | None = None
    created_at: datetime

    @computed_field
    @property
    def label_kinds(self) -> list[str]:
        """The labels the dataset carries: "classes" (the `labels` array), "boxes", "masks",
        "sequences", "texts", "pairs"; empty when it is unlabelled."""
        return kinds(self.has_labels, self.labels)


class DatasetList(BaseModel):
    items: list[DatasetRead]
    next_cursor: str | None
