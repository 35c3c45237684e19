"""Empirical bias correction (Nagel et al., "Data-Free Quantization", 2019; NNCF's fast and full
bias correction): quantized weights shift each output channel's mean, and ReLU networks pass the
shift on. Measured on calibration images, the float model's mean output per channel minus the
quantized model's is folded into the layer's int32 bias, so the channel's mean is right again.

`fast`: every layer's shift from one run of both models (the shifts of earlier layers are not yet
corrected when later ones are measured). `sequential`: layer by layer in graph order, the quantized
model run again after each correction (one run per layer: bounded by MAX_SEQUENTIAL_LAYERS, the
rest corrected in one last pass).

Works on the QDQ model as static_int8 writes it: compute nodes keep their names and output
tensors, and a layer's bias is an int32 initializer behind a DequantizeLinear with scale
s_input * s_weight, so a float shift d becomes round(d / scale) in the stored integers."""

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from worker.engine import stoppable
from worker.engine.evaluate import fixed_batch, open_session

SAMPLES = 64
MAX_SEQUENTIAL_LAYERS = 64
_LAYERS = ("Conv", "Gemm")


def correct_biases(float_path: Path, quantized_path: Path, images: np.ndarray, mode: str, workdir: Path) -> dict:
    """Rewrite `quantized_path` with corrected biases; report how many layers were corrected and the
    mean absolute channel-mean shift before and after (over every corrected layer)."""
    images = images[:SAMPLES]
    model = onnx.load(str(quantized_path))
    layers = _correctable(model)
    if not layers:
        return {"mode": mode, "layers": 0}
    names = [node.output[0] for node, _ in layers]
    # The float model's layer of the same name (the quantizer keeps node names; it may rename a
    # layer's output, the one that was a graph output).
    float_model = onnx.load(str(float_path))
    float_output = {node.name: node.output[0] for node in float_model.graph.node if node.name}
    missing = [node.name for node, _ in layers if node.name not in float_output]
    if missing:
        return {"mode": mode, "layers": 0, "skipped": f"layers not in the float model: {missing[:5]}"}
    float_means = _channel_means_of(float_model, [float_output[node.name] for node, _ in layers], images, workdir,
                                    "bias-float.onnx")
    reference = {name: float_means[float_output[node.name]] for (node, _), name in zip(layers, names, strict=True)}
    before = _channel_means_of(model, names, images, workdir)
    if mode == "fast":
        for (node, bias), name in zip(layers, names, strict=True):
            _shift(bias, reference[name] - before[name])
    else:
        sequential = layers[:MAX_SEQUENTIAL_LAYERS]
        current = before
        for (node, bias), name in zip(sequential, names, strict=False):
            stoppable.check()
            _shift(bias, reference[name] - current[name])
            current = _channel_means_of(model, names, images, workdir)
        for (node, bias), name in zip(layers[len(sequential):], names[len(sequential):], strict=True):
            _shift(bias, reference[name] - current[name])
    after = _channel_means_of(model, names, images, workdir)
    onnx.save(model, str(quantized_path))

    def mean_shift(means):
        return round(float(np.mean([np.abs(reference[n] - means[n]).mean() for n in names])), 6)

    return {"mode": mode, "layers": len(layers), "mean_shift_before": mean_shift(before), "mean_shift_after": mean_shift(after)}


class _Bias:
    """A layer's int32 bias behind its DequantizeLinear, and the scale that maps it to floats."""

    def __init__(self, tensor: onnx.TensorProto, scale: np.ndarray):
        self.tensor, self.scale = tensor, scale


def _correctable(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, _Bias]]:
    initializers = {t.name: t for t in model.graph.initializer}
    dequantized = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    layers = []
    for node in model.graph.node:
        if node.op_type not in _LAYERS or len(node.input) < 3 or node.input[2] not in dequantized:
            continue
        dq = dequantized[node.input[2]]
        tensor, scale = initializers.get(dq.input[0]), initializers.get(dq.input[1])
        if tensor is None or scale is None or tensor.data_type != onnx.TensorProto.INT32:
            continue
        layers.append((node, _Bias(tensor, numpy_helper.to_array(scale).astype(np.float64))))
    return layers


def _shift(bias: _Bias, delta: np.ndarray) -> None:
    values = numpy_helper.to_array(bias.tensor).astype(np.int64)
    moved = values + np.round(delta.astype(np.float64) / bias.scale).astype(np.int64)
    bounds = np.iinfo(np.int32)
    bias.tensor.CopyFrom(numpy_helper.from_array(np.clip(moved, bounds.min, bounds.max).astype(np.int32), bias.tensor.name))


def _channel_means_of(model: onnx.ModelProto, names: list[str], images: np.ndarray, workdir: Path,
                      file_name: str = "bias-quantized.onnx") -> dict[str, np.ndarray]:
    """Mean of each named tensor per channel (axis 1) over the images, read by exposing the tensors
    as outputs of a copy of the model."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    for name in names:
        if name not in present:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    path = workdir / file_name
    onnx.save(probe, str(path))
    session = open_session(path, threads=1)
    input_name, output_names = session.get_inputs()[0].name, [o.name for o in session.get_outputs()]
    batch = fixed_batch(session) or len(images)  # a fixed-batch model takes whole batches only
    sums: dict[str, np.ndarray] = {}
    runs = 0
    for start in range(0, len(images) - batch + 1, batch):
        values = dict(zip(output_names, stoppable.run(session, {input_name: images[start:start + batch]}), strict=True))
        for name in names:
            mean = values[name].mean(axis=tuple(i for i in range(values[name].ndim) if i != 1))
            sums[name] = sums.get(name, 0) + mean
        runs += 1
    return {name: sums[name] / runs for name in names}
