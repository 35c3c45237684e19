"""Typed, versioned configs of every step type. A step's `params` in a job become one of these.

The API validates with them before a job is accepted, the runner hands them to the step's handler,
and `model_dump()` gives the step with every default filled in (what a recipe records). One module
per step type, one class per scheme; `base` holds the versioning and the table of step types.
"""

from modelpress.spec.configs.base import CURRENT_VERSION, STEP_TYPES, StepConfig, parse_step, register_config
from modelpress.spec.configs.distill import DistillConfig, FromTeacher
from modelpress.spec.configs.preprocess import PreprocessSpec, parse_preprocess
from modelpress.spec.configs.prune import (
    PRUNE_SCHEMES, ChannelPruneConfig, FinetuneSpec, MagnitudePruneConfig, NMPruneConfig, PruneConfig, PruneStepConfig)
from modelpress.spec.configs.quantize import (
    QUANTIZE_SCHEMES, CodebookConfig, DynamicInt8Config, Fp16Config, GuardSpec, Int8ExportFields, QatConfig, QuantizeConfig,
    QuantizeStepConfig, StaticInt8Config, WeightOnlyConfig)
from modelpress.spec.configs.training import TrainingSpec

__all__ = [
    "CURRENT_VERSION", "STEP_TYPES", "ChannelPruneConfig", "CodebookConfig", "DistillConfig", "DynamicInt8Config",
    "FinetuneSpec", "Fp16Config", "FromTeacher", "GuardSpec", "Int8ExportFields", "MagnitudePruneConfig", "NMPruneConfig", "PRUNE_SCHEMES",
    "PreprocessSpec", "PruneConfig", "PruneStepConfig", "QUANTIZE_SCHEMES", "QatConfig", "QuantizeConfig",
    "QuantizeStepConfig", "StaticInt8Config", "StepConfig", "TrainingSpec", "WeightOnlyConfig", "parse_preprocess", "parse_step",
    "register_config",
]
