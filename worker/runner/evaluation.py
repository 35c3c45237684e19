"""The final model against the original on the evaluation data: size, latency, accuracy, fidelity,
and the measurements the last step's technique adds (per-layer SQNR of a quantized model)."""

from pathlib import Path

from worker.engine import evaluate
from worker.engine.data import ImageSet
from worker.engine.examples import task_examples
from modelpress.spec.errors import EngineError
from worker.engine.fidelity import fidelity
from worker.engine.registry import StepResult
from worker.engine.tasks.floor import overrides_of
from worker.engine.tasks.measure import task_fidelity
from worker.engine.tasks.scored import task_metrics


def evaluate_job(original: Path, compressed: Path, last_result: StepResult | None, eval_data: ImageSet | None,
                 threads: int, progress, task: dict | None = None, floor="default", examples_dir: Path | None = None) -> dict:
    """`task`: the job's given task (None: inferred from the outputs); `floor`: the job's floor,
    whose bounds the task's shortfalls are measured against (the runner decides what they do);
    `examples_dir`: where the drawn eval images go (`metrics.examples`; None: none drawn)."""
    settings = evaluate.RunSettings(threads=threads)
    if eval_data is None:
        raise EngineError("eval_data_required", "the job has no dataset to evaluate on (data.eval or data.calibration)")
    progress("original", 0.0)
    before, reference = evaluate.measure(original, eval_data, settings)
    progress("compressed", 0.5)
    after, outputs = evaluate.measure(compressed, eval_data, settings)
    comparison = {"size_ratio": round(before["size_bytes"] / after["size_bytes"], 3)}
    for key in ("batch_1", f"batch_{evaluate.LARGE_BATCH}"):
        if before["latency"][key] and after["latency"][key]:
            comparison[f"speedup_{key}"] = round(before["latency"][key]["p50_ms"] / after["latency"][key]["p50_ms"], 3)
    if before.get("accuracy") and after.get("accuracy"):
        comparison["accuracy_drop"] = round(before["accuracy"]["top1"] - after["accuracy"]["top1"], 6)
    comparison["fidelity"] = fidelity(reference, outputs)
    comparison["task"] = task_fidelity(reference, outputs, given=task, floor_overrides=overrides_of(floor))
    result = {"original": before, "compressed": after, "comparison": comparison}
    if comparison["task"].get("fits") is not False:
        # The targets of the images both models ran on (a fixed-batch model leaves a short tail out).
        targets = eval_data.head(min(settings.max_eval_samples, len(reference[0]))).targets
        result["task_metrics"] = task_metrics(comparison["task"]["task"], reference, outputs, targets,
                                              input_shape=[None, *eval_data.images.shape[1:]])
    if examples_dir is not None and comparison["task"].get("fits") is not False:
        result["examples"] = task_examples(comparison["task"]["task"], eval_data.images, reference, outputs, examples_dir)
    if last_result is not None and last_result.measure is not None:
        progress("layers", 0.9)
        result.update(last_result.measure(eval_data.images))
    progress("done", 1.0)
    return {**result, "eval_samples": len(reference[0]), "environment": evaluate.environment(settings.threads)}
