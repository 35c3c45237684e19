"""Preflight: what the graph tells before the heavy work starts, read once, in well under a second.

- `float_ops`: compute ops ONNX Runtime's static quantizer leaves in float (not in its registries
  of quantizable ops): each costs a DequantizeLinear/QuantizeLinear pair around it in the int8 model.
- `unknown_ops`: ops outside the default ONNX domain (custom or vendor domains) no quantizer knows.
- `wide_joins`: Concat and Add nodes whose inputs' ranges differ by `WIDE_JOIN_RATIO` or more on a
  few of the job's images. The join's output shares one 8-bit scale: the narrow input is left a
  handful of levels (pixel boxes concatenated with 0..1 scores: every score becomes 0 or 2.5).
  `wide_activations` (static int8) quantizes such a tensor to 16 bits.
- `dynamic_dims` and `macs`: the input and output dimensions the graph leaves open, and the MACs
  at batch 1 with the data's shapes where a dimension is dynamic (the declared shape cannot count them).

Findings only: nothing here changes the model or the job. A failure is recorded (`{"error": ...}`,
for the whole or one finding) and never fails the job.
"""

import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

from worker.engine import graph_stats, stoppable
from worker.engine.errors import JobCancelled, JobSuperseded

# What quantize_static quantizes when no op types are named (its own default: the union of both).
QUANTIZABLE_OPS = frozenset(QLinearOpsRegistry) | frozenset(QDQRegistry)
DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16})
JOIN_OPS = frozenset({"Concat", "Add"})
CONTROL_FLOW_OPS = frozenset({"Loop", "Scan", "If"})
# Ops that move values without computing on them: a join reaching an output through them is what
# the user reads, quantization error and all.
PASS_THROUGH_OPS = frozenset({"Reshape", "Transpose", "Split", "Slice", "Squeeze", "Unsqueeze", "Flatten", "Identity",
                              "Concat", "Gather", "Expand"})
# An 8-bit scale spanning the wider input leaves the narrower one 255 / 50 ≈ 5 levels or fewer.
WIDE_JOIN_RATIO = 50.0
MAX_SAMPLES = 16  # images run through the float model, at most
# ... and no more of them than this many multiply-accumulates (about 0.2 s on one AMD EPYC core):
# the largest magnitudes settle within a few images, and preflight must stay well under a second.
MAX_RUN_MACS = 2_500_000_000
UNKNOWN_COST_SAMPLES = 4  # images run when the MACs cannot be counted
MAX_LISTED = 20  # entries per finding
MAX_NAMES = 5  # node names per op type


def preflight(model_path: Path, sample: np.ndarray | None) -> dict:
    """The findings on the ONNX model at `model_path`; `sample`: images as the model takes them
    (only the first MAX_SAMPLES are run), or None (no wide-join check, MACs at the declared shape)."""
    started = time.perf_counter()
    try:
        model = onnx.load(str(model_path))
        sample = None if sample is None else np.asarray(sample[:MAX_SAMPLES])
        inputs = _graph_inputs(model)
        shapes = _sample_shapes(inputs, sample)
        try:
            inferred = graph_stats.infer(model, shapes)
        except Exception:
            inferred = None  # the findings that need types or shapes say so; the rest stand
        macs = _guarded(lambda: _macs(inferred, shapes, inputs))
        result = {
            "float_ops": _guarded(lambda: float_ops(model, _types(inferred))),
            "unknown_ops": _guarded(lambda: unknown_ops(model)),
            "dynamic_dims": _guarded(lambda: dynamic_dims(model)),
            "macs": macs,
            "wide_joins": None if sample is None or len(inputs) != 1 else _guarded(
                lambda: wide_joins(model, inputs[0].name, sample[:_affordable(macs.get("batch_1"))])),
        }
    except (JobCancelled, JobSuperseded):
        raise
    except Exception as exc:
        result = {"error": _error(exc)}
    return {**result, "seconds": round(time.perf_counter() - started, 4)}


def preflight_summary(checks: dict) -> str:
    """One line for the job's log."""
    if "error" in checks:
        return f"not completed ({checks['error'][:200]})"

    def count(finding) -> str:
        return str(len(finding)) if isinstance(finding, list) else "?"

    joins = checks.get("wide_joins")
    joins = joins.get("joins") if isinstance(joins, dict) else None
    return (f"{count(joins)} wide join(s), {count(checks.get('float_ops'))} op type(s) left float, "
            f"{count(checks.get('unknown_ops'))} custom-domain op type(s), {count(checks.get('dynamic_dims'))} dynamic "
            f"dimension(s) ({checks['seconds']:.3f} s)")


def _affordable(macs_per_image: int | None) -> int:
    if macs_per_image is None:
        return UNKNOWN_COST_SAMPLES
    return max(1, min(MAX_SAMPLES, MAX_RUN_MACS // max(macs_per_image, 1)))


def _guarded(finding):
    try:
        return finding()
    except (JobCancelled, JobSuperseded):
        raise
    except Exception as exc:
        return {"error": _error(exc)}


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc)[:500]}"


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def _is_dynamic(dim) -> bool:
    return not dim.HasField("dim_value") or dim.dim_value <= 0


def _sample_shapes(inputs: list, sample: np.ndarray | None) -> dict[str, list[int]] | None:
    """The one input's shape at batch 1 from the data, when the graph leaves a non-batch dimension
    open (batch alone: graph_stats already counts at batch 1)."""
    if sample is None or len(inputs) != 1:
        return None
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) == sample.ndim and not any(_is_dynamic(d) for d in list(dims)[1:]):
        return None
    return {inputs[0].name: [1, *sample.shape[1:]]}


def _types(inferred: onnx.ModelProto | None) -> dict[str, int]:
    if inferred is None:
        return {}
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def _by_op(nodes: list[onnx.NodeProto], key) -> list[dict]:
    """Nodes grouped by `key(node)` (a dict of fields), most frequent first: count and the first few names."""
    groups: dict[tuple, dict] = {}
    for node in nodes:
        fields = key(node)
        group = groups.setdefault(tuple(fields.values()), {**fields, "count": 0, "nodes": []})
        group["count"] += 1
        if len(group["nodes"]) < MAX_NAMES:
            group["nodes"].append(node.name or node.output[0])
    return sorted(groups.values(), key=lambda group: -group["count"])[:MAX_LISTED]


def float_ops(model: onnx.ModelProto, types: dict[str, int]) -> list[dict]:
    """Default-domain nodes the static quantizer does not quantize that compute a float tensor from
    the model's input (a node on constants alone is folded away; one with an int output is
    shape arithmetic). A type not inferred counts as float: better listed than missed."""
    constants = {t.name for t in model.graph.initializer} | {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    left = [node for node in model.graph.node
            if node.domain in DEFAULT_DOMAINS and node.op_type not in QUANTIZABLE_OPS and node.op_type != "Constant"
            and node.output and types.get(node.output[0], onnx.TensorProto.FLOAT) in FLOAT_TYPES
            and any(name and name not in constants for name in node.input)]
    return _by_op(left, lambda n: {"op_type": n.op_type})


def unknown_ops(model: onnx.ModelProto) -> list[dict]:
    return _by_op([node for node in model.graph.node if node.domain not in DEFAULT_DOMAINS], lambda n: {"domain": n.domain, "op_type": n.op_type})


def dynamic_dims(model: onnx.ModelProto) -> list[dict]:
    """Every input and output dimension without a fixed size: where, and its name if it has one."""
    found = []
    for kind, values in (("input", _graph_inputs(model)), ("output", model.graph.output)):
        for value in values:
            for axis, dim in enumerate(value.type.tensor_type.shape.dim):
                if _is_dynamic(dim):
                    found.append({"kind": kind, "tensor": value.name, "axis": axis, "name": dim.dim_param or None})
    return found[:4 * MAX_LISTED]


def _macs(inferred: onnx.ModelProto | None, shapes: dict | None, inputs: list) -> dict:
    if shapes is not None:
        name, shape = next(iter(shapes.items()))
        source = "eval data"
    else:
        name = inputs[0].name if inputs else None
        shape = [d.dim_value if not _is_dynamic(d) else (1 if axis == 0 else None)
                 for axis, d in enumerate(inputs[0].type.tensor_type.shape.dim)] if inputs else None
        source = "declared shape"
    return {"batch_1": None if inferred is None else graph_stats.macs_of(inferred), "input": name, "input_shape": shape,
            "shape_from": source}


def _feeds_outputs(model: onnx.ModelProto, tensor: str) -> list[str]:
    """The model outputs `tensor` reaches through pass-through ops only."""
    consumers = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    outputs = {o.name for o in model.graph.output}
    reached, seen, frontier = [], {tensor}, [tensor]
    while frontier:
        current = frontier.pop()
        if current in outputs:
            reached.append(current)
        for node in consumers[current]:
            if node.op_type in PASS_THROUGH_OPS:
                for name in node.output:
                    if name not in seen:
                        seen.add(name)
                        frontier.append(name)
    return sorted(reached)


def _joins(model: onnx.ModelProto, constants: dict[str, np.ndarray]) -> list[onnx.NodeProto]:
    """Concats of two or more inputs; Adds of two computed tensors (an Add of a bias is no join)."""
    joins = []
    for node in model.graph.node:
        if node.domain not in DEFAULT_DOMAINS or node.op_type not in JOIN_OPS:
            continue
        inputs = [name for name in node.input if name]
        computed = [name for name in inputs if name not in constants]
        if len(inputs) >= 2 and (len(computed) >= 2 if node.op_type == "Add" else computed):
            joins.append(node)
    return joins


def wide_joins(model: onnx.ModelProto, input_name: str, sample: np.ndarray) -> dict:
    """One float run on the sample with every join's inputs fetched; the joins whose inputs' largest
    magnitudes differ by WIDE_JOIN_RATIO or more, widest first. A graph with control flow is not
    run: its cost is not known before it runs (a Loop's trip count is data), and preflight is fast."""
    flow = sorted({node.op_type for node in model.graph.node if node.op_type in CONTROL_FLOW_OPS})
    if flow:
        return {"joins": [], "checked": 0, "threshold": WIDE_JOIN_RATIO, "samples": 0,
                "skipped": f"the graph has control flow ({', '.join(flow)}): not run before the job"}
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    joins = _joins(model, constants)
    fetched = sorted({name for node in joins for name in node.input if name and name not in constants and name != input_name})
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in fetched if name not in present)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = 1, 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = dict(zip(fetched, stoppable.run(session, {input_name: sample}, fetched))) if fetched else {}
    values.update(constants)
    values[input_name] = sample
    found = []
    for node in joins:
        arrays = [(name, values.get(name)) for name in node.input if name]
        ranges = [(name, float(np.max(np.abs(a))) if a.size else 0.0) for name, a in arrays
                  if a is not None and np.issubdtype(a.dtype, np.floating)]
        spread = [peak for _, peak in ranges if peak > 0 and np.isfinite(peak)]  # an all-zero input has nothing to lose
        if len(spread) < 2 or max(spread) / min(spread) < WIDE_JOIN_RATIO:
            continue
        name = node.name or node.output[0]
        found.append({"node": name, "op_type": node.op_type, "ratio": round(max(spread) / min(spread), 1),
                      "inputs": [{"tensor": t, "max_abs": peak} for t, peak in ranges],
                      "feeds_outputs": _feeds_outputs(model, node.output[0]),
                      "hint": f'8-bit activations share one scale across this {node.op_type}: quantize with '
                              f'"wide_activations": ["{name}"] (16-bit) to keep its narrow input'})
    found.sort(key=lambda join: -join["ratio"])
    return {"joins": found[:MAX_LISTED], "checked": len(joins), "threshold": WIDE_JOIN_RATIO, "samples": len(sample)}
