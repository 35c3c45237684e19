"""The `prune` step: magnitude (unstructured), n_m (semi-structured) and channels (structured),
each optionally followed by recovery fine-tuning, in one or more iterations.

- magnitude zeroes the smallest |w| of each Conv/Gemm/MatMul weight (per layer, or one threshold
  for all). Zeros alone neither shrink a dense file nor speed ONNX Runtime up, so the step also
  writes model.onnx.zst (a standard zstd frame: `zstd -d` gives model.onnx back) and reports both
  sizes; the latency is measured like any other, with no speed-up claimed.
- n_m keeps the n largest |w| of every m consecutive weights along the input dimension and checks
  every group afterwards. Layers whose input dimension is not a multiple of m are left and listed.
- channels removes whole channels (channel_graph decides which must go together), so the model is
  physically smaller and faster. Group widths are rounded to multiples of `round_to`: measured on
  the reference ResNet, odd widths ran slower in ONNX Runtime than the unpruned model.

Quality is measured three times on the eval data: before, right after pruning, after recovery.
"""

import math
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch.nn import functional as F

from worker.engine import channel_graph, train_norm
from modelpress.spec.configs import PRUNE_SCHEMES, ChannelPruneConfig, PruneStepConfig
from worker.engine.device import pick_device
from modelpress.spec.errors import EngineError
from worker.engine.formats import untie_weights
from worker.engine.evaluate import open_session, quality, run_outputs
from worker.engine.graph_stats import count_macs, graph_stats, parameter_counts
from worker.engine.onnx_torch import onnx_to_torch
from modelpress.spec.quantized import is_quantized
from worker.engine.registry import StepContext, StepResult, register
from worker.engine.training import TrainSpec, fit, trainable, write_back

PRUNABLE_OPS = {"Conv", "Gemm", "MatMul"}
ZSTD_LEVEL = 15
TAYLOR_SAMPLES = 512


@register(*PRUNE_SCHEMES)
def prune(config: PruneStepConfig, ctx: StepContext) -> StepResult:
    model = onnx.load(str(ctx.model_path))
    if is_quantized(model):
        raise EngineError("model_already_quantized", "pruning needs a float model: put the prune step before quantize")
    eval_data = ctx.data.get("eval")
    reference = run_outputs(open_session(ctx.model_path, 1), eval_data.head(2000).images) if eval_data is not None else None
    before = {**graph_stats(ctx.model_path), "quality": quality(ctx.model_path, eval_data, reference)}
    final_keep, found_ratio = _final_keep_counts(config, model, ctx) if config.method == "channels" else (None, None)
    untie_weights(model)  # each weight its own: pruned, masked and trained on its own
    untied = ctx.workdir / "untied.onnx"
    onnx.save(model, str(untied))

    # Where each convolution's kept channels sit in the original, and their statistics there:
    # recovery training starts every channel from its original scale (train_norm.attach), here
    # or, without fine-tuning, in a later distill step (the statistics travel beside the model).
    origin: dict[str, np.ndarray] = {}
    images = next((ctx.data[role].images for role in ("train", "calibration", "eval") if role in ctx.data), None)
    statistics = train_norm.output_statistics(untied, images, pick_device()) if images is not None else {}

    def targets() -> dict:
        return {name: (mean[origin[name]], std[origin[name]]) if name in origin else (mean, std)
                for name, (mean, std) in statistics.items()}

    current, iterations, masks, details = untied, [], None, {}
    for iteration in range(1, config.iterations + 1):
        share = (iteration - 1) / config.iterations
        ctx.progress(f"prune {iteration}/{config.iterations}", share)
        pruned = ctx.workdir / f"pruned-{iteration}.onnx"
        if config.method == "channels":
            kept, details = _prune_channels(config, current, pruned, final_keep, iteration, ctx)
            for name, indices in kept.items():
                origin[name] = origin[name][indices] if name in origin else indices
        elif config.method == "magnitude":
            # Cubic ramp (Zhu & Gupta): prune fast while there is redundancy, gently at the end.
            sparsity = config.sparsity * (1 - (1 - iteration / config.iterations) ** 3)
            masks, details = _prune_magnitude(config, current, pruned, sparsity)
        else:
            masks, details = _prune_n_m(config, current, pruned)
        record = {"iteration": iteration, **parameter_counts(onnx.load(str(pruned))),
                  "quality_after_pruning": quality(pruned, eval_data, reference)}
        current = pruned
        if config.finetune:
            tuned = ctx.workdir / f"tuned-{iteration}.onnx"
            record["finetune"] = _finetune(config, current, tuned, masks, targets(), ctx, share, 1 / config.iterations)
            current = tuned
            record["quality_after_recovery"] = quality(current, eval_data, reference)
        iterations.append(record)

    if not config.finetune and statistics:
        train_norm.save_targets(targets(), current)
    after = graph_stats(current)
    metrics = {
        "method": config.method,
        "parameters": [before["parameters"], after["parameters"]],
        "nonzero_parameters": [before["nonzero_parameters"], after["nonzero_parameters"]],
        "sparsity": after["sparsity"],
        "macs": [before["macs"], after["macs"]],
        "quality": {"before": before["quality"], "after_pruning": iterations[0]["quality_after_pruning"] if config.iterations == 1
                    else iterations[-1]["quality_after_pruning"],
                    "after_recovery": iterations[-1].get("quality_after_recovery")},
        "iterations": iterations,
        **details,
    }
    if found_ratio is not None:  # what a target_macs / target_params search decided: a recipe replays it
        metrics["ratio_found"] = found_ratio
    artifacts = {}
    if config.method in ("magnitude", "n_m"):
        compressed = ctx.workdir / "model.onnx.zst"
        _zstd(current, compressed)
        artifacts["model.onnx.zst"] = compressed
        metrics["size_bytes_dense"] = current.stat().st_size
        metrics["size_bytes_compressed"] = compressed.stat().st_size
        metrics["note"] = "zeros do not run faster in ONNX Runtime: the gain is the compressed file (model.onnx.zst)"
    ctx.progress("done", 1.0)
    stats = train_norm.statistics_path(current)
    outputs = {train_norm.STATISTICS_OUTPUT: stats} if stats.is_file() else {}
    return StepResult(current, metrics, artifacts, outputs=outputs)


# --- magnitude and n_m --------------------------------------------------------------------------

def _weights(model: onnx.ModelProto, config: PruneStepConfig, left: list) -> list[tuple[onnx.NodeProto, onnx.TensorProto]]:
    """The weights unstructured pruning works on. Depthwise/grouped convolutions (a handful of
    weights per channel) and layers under `min_weights` (the stem, squeeze-excite) hold little of
    the size and much of the accuracy: they are left, and listed."""
    inits = {t.name: t for t in model.graph.initializer}
    chosen = []
    for node in model.graph.node:
        if node.op_type not in PRUNABLE_OPS or node.name in config.exclude or node.op_type in config.exclude:
            continue
        tensor = inits.get(node.input[1]) if len(node.input) > 1 else None
        if tensor is None or tensor.data_type != onnx.TensorProto.FLOAT or len(tensor.dims) < 2:
            continue
        size = int(np.prod(tensor.dims))
        if node.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in node.attribute):
            left.append({"layer": node.name, "reason": "grouped or depthwise convolution"})
        elif size < config.min_weights:
            left.append({"layer": node.name, "reason": f"{size} weights, under min_weights={config.min_weights}"})
        else:
            chosen.append((node, tensor))
    return chosen


def _smallest(values: np.ndarray, count: int) -> np.ndarray:
    """A mask of the `count` smallest values (exactly that many; ties go to the lower index)."""
    mask = np.zeros(values.size, dtype=bool)
    if count > 0:
        mask[np.argsort(values.reshape(-1), kind="stable")[:count]] = True
    return mask.reshape(values.shape)


def _prune_magnitude(config: PruneStepConfig, source: Path, output: Path, sparsity: float):
    model = onnx.load(str(source))
    left = []
    layers = _weights(model, config, left)
    arrays = [numpy_helper.to_array(t) for _, t in layers]
    if config.scope == "global":
        everything = np.concatenate([np.abs(a).reshape(-1) for a in arrays]) if arrays else np.zeros(0)
        pruned_all = _smallest(everything, int(sparsity * everything.size))
        offsets = np.cumsum([0] + [a.size for a in arrays])
        zeroed = [pruned_all[offsets[i] : offsets[i + 1]].reshape(a.shape) for i, a in enumerate(arrays)]
    else:
        zeroed = [_smallest(np.abs(a), int(sparsity * a.size)) for a in arrays]
    masks, table = {}, []
    for (node, tensor), array, zero in zip(layers, arrays, zeroed):
        pruned = np.where(zero, np.float32(0), array).astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(pruned, tensor.name))
        masks[tensor.name] = ~zero
        table.append({"layer": node.name, "op_type": node.op_type, "weights": int(array.size),
                      "nonzero": [int(np.count_nonzero(array)), int(np.count_nonzero(pruned))],
                      "sparsity": round(1 - np.count_nonzero(pruned) / array.size, 6)})
    onnx.save(model, str(output))
    return masks, {"scope": config.scope, "target_sparsity": round(sparsity, 6), "layers": table, "left": left}


def _input_last(node: onnx.NodeProto, array: np.ndarray) -> tuple[np.ndarray, callable]:
    """The weight with its input dimension last (groups of m run along it), and the inverse."""
    if node.op_type == "Conv":  # [O, I, kh, kw] -> [O, kh, kw, I]
        return np.moveaxis(array, 1, -1), lambda x: np.moveaxis(x, -1, 1)
    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    if node.op_type == "Gemm" and trans_b:  # [out, in]
        return array, lambda x: x
    return array.T, lambda x: x.T  # MatMul / Gemm: [in, out]


def _prune_n_m(config: PruneStepConfig, source: Path, output: Path):
    model = onnx.load(str(source))
    masks, table, left = {}, [], []
    for node, tensor in _weights(model, config, left):
        array = numpy_helper.to_array(tensor)
        moved, back = _input_last(node, array)
        if moved.shape[-1] % config.m:
            left.append({"layer": node.name, "reason": f"input dimension {moved.shape[-1]} is not a multiple of {config.m}"})
            continue
        groups = np.abs(moved).reshape(-1, config.m)
        # Within each group, drop the m - n smallest (stable order: ties go to the lower index).
        order = np.argsort(groups, axis=1, kind="stable")
        keep = np.ones_like(groups, dtype=bool)
        np.put_along_axis(keep, order[:, : config.m - config.n], False, axis=1)
        mask = back(keep.reshape(moved.shape))
        pruned = np.where(mask, array, np.float32(0)).astype(np.float32)
        verified = _groups_ok(_input_last(node, pruned)[0], config.n, config.m)
        tensor.CopyFrom(numpy_helper.from_array(pruned, tensor.name))
        masks[tensor.name] = mask
        table.append({"layer": node.name, "op_type": node.op_type, "weights": int(array.size),
                      "nonzero": [int(np.count_nonzero(array)), int(np.count_nonzero(pruned))],
                      "sparsity": round(1 - np.count_nonzero(pruned) / array.size, 6), "n_m_verified": verified})
    if not table:
        raise EngineError("nothing_to_prune", f"no layer has an input dimension that is a multiple of m={config.m}")
    onnx.save(model, str(output))
    return masks, {"n": config.n, "m": config.m, "layers": table, "left": left}


def _groups_ok(input_last: np.ndarray, n: int, m: int) -> bool:
    """Every group of m consecutive weights along the input dimension has at most n non-zeros."""
    return bool((np.count_nonzero(input_last.reshape(-1, m), axis=1) <= n).all())


# --- channels -----------------------------------------------------------------------------------

def _group_key(graph: channel_graph.ChannelGraph, root: int) -> tuple[str, ...]:
    """A group's identity across iterations: the layers that produce its channels."""
    return tuple(sorted(graph.layers(root)))


def _final_keep_counts(config: ChannelPruneConfig, model: onnx.ModelProto, ctx: StepContext) -> tuple[dict[tuple, int], float | None]:
    """Channels each group keeps at the end: from `ratio`, or the smallest ratio that reaches
    `target_macs` / `target_params` (bisection on the uniform ratio; MACs and parameters are
    counted on the actually pruned graph). Also the ratio the bisection found (None for `ratio`)."""
    graph = channel_graph.analyse(model, config.exclude)
    if not graph.prunable():
        raise EngineError("nothing_to_prune", "no channel group can be pruned safely: "
                          + "; ".join(sorted(set(graph.blocked.values())))[:1000])
    found = None
    if config.ratio is not None:
        counts = channel_graph.keep_counts(graph, config.ratio, config.round_to)
    else:
        scores = channel_graph.importance(graph, "l2")
        measure, target = (count_macs, config.target_macs) if config.target_macs is not None else \
            (lambda m: parameter_counts(m)["parameters"], config.target_params)
        full = measure(model)
        if full is None:
            raise EngineError("macs_unknown", "the model's MACs cannot be counted (shapes cannot be inferred); use ratio")
        lo, hi = 0.0, 0.99
        for _ in range(14):
            mid = (lo + hi) / 2
            counts = channel_graph.keep_counts(graph, mid, config.round_to)
            if measure(channel_graph.apply(graph, channel_graph.choose(scores, counts))) / full <= target:
                hi = mid
            else:
                lo = mid
        counts, found = channel_graph.keep_counts(graph, hi, config.round_to), hi
    return {_group_key(graph, root): count for root, count in counts.items()}, found


def _gradients(path: Path, data, device: str) -> dict[str, np.ndarray]:
    """dL/dw of every weight over up to TAYLOR_SAMPLES samples; without labels the loss is the
    cross-entropy against the model's own predictions."""
    module = onnx_to_torch(path).to(device)
    images = torch.from_numpy(data.images[:TAYLOR_SAMPLES])
    labels = None if data.labels is None else torch.from_numpy(data.labels[:TAYLOR_SAMPLES])
    for start in range(0, len(images), 64):
        batch = images[start : start + 64].to(device)
        logits = module(batch)
        logits = logits[0] if isinstance(logits, tuple) else logits
        target = labels[start : start + 64].to(device) if labels is not None else logits.detach().argmax(1)
        F.cross_entropy(logits, target, reduction="sum").backward()
    inverse = {key: name for name, key in module.keys.items()}
    return {inverse[key]: p.grad.detach().cpu().numpy() for key, p in module.weights.items() if p.grad is not None}


def _prune_channels(config: ChannelPruneConfig, source: Path, output: Path, final_keep: dict, iteration: int, ctx: StepContext) -> dict:
    model = onnx.load(str(source))
    graph = channel_graph.analyse(model, config.exclude)
    gradients = None
    if config.importance == "taylor":
        data = ctx.data.get("train") or ctx.data.get("calibration")
        if data is None:
            raise EngineError("calibration_data_required", "taylor importance needs data (data.calibration or data.train)")
        analysed = ctx.workdir / f"analysed-{iteration}.onnx"
        onnx.save(graph.model, str(analysed))
        gradients = _gradients(analysed, data, pick_device())
    scores = channel_graph.importance(graph, config.importance, gradients)
    counts = {}
    for root in graph.prunable():
        size = graph.groups[root].size
        final = final_keep.get(_group_key(graph, root), size)
        # Iterations walk from the current width to the final one in equal steps.
        want = size - (size - final) / (config.iterations - iteration + 1)
        counts[root] = min(size, max(final, int(math.ceil(want / config.round_to)) * config.round_to))
    kept = channel_graph.choose(scores, counts)
    pruned = channel_graph.apply(graph, kept)
    _check_runs(model, pruned)
    onnx.save(pruned, str(output))
    return channel_graph.kept_outputs(graph, kept), {
        "importance": config.importance, "round_to": config.round_to,
        "ratio": config.ratio, "target_macs": config.target_macs, "target_params": config.target_params,
        "groups": [{"layers": graph.layers(root), "channels": [graph.groups[root].size, counts[root]]} for root in graph.prunable()],
        "left": [{"layers": graph.layers(root), "reason": why} for root, why in sorted(graph.blocked.items())],
        "layers": channel_graph.layer_table(model, pruned),
    }


def _check_runs(original: onnx.ModelProto, pruned: onnx.ModelProto) -> None:
    """The pruned model loads, runs and gives outputs of the original's shapes, or nothing is emitted."""
    import onnxruntime as ort

    def outputs(model):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        inp = session.get_inputs()[0]
        shape = [d if isinstance(d, int) and d > 0 else 2 for d in inp.shape]
        return [o.shape for o in session.run(None, {inp.name: np.zeros(shape, np.float32)})]

    try:
        onnx.checker.check_model(pruned)
        same = outputs(original) == outputs(pruned)
    except Exception as exc:
        raise EngineError("prune_failed", f"the pruned model does not run: {str(exc)[:500]}") from exc
    if not same:
        raise EngineError("prune_failed", "the pruned model's output shapes differ from the original's")


# --- recovery -----------------------------------------------------------------------------------

def _finetune(config: PruneStepConfig, source: Path, output: Path, masks: dict | None, targets: dict, ctx: StepContext,
              start: float, width: float) -> dict:
    train = ctx.data["train"]
    tune = config.finetune
    module, norms, source = trainable(source, train, pick_device(), ctx.workdir, targets)
    mask_by_key = {}
    if masks:  # unstructured/N:M: pruned weights stay zero while the rest learn
        mask_by_key = {module.keys[name]: torch.from_numpy(mask) for name, mask in masks.items() if name in module.keys}

    def keep_zeros(student):
        with torch.no_grad():
            for key, mask in mask_by_key.items():
                student.weights[key].mul_(mask.to(student.weights[key].device))

    distill = tune.distill
    spec = TrainSpec.of(tune, seed=config.seed, alpha=(0.5 if train.labels is not None else 0.0) if distill else 1.0)
    history = fit(module, train, spec, progress=lambda stage, f: ctx.progress(f"finetune {stage}", start + width * (0.1 + 0.9 * f)),
                  device=pick_device(), teacher_path=ctx.model_path if distill else None,
                  after_step=keep_zeros if mask_by_key else None,
                  # One checkpoint per step: iterative schedules (other shapes each round) start each round afresh.
                  checkpoints=ctx.checkpoints if config.iterations == 1 else None)
    write_back(module, norms, source, output)
    return {"epochs": tune.epochs, "lr": tune.lr, "distill": distill, **history}


def _zstd(source: Path, output: Path) -> None:
    import zstandard

    with open(source, "rb") as src, open(output, "wb") as dst:
        # The frame records the content size, so any zstd decoder can restore it in one call.
        zstandard.ZstdCompressor(level=ZSTD_LEVEL).copy_stream(src, dst, size=source.stat().st_size)
