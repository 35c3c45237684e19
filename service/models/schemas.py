from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.jobs.schemas import TASK_DESCRIPTION


class TensorSpec(BaseModel):
    name: str
    # None marks a dynamic dimension (e.g. the batch).
    shape: list[int | None] | None
    dtype: str


class ModelRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    format: str
    size_bytes: int
    sha256: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    details: dict[str, Any] = {}
    # The task given at upload, used by the model's jobs that give none; null: inferred per job.
    task: dict[str, Any] | None = None
    created_at: datetime


class ModelList(BaseModel):
    items: list[ModelRead]
    next_cursor: str | None


class ModelUpdate(BaseModel):
    """PATCH /v1/models/{id}: the model's task, checked as the upload's `task` field is; null
    clears it (its jobs then infer the task from the output shapes). Jobs already accepted keep
    the task they were accepted with."""
    model_config = ConfigDict(extra="forbid")

    # Required: a PATCH that names nothing to change is a client's mistake, not a no-op.
    task: dict[str, Any] | None = Field(json_schema_extra={"description": TASK_DESCRIPTION})
