"""dynamic_int8: ONNX Runtime's dynamic quantizer (int8 weights, activations quantized at run time)."""

import onnx

from modelpress.spec.configs import DynamicInt8Config
from modelpress.spec.errors import EngineError
from worker.engine.quantize.ops import count_compute_nodes, excluded_nodes
from worker.engine.registry import StepContext, StepResult


def dynamic_int8(config: DynamicInt8Config, ctx: StepContext, model: onnx.ModelProto) -> StepResult:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ctx.progress("quantize", 0.1)
    output = ctx.workdir / "dynamic.onnx"
    try:
        quantize_dynamic(str(ctx.model_path), str(output), per_channel=config.per_channel,
                         weight_type={"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[config.weight_type],
                         nodes_to_exclude=excluded_nodes(model, config.exclude))
    except Exception as exc:
        raise EngineError("quantization_failed", f"ONNX Runtime could not quantize the model: {str(exc)[:1500]}") from exc
    ctx.progress("inspect", 0.9)
    return StepResult(output, metrics={"method": config.method, **count_compute_nodes(output, ctx.workdir)})
