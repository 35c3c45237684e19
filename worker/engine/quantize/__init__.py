"""The `quantize` step: one file per scheme, each readable top to bottom.

static_int8.py, dynamic_int8.py, fp16.py (ONNX Runtime's tools), weight_only.py and codebook.py
(our own graph rewrites, weights.py), qat.py (training through training.fit, then the static_int8
export); guard.py wraps any of them in an accuracy promise, and repairs a static_int8 result that misses the
job's safety floor. This module picks the scheme's
function by config class and does what every scheme shares.
"""

import onnx

from modelpress.spec.configs import (
    CodebookConfig, DynamicInt8Config, Fp16Config, QatConfig, QuantizeStepConfig, StaticInt8Config, WeightOnlyConfig)
from modelpress.spec.errors import EngineError
from worker.engine.errors import GuardNotMet
from worker.engine.quantize.codebook import codebook
from worker.engine.quantize.dynamic_int8 import dynamic_int8
from worker.engine.quantize.fp16 import fp16
from worker.engine.quantize.guard import floor_repaired, guarded
from worker.engine.quantize.layers import per_layer_report
from worker.engine.quantize.ops import count_compute_nodes, is_quantized
from worker.engine.quantize.qat import qat
from worker.engine.quantize.static_int8 import static_int8
from worker.engine.quantize.weight_only import weight_only
from worker.engine.registry import StepContext, StepResult, register

__all__ = ["count_compute_nodes", "quantize"]

METHODS = {StaticInt8Config: static_int8, DynamicInt8Config: dynamic_int8, Fp16Config: fp16,
           WeightOnlyConfig: weight_only, CodebookConfig: codebook, QatConfig: qat}


@register(*METHODS)
def quantize(config: QuantizeStepConfig, ctx: StepContext) -> StepResult:
    model = onnx.load(str(ctx.model_path), load_external_data=False)
    if is_quantized(model):
        raise EngineError("already_quantized", "the model already holds quantized operators; it is not quantized again")
    method = METHODS[type(config)]
    def run(cfg: QuantizeStepConfig, sub_ctx: StepContext) -> StepResult:
        return method(cfg, sub_ctx, model)

    try:
        if config.guard is not None:
            result = guarded(config, ctx, run)
        elif isinstance(config, StaticInt8Config):
            result = floor_repaired(config, ctx, run)
        else:
            result = run(config, ctx)
    except GuardNotMet as exc:  # the best candidate is still stored and measured
        _add_layer_report(exc.result, ctx.model_path)
        raise
    return _add_layer_report(result, ctx.model_path)


def _add_layer_report(result: StepResult, float_model) -> StepResult:
    """The job's evaluation gets the per-layer SQNR against the model this step started from."""
    result.measure = lambda images: per_layer_report(float_model, result.model_path, images)
    return result
