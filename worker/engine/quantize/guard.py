"""The accuracy guard of the `quantize` step: search for the most quantized model that keeps the
promise, and never report the promise kept on the data the search tuned on.

1. The eval data is split: a tune part for the search, a held-out part for the final check.
2. The method runs as asked; for static_int8, the other calibration methods are tried next.
3. static_int8 still not met: the repairs, cheapest first (ladder `REPAIRS`): cross-layer
   equalization, AdaRound and sequential bias correction together; then 16-bit activations for
   every Concat and every graph output (the tensors one 8-bit scale covers worst).
4. Still not met: per-layer sensitivity (SQNR of each compute layer's output against the float
   model) ranks the layers, and the 1, 2, 4, ... most sensitive stay float (mixed precision). A
   candidate that keeps every layer float is not a quantized model and never counts.
5. The passing candidate is checked on the held-out part. If it fails there, or nothing passed,
   the step raises GuardNotMet carrying the best candidate, which the job still stores.
The search stops building candidates when `guard.budget_s` is used up and goes on with the best.
"""

import time
from collections.abc import Callable

import numpy as np
import onnx

from modelpress.spec.configs import QuantizeStepConfig
from worker.engine.data import ImageSet, split
from modelpress.spec.errors import EngineError
from worker.engine.errors import GuardNotMet, TimeLimitExceeded
from worker.engine.evaluate import open_session, run_outputs
from worker.engine.fidelity import top1_agreement
from worker.engine.quantize.layers import layer_sqnr, quantized_layers
from worker.engine.registry import StepContext, StepResult

CALIBRATIONS = ("minmax", "percentile", "entropy")
SENSITIVITY_SAMPLES = 64


def _score(path, data: ImageSet, reference: np.ndarray) -> dict:
    logits = run_outputs(open_session(path, threads=1), data.images)[0]
    score = {"top1_agreement": top1_agreement(reference, logits)}
    if data.labels is not None:
        score["accuracy"] = float(np.mean(logits.argmax(1) == data.labels[: len(logits)]))
    return score


def _value(score: dict, guard) -> float:
    return score["top1_agreement"] if guard.min_top1_agreement is not None else score["accuracy"]


def _meets(score: dict, original: dict, guard) -> bool:
    if guard.min_top1_agreement is not None:
        return score["top1_agreement"] >= guard.min_top1_agreement
    if guard.min_accuracy is not None:
        return score["accuracy"] >= guard.min_accuracy
    return original["accuracy"] - score["accuracy"] <= guard.max_accuracy_drop + 1e-12


def _calibration_change(calibration: str | None) -> dict:
    return {} if calibration is None else {"calibration": calibration}


def _wide_candidates(model_path) -> list[str]:
    """Concats and the nodes that produce graph outputs: where tensors of very different ranges
    meet, or where the result is read as it is."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    outputs = {o.name for o in graph.output}
    return sorted({n.name for n in graph.node if n.name and (n.op_type == "Concat" or outputs & set(n.output))})


# static_int8 repairs, in order of cost; each adds to the one before.
REPAIRS = (
    ("equalize, AdaRound, bias correction", lambda model_path: {"equalize": True, "adaround": True, "bias_correction": "sequential"}),
    ("16-bit joins and outputs", lambda model_path: {"wide_activations": _wide_candidates(model_path)}),
)


def _check_data(guard, data: ImageSet | None) -> ImageSet:
    if data is None:
        raise EngineError("eval_data_required", "an accuracy guard needs evaluation data (data.eval or data.split)")
    if guard.needs_labels and data.labels is None:
        raise EngineError("eval_labels_required", "this guard needs labels in the evaluation data; use min_top1_agreement")
    if len(data) < 10:
        raise EngineError("dataset_too_small", "an accuracy guard needs at least 10 evaluation images")
    return data


class _Search:
    """The candidates tried so far, scored on the tuning data; `best` and `passing` are tuples
    (result, score, the changes to the asked config, sensitive layers)."""

    def __init__(self, config: QuantizeStepConfig, ctx: StepContext, run, tune: ImageSet):
        self.config, self.ctx, self.run, self.tune = config, ctx, run, tune
        self.guard = config.guard
        self.float_tune = run_outputs(open_session(ctx.model_path, threads=1), tune.images)[0]
        self.original_tune = _score(ctx.model_path, tune, self.float_tune)
        self.attempts: list[dict] = []
        self.best, self.passing = None, None
        self.deadline = time.monotonic() + self.guard.budget_s

    def attempt(self, label: str, **changes) -> tuple[StepResult | None, dict | None]:
        """One candidate, scored on the tuning data; a candidate that fails to build is recorded
        and the search goes on. Past the budget, candidates are listed as not tried."""
        ctx, attempts = self.ctx, self.attempts
        if time.monotonic() > self.deadline and self.best is not None:
            attempts.append({"attempt": label, "skipped": f"the guard's budget of {self.guard.budget_s:g} s is used up"})
            return None, None
        workdir = ctx.workdir / f"attempt-{len(attempts)}"
        workdir.mkdir()
        fraction = min(0.9, 0.1 + 0.1 * len(attempts))
        ctx.progress(f"guard: {label}", fraction)
        try:  # the attempt's own progress reports still check cancel, deadline and worker stop
            result = self.run(self.config.model_copy(update={"guard": None, **changes}),
                              StepContext(ctx.model_path, ctx.original_path, workdir, ctx.data,
                                          lambda stage, _: ctx.progress(f"guard: {label}: {stage}", fraction)))
        except TimeLimitExceeded:  # the job's deadline, not this candidate's failure
            raise
        except EngineError as exc:
            attempts.append({"attempt": label, "error": {"code": exc.code, "message": exc.message[:300]}})
            return None, None
        if not quantized_layers(result.model_path) and self.config.method not in ("fp16", "dynamic_int8"):
            attempts.append({"attempt": label, "error": {"code": "nothing_quantized", "message": "every layer stayed float"}})
            return None, None
        score = _score(result.model_path, self.tune, self.float_tune)
        attempts.append({"attempt": label, "tune": score, "meets_on_tune": _meets(score, self.original_tune, self.guard)})
        return result, score

    def consider(self, candidate: tuple) -> bool:
        """Keep the candidate if it is the best so far; True when it meets the guard on tune."""
        if self.best is None or _value(candidate[1], self.guard) > _value(self.best[1], self.guard):
            self.best = candidate
        if _meets(candidate[1], self.original_tune, self.guard):
            self.passing = candidate
            return True
        return False

    def calibrations(self) -> None:
        # Only the calibrated schemes have a calibration to search; the others run one candidate.
        config = self.config
        given = getattr(config, "calibration", None)
        calibrations = [given] + [c for c in CALIBRATIONS if c != given] if config.method == "static_int8" else [given]
        for calibration in calibrations:
            result, score = self.attempt(f"calibration {calibration}" if calibration else "as asked",
                                         **_calibration_change(calibration))
            if result is not None and self.consider((result, score, _calibration_change(calibration), [])):
                return

    def repairs(self) -> None:
        if self.config.method != "static_int8":
            return
        changes = dict(self.best[2])
        for label, change in REPAIRS:
            changes = {**changes, **change(self.ctx.model_path)}
            result, score = self.attempt(label, **changes)
            if result is not None and self.consider((result, score, changes, [])):
                return

    def sensitive_layers_float(self) -> None:
        base_result, _, changes, _ = self.best
        # Only layers that really are quantized in the base candidate can be handed back to float,
        # and at least one must stay quantized.
        quantized = quantized_layers(base_result.model_path)
        ranked = sorted((layer for layer in layer_sqnr(self.ctx.model_path, base_result.model_path,
                                                       self.tune.images[:SENSITIVITY_SAMPLES], self.ctx.workdir)
                         if layer["sqnr_db"] is not None and layer["tensor"] in quantized), key=lambda layer: layer["sqnr_db"])
        count = 1
        while count < len(ranked):
            sensitive = ranked[:count]
            result, score = self.attempt(f"{count} most sensitive layers float", **changes,
                                         exclude=[*self.config.exclude, *(layer["layer"] for layer in sensitive)])
            if result is not None and self.consider((result, score, changes, sensitive)):
                return
            count *= 2


def guarded(config: QuantizeStepConfig, ctx: StepContext, run: Callable[[QuantizeStepConfig, StepContext], StepResult]) -> StepResult:
    guard = config.guard
    data = _check_data(guard, ctx.data.get("eval"))
    tune, holdout = split(data, eval_fraction=guard.holdout_fraction, seed=0)
    search = _Search(config, ctx, run, tune)
    search.calibrations()
    if search.best is None:
        raise EngineError("quantization_failed", f"no quantized candidate could be built: {search.attempts}")
    if search.passing is None:
        search.repairs()
    if search.passing is None:
        search.sensitive_layers_float()
    return _check_holdout(search, holdout)


def _check_holdout(search: _Search, holdout: ImageSet) -> StepResult:
    """The chosen candidate on the held-out data, which the search never saw."""
    guard, model_path = search.guard, search.ctx.model_path
    float_holdout = run_outputs(open_session(model_path, threads=1), holdout.images)[0]
    original_holdout = _score(model_path, holdout, float_holdout)
    result, _, changes, sensitive = search.passing or search.best
    kept_float = [{"layer": layer["layer"], "reason": f"sensitive: SQNR {layer['sqnr_db']:.1f} dB when quantized"}
                  for layer in sensitive]
    holdout_score = _score(result.model_path, holdout, float_holdout)
    met = search.passing is not None and _meets(holdout_score, original_holdout, guard)
    result.metrics.update({
        "guard": {
            "criterion": guard.model_dump(exclude_none=True), "met": met, "calibration": changes.get("calibration"),
            "repairs": {k: v for k, v in changes.items() if k != "calibration"},
            "kept_float": kept_float, "tune_samples": len(search.tune), "holdout_samples": len(holdout),
            "original_holdout": original_holdout, "candidate_holdout": holdout_score, "attempts": search.attempts,
        }
    })
    if not met:
        why = "no setting met it on the tuning data" if search.passing is None else "it held on the tuning data but not on the held-out data"
        raise GuardNotMet(f"the accuracy guard {guard.model_dump(exclude_none=True, exclude={'holdout_fraction', 'budget_s'})} "
                          f"was not met: {why}; the best candidate is stored", result)
    return result
