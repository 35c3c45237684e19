"""The `prune` step's driver: magnitude (unstructured), n_m (semi-structured) and channels
(structured; channels.py), each optionally followed by recovery fine-tuning (recovery.py), in one
or more iterations.

Zeros alone (magnitude, n_m; unstructured.py) neither shrink a dense file nor speed ONNX Runtime
up, so the step also writes model.onnx.zst (a standard zstd frame: `zstd -d` gives model.onnx
back) and reports both sizes; the latency is measured like any other, with no speed-up claimed.

Quality is measured three times on the eval data: before, right after pruning, after recovery.
"""

from pathlib import Path

import numpy as np
import onnx

from modelpress.spec.configs import PRUNE_SCHEMES, PruneStepConfig
from modelpress.spec.errors import EngineError
from modelpress.spec.quantized import is_quantized
from worker.engine import train_norm
from worker.engine.device import pick_device
from worker.engine.evaluate import open_session, quality, run_outputs
from worker.engine.formats import untie_weights
from worker.engine.graph_stats import graph_stats, parameter_counts
from worker.engine.prune.channels import final_keep_counts, prune_channels
from worker.engine.prune.recovery import finetune
from worker.engine.prune.unstructured import prune_magnitude, prune_n_m
from worker.engine.registry import StepContext, StepResult, register

ZSTD_LEVEL = 15


@register(*PRUNE_SCHEMES)
def prune(config: PruneStepConfig, ctx: StepContext) -> StepResult:
    model = onnx.load(str(ctx.model_path))
    if is_quantized(model):
        raise EngineError("model_already_quantized", "pruning needs a float model: put the prune step before quantize")
    eval_data = ctx.data.get("eval")
    reference = run_outputs(open_session(ctx.model_path, 1), eval_data.head(2000).images) if eval_data is not None else None
    before = {**graph_stats(ctx.model_path), "quality": quality(ctx.model_path, eval_data, reference)}
    final_keep, found_ratio = final_keep_counts(config, model, ctx) if config.method == "channels" else (None, None)
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
            kept, details = prune_channels(config, current, pruned, final_keep, iteration, ctx)
            for name, indices in kept.items():
                origin[name] = origin[name][indices] if name in origin else indices
        elif config.method == "magnitude":
            # Cubic ramp (Zhu & Gupta): prune fast while there is redundancy, gently at the end.
            sparsity = config.sparsity * (1 - (1 - iteration / config.iterations) ** 3)
            masks, details = prune_magnitude(config, current, pruned, sparsity)
        else:
            masks, details = prune_n_m(config, current, pruned)
        record = {"iteration": iteration, **parameter_counts(onnx.load(str(pruned))),
                  "quality_after_pruning": quality(pruned, eval_data, reference)}
        current = pruned
        if config.finetune:
            tuned = ctx.workdir / f"tuned-{iteration}.onnx"
            record["finetune"] = finetune(config, current, tuned, masks, targets(), ctx, share, 1 / config.iterations)
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


def _zstd(source: Path, output: Path) -> None:
    import zstandard

    with open(source, "rb") as src, open(output, "wb") as dst:
        # The frame records the content size, so any zstd decoder can restore it in one call.
        zstandard.ZstdCompressor(level=ZSTD_LEVEL).copy_stream(src, dst, size=source.stat().st_size)
