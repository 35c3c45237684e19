from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class StepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = Field(min_length=1, max_length=64)
    params: dict[str, Any] = Field(default_factory=dict)


class SplitSpec(BaseModel):
    """Split one dataset: `eval_fraction` of it (shuffled with `seed`) becomes the eval data, the
    rest the calibration and train data, for the roles the job does not name itself."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(min_length=1, max_length=64)
    eval_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    seed: int = 0


class DataSpec(BaseModel):
    """Dataset ids by role. Without `eval`, evaluation uses the calibration data."""

    model_config = ConfigDict(extra="forbid")

    calibration: str | None = None
    eval: str | None = None
    train: str | None = None
    split: SplitSpec | None = None


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_id: str = Field(min_length=1, max_length=64)
    steps: list[StepSpec] = Field(min_length=1, max_length=16)
    data: DataSpec = Field(default_factory=DataSpec)
    # What produced a recipe.json (library versions, source job); recorded, not acted on.
    provenance: dict[str, Any] | None = None


class JobErrorRead(BaseModel):
    code: str
    message: str


class ArtifactRead(BaseModel):
    name: str
    size_bytes: int
    sha256: str
    url: str


class JobRead(BaseModel):
    id: str
    model_id: str
    status: str
    stage: str
    progress: float
    steps: list[StepSpec]
    data: DataSpec
    queue: str
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: JobErrorRead | None
    metrics: dict[str, Any]
    artifacts: list[ArtifactRead]


class JobList(BaseModel):
    items: list[JobRead]
    next_cursor: str | None
