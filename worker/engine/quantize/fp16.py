"""fp16: ONNX Runtime's float16 converter, inputs/outputs kept fp32 by default."""

import onnx

from modelpress.spec.configs import Fp16Config
from modelpress.spec.errors import EngineError
from worker.engine.quantize.ops import excluded_nodes
from worker.engine.registry import StepContext, StepResult


def fp16(config: Fp16Config, ctx: StepContext, model: onnx.ModelProto) -> StepResult:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    ctx.progress("convert", 0.1)
    output = ctx.workdir / "fp16.onnx"
    # The user's op types add to ORT's own list of ops that must stay fp32 (NMS, TopK, RoiAlign...).
    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | {n.op_type for n in model.graph.node if n.op_type in config.exclude})
    try:
        converted = convert_float_to_float16(model, keep_io_types=config.keep_io_types,
                                             node_block_list=excluded_nodes(model, config.exclude) or None,
                                             op_block_list=block)
    except Exception as exc:
        raise EngineError("quantization_failed", f"the float16 conversion failed: {str(exc)[:1500]}") from exc
    onnx.save(converted, str(output))
    return StepResult(output, metrics={"method": config.method, "keep_io_types": config.keep_io_types})
