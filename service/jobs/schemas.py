from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel, model_validator

from modelpress.spec.floor import FloorSpec


TASK_DESCRIPTION = ('What the model is for: {"type": "classification" | "detection" | "segmentation" | "ctc" | '
                    '"embedding" | "keypoints" | "generic", ...} (modelpress/spec/configs/task.py), e.g. '
                    '{"type": "detection", "decoder": {"kind": "yolo", "layout": "channels_first"}}')


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
    seed: int = Field(0, ge=0, lt=2**32)  # numpy's shuffle takes a 32-bit seed


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
    # Either the steps, or a named preset (GET /v1/presets) that becomes them.
    steps: list[StepSpec] | None = Field(None, min_length=1, max_length=16)
    preset: str | None = Field(None, max_length=64)
    data: DataSpec = Field(default_factory=DataSpec)
    # What produced a recipe.json (library versions, source job); recorded, not acted on.
    provenance: dict[str, Any] | None = None
    # What the model is for (modelpress/spec/configs/task.py), which decides how its fidelity is
    # judged; without it the model's task from its upload, else one inferred from the output
    # shapes (JobRead.task shows the task given or taken from the model). A plain object here, parsed
    # when the job is accepted, so that a bad task answers its own code (`invalid_task`).
    task: dict[str, Any] | None = Field(None, json_schema_extra={"description": TASK_DESCRIPTION})
    # The safety floor on the task's fidelity: "default", "off", or bounds by metric name.
    floor: FloorSpec = "default"


    @model_validator(mode="after")
    def _steps_or_preset(self) -> "JobCreate":
        if (self.steps is None) == (self.preset is None):
            raise ValueError("give either steps or preset")
        return self

    @model_validator(mode="before")
    @classmethod
    def _no_control_characters(cls, data: Any) -> Any:
        # A job body is stored as JSON and its ids are looked up: NUL and other control characters
        # have no place in either (PostgreSQL refuses NUL outright).
        if _holds_control_characters(data):
            raise ValueError("strings in a job body must not hold control characters (NUL, newline, ...)")
        return data


def _holds_control_characters(value: Any, depth: int = 0) -> bool:
    if depth > 32:
        raise ValueError("the job body nests deeper than 32 levels")
    if isinstance(value, str):
        return any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)
    if isinstance(value, dict):
        return any(_holds_control_characters(k, depth + 1) or _holds_control_characters(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_control_characters(v, depth + 1) for v in value)
    return False


class PresetRead(BaseModel):
    name: str
    description: str
    needs: list[str]
    steps: list[StepSpec]


class JobErrorRead(BaseModel):
    code: str
    message: str


class ArtifactRead(BaseModel):
    name: str
    size_bytes: int
    sha256: str
    url: str


class JobHeadline(BaseModel):
    """The figures a list shows for a finished job, copied out of its metrics when it finishes."""

    size_ratio: float | None = None
    speedup_batch_1: float | None = None
    accuracy_drop: float | None = None
    compressed_size_bytes: int | None = None


class JobSummary(BaseModel):
    """One job in a list: what a dashboard or a poller needs, without metrics, steps or artifacts
    (those are on `GET /v1/jobs/{id}` and `GET /v1/jobs/{id}/metrics`)."""

    id: str
    model_id: str
    status: str
    stage: str
    progress: float
    preset: str | None = None
    queue: str
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: JobErrorRead | None
    headline: JobHeadline | None
    # The X-Request-ID of the request that created the job (sent or made up by the API), also in
    # the worker's log lines for the job.
    request_id: str | None = None


class JobRead(JobSummary):
    """A whole job: the summary's fields and the request, metrics and artifacts."""

    steps: list[StepSpec]
    data: DataSpec
    task: dict[str, Any] | None = None
    floor: FloorSpec = "default"
    metrics: dict[str, Any]
    artifacts: list[ArtifactRead]


class MetricsRead(RootModel[dict[str, Any]]):
    """A finished job's metrics.json (docs/METRICS.md)."""


class JobList(BaseModel):
    items: list[JobSummary]
    next_cursor: str | None


class JobFullList(BaseModel):
    """`GET /v1/jobs?view=full`: every job as `GET /v1/jobs/{id}` returns it."""

    items: list[JobRead]
    next_cursor: str | None
