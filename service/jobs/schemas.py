from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class StepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = Field(min_length=1, max_length=64)
    params: dict[str, Any] = Field(default_factory=dict)


class DataSpec(BaseModel):
    """Dataset ids by role. Without `eval`, evaluation uses the calibration data."""

    model_config = ConfigDict(extra="forbid")

    calibration: str | None = None
    eval: str | None = None
    train: str | None = None


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_id: str = Field(min_length=1, max_length=64)
    steps: list[StepSpec] = Field(min_length=1, max_length=16)
    data: DataSpec = Field(default_factory=DataSpec)


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
