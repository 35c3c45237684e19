"""Per-layer view of a quantized model: how far each compute layer's output drifts from the float
model's (SQNR, in dB), so a user sees which layer hurts.

Quantizers keep the float model's tensor names for the outputs of the compute nodes (the Q/DQ
pairs are inserted around them), so both models can expose the same intermediate tensors as extra
outputs and run on the same images.
"""

from pathlib import Path

import numpy as np
import onnx

from worker.engine.evaluate import fixed_batch, open_session, run_outputs

COMPUTE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
MAX_LAYERS = 200


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor shape inference can type."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    return {name: t for name, t in types.items() if t}


def expose_outputs(model: onnx.ModelProto, names: list[str], path: Path, *, float_only: bool = True) -> Path:
    """A copy of the model that also outputs `names` (those of float type, by default: ORT refuses
    an output declared with the wrong type)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    types = tensor_types(model)
    existing = {o.name for o in model.graph.output}
    for name in names:
        elem_type = types.get(name)
        if name in existing or elem_type is None or (float_only and elem_type != onnx.TensorProto.FLOAT):
            continue
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
    onnx.save(model, str(path))
    return path


def quantized_layers(path: Path) -> set[str]:
    """Output tensors of the compute nodes whose weight reaches them through a DequantizeLinear or a
    codebook Gather: the layers that really are quantized."""
    model = onnx.load(str(path), load_external_data=False)
    producers = {out: node for node in model.graph.node for out in node.output}
    result = set()
    for node in model.graph.node:
        if node.op_type in COMPUTE_OPS and len(node.input) > 1:
            producer = producers.get(node.input[1])
            if producer is not None and producer.op_type in ("DequantizeLinear", "Gather"):
                result.add(node.output[0])
    return result


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    noise = float(np.sum((reference.astype(np.float64) - candidate.astype(np.float64)) ** 2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(max(signal, 1e-30) / noise)


def layer_sqnr(original: Path, quantized: Path, images: np.ndarray, workdir: Path) -> list[dict]:
    float_model = onnx.load(str(original))
    quant_model = onnx.load(str(quantized))
    quant_outputs = {out for node in quant_model.graph.node for out in node.output}
    layers = [(node.name or node.output[0], node.op_type, node.output[0]) for node in float_model.graph.node
              if node.op_type in COMPUTE_OPS and node.output[0] in quant_outputs][:MAX_LAYERS]
    if not layers:
        return []
    names = [tensor for _, _, tensor in layers]
    float_session = open_session(expose_outputs(float_model, names, workdir / "layers-float.onnx"), threads=1)
    quant_session = open_session(expose_outputs(quant_model, names, workdir / "layers-quant.onnx", float_only=False), threads=1)
    # run_outputs batches as the model needs (a fixed-batch model takes its own batch size).
    float_values = dict(zip([o.name for o in float_session.get_outputs()], run_outputs(float_session, images)))
    quant_values = dict(zip([o.name for o in quant_session.get_outputs()], run_outputs(quant_session, images)))
    report = []
    for layer, op_type, tensor in layers:
        if tensor not in float_values or tensor not in quant_values or float_values[tensor].shape != quant_values[tensor].shape:
            continue
        value = sqnr_db(float_values[tensor], quant_values[tensor].astype(np.float32))
        report.append({"layer": layer, "op": op_type, "tensor": tensor,
                       "sqnr_db": None if value == float("inf") else round(value, 3)})
    return report


def per_layer_report(float_model: Path, quantized: Path, images: np.ndarray) -> dict:
    """Per-layer error of quantization against `float_model`, the model the quantizing step started
    from (after a prune or distill step the job's original has other layer shapes)."""
    if not quantized_layers(quantized):
        return {}
    fixed = fixed_batch(open_session(quantized, 1))
    return {"layers": layer_sqnr(float_model, quantized, images[: max(fixed or 0, 64)], quantized.parent)}
