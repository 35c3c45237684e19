"""Weight-only quantization as ONNX graph rewrites: the weights of Conv, ConvTranspose, Gemm and
MatMul are stored in low-bit form and expanded back to float inside the graph, so the file is really
smaller and ONNX Runtime still runs it as it is. Activations stay float.

- uniform (`weight_only`): int8 or int4 initializer + scale -> DequantizeLinear, per output channel
  or in blocks of `block_size` along the input dimension (opset 21, which has int4 and blocks).
- codebook (k-means, 2..8 bits): indices (uint4 up to 4 bits, else uint8) -> DequantizeLinear
  (scale 1) -> Cast(int64) -> Gather(codebook). ONNX Runtime's MatMulNBits would cover only
  MatMul/Gather; this covers Conv as well.
"""

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

from worker.engine.quantize import qmath
from modelpress.spec.errors import EngineError

WEIGHT_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
TARGET_OPSET = 21


def output_axis(node: onnx.NodeProto, weight: np.ndarray) -> int:
    """The weight axis that indexes output channels (per-channel scales run along it)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
        return 0
    return weight.ndim - 1  # MatMul / Gemm: [K, N]


def _input_axis(node: onnx.NodeProto, weight: np.ndarray) -> int:
    """The weight axis summed over (blocks run along it)."""
    if node.op_type in ("Conv", "ConvTranspose"):
        return 1 if node.op_type == "Conv" else 0
    if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
        return 1
    return weight.ndim - 2


def _to_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if current >= opset:
        return model
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:
        raise EngineError("opset_conversion_failed", f"the model cannot be raised to opset {opset}: {exc}") from exc


def _candidates(model: onnx.ModelProto, exclude: list[str], keep_first_last: bool = False):
    """(node, weight initializer) pairs to rewrite, and (name, reason) of those left float."""
    compute = [n for n in model.graph.node if n.op_type in WEIGHT_OPS]
    ends = {id(compute[0]): "first compute layer", id(compute[-1]): "last compute layer"} if keep_first_last and len(compute) > 2 else {}
    initializers = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return [], [{"layer": node.name or node.output[0], "reason": "graphs with subgraphs (If/Loop) are left float"}]
    for value in model.graph.output:
        uses[value.name] = uses.get(value.name, 0) + 1
    chosen, skipped = [], []
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        label = node.name or node.output[0]
        tensor = initializers.get(node.input[1])
        if label in exclude or node.op_type in exclude:
            skipped.append({"layer": label, "reason": "excluded"})
        elif id(node) in ends:
            skipped.append({"layer": label, "reason": f"{ends[id(node)]} (keep_first_last)"})
        elif tensor is None or tensor.data_type != onnx.TensorProto.FLOAT or len(tensor.dims) < 2:
            skipped.append({"layer": label, "reason": "weight is not a float initializer"})
        elif uses.get(tensor.name, 0) > 1:
            skipped.append({"layer": label, "reason": "weight shared with other nodes"})
        else:
            chosen.append((node, tensor))
    return chosen, skipped


def _replace_weight(model: onnx.ModelProto, node: onnx.NodeProto, tensor: onnx.TensorProto,
                    new_initializers: list[onnx.TensorProto], new_nodes: list[onnx.NodeProto]) -> None:
    model.graph.initializer.remove(tensor)
    # Older exports also list weights as graph inputs; a leftover input would be required at run time.
    for value in [v for v in model.graph.input if v.name == tensor.name]:
        model.graph.input.remove(value)
    model.graph.initializer.extend(new_initializers)
    index = list(model.graph.node).index(node)
    for offset, extra in enumerate(new_nodes):
        model.graph.node.insert(index + offset, extra)
    node.input[1] = new_nodes[-1].output[0]


def weight_only(model_path: Path, output: Path, *, bits: int, block_size: int | None, symmetric: bool,
                exclude: list[str], keep_first_last: bool = False) -> dict:
    model = _to_opset(onnx.load(str(model_path)), TARGET_OPSET)
    chosen, skipped = _candidates(model, exclude, keep_first_last)
    low_bit = np.int8 if bits == 8 else ml_dtypes.int4
    layers = []
    for node, tensor in chosen:
        weight = numpy_helper.to_array(tensor).astype(np.float64)
        axis = output_axis(node, weight)
        group_axis, group = None, None
        if block_size is not None:
            group_axis = _input_axis(node, weight)
            if weight.shape[group_axis] % block_size:
                skipped.append({"layer": node.name or node.output[0],
                                "reason": f"input size {weight.shape[group_axis]} not a multiple of block_size {block_size}: per-channel instead"})
                group_axis = None
            else:
                group = block_size
        lo, hi = qmath.minmax(weight, group_axis if group else axis, group)
        params = (qmath.symmetric_qparams if symmetric else qmath.affine_qparams)(lo, hi, bits, signed=True)
        q = qmath.quantize(weight, params, group_axis if group else axis, group)
        name = tensor.name
        scale, zero_point = params.scale, params.zero_point
        if group:
            # DequantizeLinear's blocked scale has the weight's shape with the block axis divided.
            shape = list(weight.shape)
            shape[group_axis] //= group
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
            attributes = {"axis": group_axis, "block_size": group}
        else:
            scale, zero_point = scale.reshape(-1), zero_point.reshape(-1)
            attributes = {"axis": axis}
        initializers = [
            numpy_helper.from_array(q.astype(np.int8).astype(low_bit), f"{name}_q{bits}"),
            numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"),
            numpy_helper.from_array(zero_point.astype(np.int8).astype(low_bit), f"{name}_zero_point"),
        ]
        dequantize = helper.make_node("DequantizeLinear", [i.name for i in initializers], [f"{name}_dequantized"],
                                      name=f"{name}_DequantizeLinear", **attributes)
        _replace_weight(model, node, tensor, initializers, [dequantize])
        layers.append({"layer": node.name or node.output[0], "op": node.op_type, "weights": int(weight.size),
                       "granularity": f"block {group}" if group else "per channel"})
    onnx.save(model, str(output))
    return {"quantized_layers": layers, "float_layers": skipped}


def codebook(model_path: Path, output: Path, *, bits: int, exclude: list[str], keep_first_last: bool = False) -> dict:
    model = _to_opset(onnx.load(str(model_path)), TARGET_OPSET)
    chosen, skipped = _candidates(model, exclude, keep_first_last)
    index_type = ml_dtypes.uint4 if bits <= 4 else np.uint8
    layers = []
    for node, tensor in chosen:
        weight = numpy_helper.to_array(tensor)
        centroids, indices = qmath.kmeans_codebook(weight, bits)
        name = tensor.name
        initializers = [
            numpy_helper.from_array(indices.astype(np.uint8).astype(index_type), f"{name}_codes"),
            numpy_helper.from_array(np.array(1.0, np.float32), f"{name}_codes_scale"),
            numpy_helper.from_array(np.array(0, np.uint8).astype(index_type), f"{name}_codes_zero"),
            numpy_helper.from_array(centroids, f"{name}_codebook"),
        ]
        nodes = [
            helper.make_node("DequantizeLinear", [i.name for i in initializers[:3]], [f"{name}_codes_float"], name=f"{name}_codes_dq"),
            helper.make_node("Cast", [f"{name}_codes_float"], [f"{name}_codes_index"], name=f"{name}_codes_cast", to=onnx.TensorProto.INT64),
            helper.make_node("Gather", [f"{name}_codebook", f"{name}_codes_index"], [f"{name}_decoded"], name=f"{name}_codebook_gather"),
        ]
        _replace_weight(model, node, tensor, initializers, nodes)
        error = float(np.sqrt(np.mean((centroids[indices] - weight) ** 2)) / (np.sqrt(np.mean(weight**2)) or 1.0))
        layers.append({"layer": node.name or node.output[0], "op": node.op_type, "weights": int(weight.size),
                       "relative_rms_error": round(error, 5)})
    onnx.save(model, str(output))
    return {"quantized_layers": layers, "float_layers": skipped}
