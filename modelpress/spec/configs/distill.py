"""Config of the `distill` step (one scheme; its version 2 is version 1 unchanged)."""

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from modelpress.spec.configs.base import StepConfig, register_step_type
from modelpress.spec.configs.training import Seed, TrainingSpec


class FromTeacher(BaseModel):
    """A student made from the teacher: a structurally pruned copy (channels, l2, `round_to`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prune_channels: float = Field(gt=0.0, lt=1.0)
    round_to: int = Field(8, ge=1, le=256)


class DistillConfig(StepConfig, TrainingSpec):
    """Knowledge distillation: the student learns from the teacher's outputs (and the labels).

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T)),
    plus `feature_weight` * MSE on `feature_pairs` ([teacher tensor, student tensor], through a
    learned 1x1 adapter). Epochs, lr, batch size, optimizer and schedule: `TrainingSpec` (5 epochs,
    cosine). Teacher: `teacher_model_id`, default the job's original model. Student:
    `student_model_id`, or `from_teacher`, default the previous step's output (the job's model for
    a first step).
    """

    uses_gpu: ClassVar[bool] = True

    teacher_model_id: str | None = Field(None, max_length=64)
    student_model_id: str | None = Field(None, max_length=64)
    from_teacher: FromTeacher | None = None
    temperature: float = Field(4.0, gt=0.0, le=100.0)
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    augment: list[Literal["flip", "crop", "noise"]] = Field(default_factory=list, max_length=3)
    patience: int | None = Field(None, ge=1, le=1000)  # early stopping on the eval split, in epochs
    feature_pairs: list[tuple[str, str]] = Field(default_factory=list, max_length=16)
    feature_weight: float = Field(1.0, ge=0.0, le=1000.0)
    seed: Seed = 0

    @model_validator(mode="after")
    def _one_student(self) -> "DistillConfig":
        if self.student_model_id is not None and self.from_teacher is not None:
            raise ValueError("give student_model_id or from_teacher, not both")
        return self

    def required_data(self) -> set[str]:
        return {"train"}

    def required_labels(self) -> set[str]:
        return {"train"} if self.alpha > 0 else set()

    def referenced_models(self) -> dict[str, str]:
        return {role: model_id for role, model_id in (("teacher", self.teacher_model_id), ("student", self.student_model_id)) if model_id}


register_step_type("distill", DistillConfig)
