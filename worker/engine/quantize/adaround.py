"""AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", 2020;
AIMET's AdaRound): instead of rounding each weight to the nearest int8 level, learn per weight
whether to round up or down so that the layer's output on calibration inputs stays closest to the
float layer's. A soft rounding h(V) in [0, 1] is trained against the output error plus a
regulariser that pushes h to 0 or 1 (its exponent annealed from 20 to 2), then hardened.

Layer by layer in graph order on the QDQ model static_int8 writes (its weights are int8 behind a
DequantizeLinear with per-channel or per-tensor scales; compute nodes keep their names): each
layer's inputs are read from the quantized model with the earlier layers already rounded, its
target is the same-named layer of the float model. Bounded: ITERATIONS steps per layer on
SAMPLES images, at most MAX_LAYERS layers (Conv and Gemm); the rest keep nearest rounding."""

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from worker.engine import stoppable
from worker.engine.evaluate import fixed_batch, open_session
from worker.engine.onnx_torch import apply_layer

SAMPLES = 64
ITERATIONS = 300
MAX_LAYERS = 64
ELEMENTS = 2_000_000
REGULARISATION = 0.01
_ZETA, _GAMMA = 1.1, -0.1  # the stretched sigmoid of the paper: h reaches 0 and 1 exactly


def adaround(float_path: Path, quantized_path: Path, images: np.ndarray, workdir: Path, iterations: int = ITERATIONS,
             weight_range: tuple[int, int] = (-128, 127)) -> dict:
    """Rewrite the int8 weights of `quantized_path` with learned rounding; report per layer the
    output MSE with nearest rounding and with AdaRound (on the calibration images). `weight_range`:
    the integers the quantizer used (ONNX Runtime's reduce_range keeps weights in -64..64, so that
    CPUs without VNNI do not saturate their 16-bit sums): a learned rounding never leaves it."""
    images = images[:SAMPLES]
    model = onnx.load(str(quantized_path))
    float_model = onnx.load(str(float_path))
    float_nodes = {n.name: n for n in float_model.graph.node if n.name}
    float_weights = {t.name: numpy_helper.to_array(t) for t in float_model.graph.initializer}
    layers = [layer for node in model.graph.node if (layer := _Layer.of(node, model, float_nodes, float_weights))][:MAX_LAYERS]
    if not layers:
        return {"layers": 0}
    targets = _tensors(float_model, [float_nodes[layer.node.name].output[0] for layer in layers], images, workdir / "ada-float.onnx")
    report = []
    torch.manual_seed(0)
    for layer in layers:
        stoppable.check()
        [inputs] = _tensors(model, [layer.node.input[0]], images, workdir / "ada-quantized.onnx").values()
        target = targets[float_nodes[layer.node.name].output[0]]
        report.append(layer.learn(torch.from_numpy(inputs), torch.from_numpy(target), iterations, weight_range))
    onnx.save(model, str(quantized_path))
    before = float(np.mean([r["mse_nearest"] for r in report]))
    after = float(np.mean([r["mse_adaround"] for r in report]))
    return {"layers": len(report), "iterations": iterations, "weight_range": list(weight_range), "mean_mse_nearest": before, "mean_mse_adaround": after,
            "per_layer": report[:50]}


class _Layer:
    """A quantized Conv or Gemm: its int8 weight initializer, scale and zero point, and the float
    weight and bias it came from."""

    def __init__(self, node, weight, scale, zero_point, axis, float_weight, bias):
        self.node, self.weight, self.axis = node, weight, axis
        self.scale, self.zero_point = scale, zero_point
        self.float_weight, self.bias = float_weight, bias

    @classmethod
    def of(cls, node, model, float_nodes, float_weights) -> "_Layer | None":
        if node.op_type not in ("Conv", "Gemm") or node.name not in float_nodes:
            return None
        if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
            return None
        producers = {out: n for n in model.graph.node for out in n.output}
        initializers = {t.name: t for t in model.graph.initializer}
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in initializers:
            return None
        weight = initializers[dq.input[0]]
        if weight.data_type != onnx.TensorProto.INT8 or len(dq.input) < 3 or dq.input[2] not in initializers:
            return None
        float_node = float_nodes[node.name]
        if float_node.input[1] not in float_weights:
            return None
        float_weight = float_weights[float_node.input[1]].astype(np.float32)
        if float_weight.shape != tuple(weight.dims):
            return None
        bias = float_weights.get(float_node.input[2]) if len(float_node.input) > 2 and float_node.input[2] else None
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        return cls(node, weight, numpy_helper.to_array(initializers[dq.input[1]]).astype(np.float32),
                   numpy_helper.to_array(initializers[dq.input[2]]).astype(np.float32), axis, float_weight, bias)

    def _broadcast(self, values: np.ndarray) -> torch.Tensor:
        shape = [1] * self.float_weight.ndim
        if values.size > 1:
            shape[self.axis] = -1
        return torch.from_numpy(values.reshape(shape))

    def learn(self, inputs: torch.Tensor, target: torch.Tensor, iterations: int, weight_range: tuple[int, int]) -> dict:
        # Bound each step's cost on wide layers: as many images as fit in ELEMENTS input values.
        keep = max(1, min(len(inputs), ELEMENTS // max(1, inputs[0].numel())))
        inputs, target = inputs[:keep], target[:keep]
        scale, zero_point = self._broadcast(self.scale), self._broadcast(self.zero_point)
        weight = torch.from_numpy(self.float_weight)
        bias = None if self.bias is None else torch.from_numpy(self.bias.astype(np.float32))
        floor = torch.floor(weight / scale)
        low, high = weight_range[0] - zero_point, weight_range[1] - zero_point

        def dequantized(rounding):
            return torch.clamp(floor + rounding, low, high) * scale

        def output_mse(rounding):
            with torch.no_grad():
                return float(torch.mean((apply_layer(self.node, inputs, dequantized(rounding), bias) - target) ** 2))

        nearest = (weight / scale - floor >= 0.5).float()
        # Start where nearest rounding is: h(V) = the fractional part.
        rest = torch.clamp(weight / scale - floor, 0.01, 0.99)
        v = torch.nn.Parameter(-torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1))
        optimiser = torch.optim.Adam([v], lr=1e-2)
        for step in range(iterations):
            stoppable.check()  # a layer's iterations add up to seconds: stop between them
            h = torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)
            beta = 20 - (20 - 2) * step / max(1, iterations - 1)
            loss = torch.mean((apply_layer(self.node, inputs, dequantized(h), bias) - target) ** 2) + \
                REGULARISATION * torch.sum(1 - torch.abs(2 * h - 1) ** beta) / h.numel()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        learned = (torch.sigmoid(v.detach()) * (_ZETA - _GAMMA) + _GAMMA >= 0.5).float()
        mse_nearest, mse_learned = output_mse(nearest), output_mse(learned)
        # Never worse than nearest on the data it was learned on.
        chosen = learned if mse_learned < mse_nearest else nearest
        integers = torch.clamp(floor + chosen, low, high) + zero_point
        self.weight.CopyFrom(numpy_helper.from_array(integers.numpy().astype(np.int8), self.weight.name))
        return {"layer": self.node.name, "mse_nearest": mse_nearest, "mse_adaround": min(mse_learned, mse_nearest),
                "flipped": int((chosen != nearest).sum())}


def _tensors(model: onnx.ModelProto, names: list[str], images: np.ndarray, path: Path) -> dict[str, np.ndarray]:
    """The named tensors on the images, read by exposing them as outputs of a copy of the model."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in dict.fromkeys(names) if name not in present)
    onnx.save(probe, str(path))
    session = open_session(path, threads=1)
    batch = fixed_batch(session) or len(images)
    input_name, output_names = session.get_inputs()[0].name, [o.name for o in session.get_outputs()]
    chunks: dict[str, list] = {name: [] for name in names}
    for start in range(0, len(images) - batch + 1, batch):
        values = dict(zip(output_names, stoppable.run(session, {input_name: images[start:start + batch]}), strict=True))
        for name in names:
            chunks[name].append(values[name])
    return {name: np.concatenate(chunks[name]).astype(np.float32) for name in names}
