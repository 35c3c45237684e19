"""Which operators a quantized model holds, and which compute nodes ONNX Runtime runs in int8."""

from pathlib import Path

import onnx

from modelpress.spec.quantized import QUANTIZED_OPS, is_quantized  # noqa: F401  (re-exported)

INT8_COMPUTE_OPS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "QGemm", "DynamicQuantizeMatMul", "QLinearAdd", "QLinearGlobalAveragePool"}
FLOAT_COMPUTE_OPS = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "NhwcFusedConv"}


def count_compute_nodes(model_path: Path, workdir: Path) -> dict:
    """Op types of the compute-heavy nodes after ORT's own graph optimisation."""
    import onnxruntime as ort

    optimized = workdir / "ort-optimized.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(optimized)
    options.log_severity_level = 3
    ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    return {
        "int8_compute_nodes": sum(op in INT8_COMPUTE_OPS for op in ops),
        "float_compute_nodes": sum(op in FLOAT_COMPUTE_OPS for op in ops),
    }


def excluded_nodes(model: onnx.ModelProto, exclude: list[str]) -> list[str]:
    """Node names to leave float, from names, op types or output tensor names."""
    return [n.name for n in model.graph.node if n.name and (n.name in exclude or n.op_type in exclude or n.output[0] in exclude)]
