"""Per-tensor precision of a QDQ model, chosen after it is built: each quantized tensor stays int8,
moves to 16 bits (activations: uint16 Q/DQ from the same calibrated range, no new calibration) or
to float (activations: its Q/DQ pair becomes a Clip to the same range; weights: the float weight of the model
that was quantized replaces its DequantizeLinear).

A tensor is named by its key: an activation by the float tensor its QuantizeLinear reads (the
names of compute nodes' outputs survive `static_int8.compact`), a weight by `weight:<node>` (the
node that reads it; compute nodes keep their names). The same edit serves the sensitivity pass
(worker/engine/quantize/precision_rung.py) and static_int8's `tensor_precision` parameter, so
the model the rung measured is the model a replay of the recipe builds.
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

PRECISIONS = ("int16", "float")
WEIGHT_PREFIX = "weight:"
MS_DOMAIN = "com.microsoft"  # ONNX Runtime's Q/DQ, which take 16-bit types before opset 21
UINT16_MAX = 65535


INTEGER_RANGES = {onnx.TensorProto.INT8: (-128, 127), onnx.TensorProto.UINT8: (0, 255),
                  onnx.TensorProto.INT16: (-32768, 32767), onnx.TensorProto.UINT16: (0, UINT16_MAX)}


def _bits(zero_point) -> int | None:
    if zero_point is None:
        return None
    return 8 if zero_point.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) else 16


def quantized_from(workdir: Path, fallback: Path) -> Path:
    """The float model static_int8 quantized in `workdir` (equalized, else pre-processed), whose
    weights a weight moved to float takes."""
    return next((path for path in (workdir / "equalized.onnx", workdir / "prepared.onnx") if path.is_file()), fallback)


def _index(model: onnx.ModelProto) -> tuple[dict, dict, dict]:
    initializers = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return initializers, producers, consumers


def quantized_tensors(model: onnx.ModelProto) -> list[dict]:
    """Every tensor the QDQ model quantizes, in graph order: {"tensor": key, "kind", "op"} (the op
    that produces an activation, or that reads a weight). Biases (int32) are left out: their
    rounding is far below the activations' and weights'."""
    initializers, producers, consumers = _index(model)
    found, seen = [], set()
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in initializers and node.input[0] not in seen \
                and _bits(initializers.get(node.input[2])) == 8:  # a 16-bit one (wide_activations) is already up
            seen.add(node.input[0])
            producer = producers.get(node.input[0])
            found.append({"tensor": node.input[0], "kind": "activation", "op": producer.op_type if producer else "input"})
        elif node.op_type == "DequantizeLinear" and node.input[0] in initializers \
                and initializers[node.input[0]].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            for reader in consumers.get(node.output[0], []):
                if reader.name and reader.op_type not in ("QuantizeLinear", "DequantizeLinear") \
                        and f"{WEIGHT_PREFIX}{reader.name}" not in seen:
                    seen.add(f"{WEIGHT_PREFIX}{reader.name}")
                    found.append({"tensor": f"{WEIGHT_PREFIX}{reader.name}", "kind": "weight", "op": reader.op_type})
    return found


def float_weights(float_model: onnx.ModelProto, keys: list[str]) -> dict[str, np.ndarray]:
    """The float weight of each `weight:<node>` key, read from the model that was quantized (the
    same node names), by the input position its DequantizeLinear fed."""
    initializers = {t.name: t for t in float_model.graph.initializer}
    nodes = {node.name: node for node in float_model.graph.node if node.name}
    weights = {}
    for key in keys:
        node = nodes.get(key.removeprefix(WEIGHT_PREFIX))
        if node is not None and len(node.input) > 1 and node.input[1] in initializers:
            weights[key] = numpy_helper.to_array(initializers[node.input[1]])
    return weights


def set_precision(path: Path, choices: dict[str, str], float_model: Path) -> None:
    """`apply_precision` to the QDQ model file at `path`, in place; moved weights from `float_model`."""
    model = onnx.load(str(path))
    weights = float_weights(onnx.load(str(float_model)), [key for key in choices if key.startswith(WEIGHT_PREFIX)])
    onnx.save(apply_precision(model, choices, weights), str(path))


def apply_precision(model: onnx.ModelProto, choices: dict[str, str], weights: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """A copy of `model` with each chosen tensor at its precision ("int16" or "float"); a key the
    model does not quantize is ignored, as is a weight with no float value in `weights`."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    if not choices:
        return model
    initializers, producers, consumers = _index(model)
    removed: set[int] = set()
    added: list = []
    for key, precision in sorted(choices.items()):
        if key.startswith(WEIGHT_PREFIX):
            if precision == "float" and key in (weights or {}):
                _weight_to_float(model, key, weights[key], producers, added)
            continue
        for quantize in [n for n in consumers.get(key, []) if n.op_type == "QuantizeLinear"]:
            dequantizes = [n for n in consumers.get(quantize.output[0], []) if n.op_type == "DequantizeLinear"]
            if precision == "float":
                bounds = _clip_bounds(model, key, quantize, initializers)
                for dequantize in dequantizes:
                    removed.add(id(dequantize))
                    added.append(helper.make_node("Clip", [key, *bounds], [dequantize.output[0]], name=f"{dequantize.name}_float"))
                removed.add(id(quantize))
            elif precision == "int16":
                _to_uint16(model, key, quantize, dequantizes, initializers, added)
    kept = [node for node in model.graph.node if id(node) not in removed]
    del model.graph.node[:]
    model.graph.node.extend(_in_order(model, _live(model, kept + added)))
    _drop_unused_initializers(model)
    return model


def _weight_to_float(model, key: str, value: np.ndarray, producers: dict, added: list) -> None:
    node = next(n for n in model.graph.node if n.name == key.removeprefix(WEIGHT_PREFIX))
    for position, name in enumerate(node.input):
        producer = producers.get(name)
        if producer is not None and producer.op_type == "DequantizeLinear" and position == 1:
            float_name = f"{node.name}_float_weight"
            model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), float_name))
            node.input[position] = float_name


def _range(quantize, initializers: dict) -> tuple[np.ndarray, np.ndarray]:
    """What the 8-bit Q/DQ pair lets through: [(qmin - zp) * s, (qmax - zp) * s]. Kept by a tensor
    moved up: ONNX Runtime's quantizer drops a Relu or Clip before a Q/DQ pair whose range already
    clips as it did, so the range is part of the model's arithmetic."""
    scale = numpy_helper.to_array(initializers[quantize.input[1]]).astype(np.float64)
    zero_point = initializers[quantize.input[2]]
    zp = numpy_helper.to_array(zero_point).astype(np.float64)
    low, high = INTEGER_RANGES[zero_point.data_type]
    return (low - zp) * scale, (high - zp) * scale


def _clip_bounds(model, key: str, quantize, initializers: dict) -> tuple[str, str]:
    minimum, maximum = _range(quantize, initializers)
    names = (f"{key}_float_min", f"{key}_float_max")
    model.graph.initializer.extend([numpy_helper.from_array(np.array(minimum, np.float32).reshape(()), names[0]),
                                    numpy_helper.from_array(np.array(maximum, np.float32).reshape(()), names[1])])
    return names


def _to_uint16(model, key: str, quantize, dequantizes: list, initializers: dict, added: list) -> None:
    """The 8-bit range spread over 0..65535."""
    minimum, maximum = _range(quantize, initializers)
    scale16 = np.maximum((maximum - minimum) / UINT16_MAX, 1e-12)
    zp16 = np.clip(np.round(-minimum / scale16), 0, UINT16_MAX)
    names = (f"{key}_scale16", f"{key}_zero16")
    model.graph.initializer.extend([numpy_helper.from_array(scale16.astype(np.float32), names[0]),
                                    numpy_helper.from_array(zp16.astype(np.uint16), names[1])])
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    for node in [quantize, *dequantizes]:
        node.input[1], node.input[2] = names
        if opset < 21:
            node.domain = MS_DOMAIN
    if opset < 21 and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _in_order(model: onnx.ModelProto, nodes: list) -> list:
    """Topological order (an Identity added at the end must come before its readers)."""
    ready = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    ordered, pending = [], list(nodes)
    while pending:
        progressed = [n for n in pending if all(name in ready for name in n.input)]
        if not progressed:  # a cycle or a dangling input: leave the rest as they were
            return ordered + pending
        for node in progressed:
            ordered.append(node)
            ready.update(node.output)
        done = {id(n) for n in progressed}
        pending = [n for n in pending if id(n) not in done]
    return ordered


def _live(model: onnx.ModelProto, nodes: list) -> list:
    """The nodes something still reads (a weight's DequantizeLinear is dead once it went float)."""
    needed = {o.name for o in model.graph.output}
    live: list = []
    for node in reversed(_in_order(model, nodes)):
        if any(out in needed for out in node.output):
            live.append(node)
            needed.update(node.input)
    return live[::-1]


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
