"""codebook: k-means non-uniform weights, 2**bits levels per layer (our graph rewrite, weights.py)."""

import onnx

from modelpress.spec.configs import CodebookConfig
from worker.engine.quantize import weights
from worker.engine.registry import StepContext, StepResult


def codebook(config: CodebookConfig, ctx: StepContext, model: onnx.ModelProto) -> StepResult:
    ctx.progress("cluster weights", 0.1)
    output = ctx.workdir / "codebook.onnx"
    report = weights.codebook(ctx.model_path, output, bits=config.bits, exclude=config.exclude,
                                    keep_first_last=config.keep_first_last)
    return StepResult(output, metrics={"method": config.method, "bits": config.bits, **report})
