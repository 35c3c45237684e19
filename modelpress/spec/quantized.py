"""The one answer to "is this model already quantized?", for the API's inspection and every step.

No imports: the API uses it on the graphs it inspects without loading the engine.
"""

# Operators that only a quantized graph holds (QDQ pairs, integer compute, packed low-bit weights).
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                           "ConvInteger", "MatMulInteger", "MatMulNBits"})


def holds_quantized_ops(op_types) -> bool:
    return not QUANTIZED_OPS.isdisjoint(op_types)


def is_quantized(model) -> bool:
    """`model`: an onnx.ModelProto."""
    return holds_quantized_ops(node.op_type for node in model.graph.node)
