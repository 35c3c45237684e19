"""Counts read off an ONNX graph: parameters (total and non-zero), sparsity and MACs.

Parameters are the weight and bias tensors the graph holds (initializers and Constant nodes),
quantized ones included; the scales and zero points of Quantize/DequantizeLinear are bookkeeping,
not parameters. MACs are counted per node from shapes inferred at batch 1.
"""

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


def _constant_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.t is not None:
                    tensors[node.output[0]] = attribute.t
    return tensors


def parameter_counts(model: onnx.ModelProto) -> dict:
    tensors = _constant_tensors(model)
    bookkeeping = {name for node in model.graph.node if node.op_type in QDQ_OPS for name in node.input[1:]}
    total = nonzero = 0
    for name, tensor in tensors.items():
        if name in bookkeeping or tensor.data_type not in _NUMERIC:
            continue
        array = numpy_helper.to_array(tensor)
        if array.size <= 1:
            continue  # scalars: shapes, epsilons, axes
        total += int(array.size)
        nonzero += int(np.count_nonzero(array))
    return {"parameters": total, "nonzero_parameters": nonzero,
            "sparsity": round(1.0 - nonzero / total, 6) if total else 0.0}


_NUMERIC = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16,
            onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT32, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


def with_input_shapes(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    """A copy whose graph inputs have the shapes given (by input name), and batch 1 where an input
    not given has a dynamic first dimension."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if value.name in (input_shapes or {}):
            del dims[:]
            for size in input_shapes[value.name]:
                dims.add().dim_value = int(size)
        elif dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    return model


def infer(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    """Shape inference on the model with those input shapes (batch 1 by default); raises when it fails."""
    return shape_inference.infer_shapes(with_input_shapes(model, input_shapes), data_prop=True)


def count_macs(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> int | None:
    """Multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul at batch 1 (or at the input
    shapes given, for dimensions the graph leaves dynamic); None if shapes cannot be inferred."""
    try:
        inferred = infer(model, input_shapes)
    except Exception:
        return None
    return macs_of(inferred)


def macs_of(inferred: onnx.ModelProto) -> int | None:
    """count_macs on a model whose shapes are already inferred."""
    shapes: dict[str, list[int]] = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    for tensor in _constant_tensors(inferred).values():
        shapes.setdefault(tensor.name, list(tensor.dims))
    # A DequantizeLinear output has its quantized input's shape.
    for node in inferred.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in shapes:
            shapes.setdefault(node.output[0], shapes[node.input[0]])
    for node in inferred.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    shapes.setdefault(node.output[0], list(attribute.t.dims))

    total = 0
    for node in inferred.graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if node.op_type in ("Conv", "ConvTranspose"):
            weight = shapes.get(node.input[1])
            if out is None or weight is None:
                return None
            if node.op_type == "Conv":  # weight [Cout, Cin/group, kH, kW]: each output sums Cin/group*kH*kW
                total += int(np.prod(out)) * int(np.prod(weight[1:]))
            else:  # weight [Cin, Cout/group, kH, kW]: each input spreads over Cout/group*kH*kW
                total += int(np.prod(shapes.get(node.input[0], [0]))) * int(np.prod(weight[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
            if out is None or a is None or b is None:
                return None
            transposed_a = node.op_type == "Gemm" and any(x.name == "transA" and x.i for x in node.attribute)
            k = a[-2] if transposed_a else a[-1]
            total += int(np.prod(out)) * int(k)
    return total


def graph_stats(path) -> dict:
    model = onnx.load(str(path))
    return {**parameter_counts(model), "macs": count_macs(model)}
