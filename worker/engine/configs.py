"""Typed, versioned configs of every step type. A step's `params` in a job become one of these.

The API validates with them before a job is accepted, the runner hands them to the step's handler,
and `model_dump()` gives the step with every default filled in (what a recipe records).
"""

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker.engine.errors import EngineError


class StepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    # Steps that train run on the GPU queue when one is configured.
    uses_gpu: ClassVar[bool] = False

    def required_data(self) -> set[str]:
        """Dataset roles (calibration, train, eval) the step cannot run without."""
        return set()


class QuantizeConfig(StepConfig):
    method: Literal["static_int8"] = "static_int8"
    per_channel: bool = True
    calibration: Literal["minmax", "percentile", "entropy"] = "minmax"
    percentile: float = Field(99.999, gt=90.0, le=100.0)
    # uint8 activations: measured on this class of CPU, signed activations left most convolutions
    # in fp32 between Q/DQ pairs (slower than fp32); unsigned ones ran every convolution in int8.
    activation_type: Literal["uint8", "int8"] = "uint8"
    weight_type: Literal["int8", "uint8"] = "int8"
    calibration_samples: int = Field(256, ge=1, le=10_000)

    def required_data(self) -> set[str]:
        return {"calibration"}


STEP_CONFIGS: dict[str, type[StepConfig]] = {"quantize": QuantizeConfig}


def register_config(step_type: str):
    """Register the config of a new step type (its handler registers with registry.register)."""

    def decorate(config_class: type[StepConfig]) -> type[StepConfig]:
        STEP_CONFIGS[step_type] = config_class
        return config_class

    return decorate


def parse_step(step_type: str, params: dict) -> StepConfig:
    config_class = STEP_CONFIGS.get(step_type)
    if config_class is None:
        raise EngineError("unknown_step_type", f"unknown step type {step_type!r}; known: {sorted(STEP_CONFIGS)}")
    try:
        return config_class.model_validate(params)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}" for e in exc.errors())
        raise EngineError("invalid_step_params", f"{step_type} params: {problems}") from exc
