"""Per-layer view of a quantized model: how far each compute layer's output drifts from the float
model's (SQNR, in dB), so a user sees which layer hurts.

Quantizers keep the float model's tensor names for the outputs of the compute nodes (the Q/DQ
pairs are inserted around them), so both models can expose the same intermediate tensors as extra
outputs and run on the same images.
"""

from pathlib import Path

import numpy as np
import onnx

from worker.engine.evaluate import open_session

COMPUTE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
MAX_LAYERS = 200


def _expose(model: onnx.ModelProto, names: list[str], path: Path) -> Path:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(path))
    return path


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
    float_session = open_session(_expose(float_model, names, workdir / "layers-float.onnx"), threads=1)
    quant_session = open_session(_expose(quant_model, names, workdir / "layers-quant.onnx"), threads=1)
    feed_name = float_session.get_inputs()[0].name
    float_values = dict(zip([o.name for o in float_session.get_outputs()], float_session.run(None, {feed_name: images})))
    quant_values = dict(zip([o.name for o in quant_session.get_outputs()],
                            quant_session.run(None, {quant_session.get_inputs()[0].name: images})))
    report = []
    for layer, op_type, tensor in layers:
        value = sqnr_db(float_values[tensor], quant_values[tensor])
        report.append({"layer": layer, "op": op_type, "tensor": tensor,
                       "sqnr_db": None if value == float("inf") else round(value, 3)})
    return report
