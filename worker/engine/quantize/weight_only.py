"""weight_only: int8 or int4 weights, per channel or in blocks, float compute (our graph rewrite, weights.py)."""

import onnx

from modelpress.spec.configs import WeightOnlyConfig
from worker.engine.quantize import weights
from worker.engine.registry import StepContext, StepResult


def weight_only(config: WeightOnlyConfig, ctx: StepContext, model: onnx.ModelProto) -> StepResult:
    ctx.progress("quantize weights", 0.1)
    output = ctx.workdir / "weight_only.onnx"
    report = weights.weight_only(ctx.model_path, output, bits=config.bits, block_size=config.block_size,
                                       symmetric=config.symmetric, exclude=config.exclude, keep_first_last=config.keep_first_last)
    return StepResult(output, metrics={"method": config.method, "bits": config.bits, **report})
