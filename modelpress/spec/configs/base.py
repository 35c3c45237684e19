"""What every step config shares, and the table of step types with their version upgrades.

A step's `params` are a versioned dict. Version 2 is one config class per scheme (a discriminated
union on `method`); version 1 was one flat class per step type whose fields the method ignored
were accepted. A dict without `version` is read as version 1, so every body valid before version 2
stays valid; the dump of a parsed config is always the current version.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from modelpress.spec.errors import EngineError

CURRENT_VERSION = 2


class StepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    version: Literal[2] = CURRENT_VERSION
    # Steps that train run on the GPU queue when one is configured.
    uses_gpu: ClassVar[bool] = False

    def wants_gpu(self) -> bool:
        return self.uses_gpu

    def required_data(self) -> set[str]:
        """Dataset roles (calibration, train, eval) the step cannot run without."""
        return set()

    def required_labels(self) -> set[str]:
        """Dataset roles whose data must carry labels."""
        return set()

    def referenced_models(self) -> dict[str, str]:
        """Other uploaded models the step uses, by role (teacher, student)."""
        return {}


def _unchanged(params: dict) -> dict:
    return params


@dataclass(frozen=True)
class StepType:
    schema: TypeAdapter  # a StepConfig class, or a union of them discriminated on `method`
    default_method: str | None = None  # the scheme of a body that names none
    from_v1: Callable[[dict], dict] = _unchanged  # a version 1 dict as version 2


STEP_TYPES: dict[str, StepType] = {}


def register_step_type(name: str, schema: Any, *, default_method: str | None = None,
                       from_v1: Callable[[dict], dict] = _unchanged) -> None:
    STEP_TYPES[name] = StepType(TypeAdapter(schema), default_method, from_v1)


def register_config(step_type: str):
    """Register the config of a new step type (its handler registers with registry.register)."""

    def decorate(config_class: type[StepConfig]) -> type[StepConfig]:
        register_step_type(step_type, config_class)
        return config_class

    return decorate


def drop_ignored_v1_fields(params: dict, scheme: type[StepConfig] | None, legacy_fields: set[str],
                           rejected_when_given: set[str]) -> dict:
    """Version 1 accepted every field of its step type whatever the method and ignored those the
    method does not use; those are dropped. Fields whose misuse version 1 rejected
    (`rejected_when_given`) are kept when set, so the scheme rejects them still."""
    if scheme is None:  # an unknown method: the union reports it
        return params
    return {key: value for key, value in params.items()
            if key in scheme.model_fields or key not in legacy_fields
            or (key in rejected_when_given and value is not None)}


def validation_problems(exc: ValidationError, where: str) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or where}: {e['msg']}" for e in exc.errors())


def parse_step(step_type: str, params: dict) -> StepConfig:
    kind = STEP_TYPES.get(step_type)
    if kind is None:
        raise EngineError("unknown_step_type", f"unknown step type {step_type!r}; known: {sorted(STEP_TYPES)}")
    params = dict(params)
    version = params.pop("version", 1)
    if type(version) is not int or not 1 <= version <= CURRENT_VERSION:
        raise EngineError("unsupported_config_version",
                          f"{step_type} params: version {version!r} is not known; this server reads versions "
                          f"1 to {CURRENT_VERSION} (older ones are upgraded)")
    if kind.default_method is not None:
        params.setdefault("method", kind.default_method)
    try:
        if version == 1:
            params = kind.from_v1(params)
        return kind.schema.validate_python(params)
    except ValidationError as exc:
        raise EngineError("invalid_step_params", f"{step_type} params: {validation_problems(exc, 'params')}") from exc
    except ValueError as exc:
        raise EngineError("invalid_step_params", f"{step_type} params: {exc}") from exc

