"""The search of the `quantize` step for the most quantized model that keeps a promise, and never
reporting the promise kept on the data the search tuned on.

The promise (`Promise`, promise.py) is the step's accuracy guard (top-1 criteria), the job's safety floor (the
task fidelity against the step's input model: worker/engine/tasks/, modelpress/spec/floor.py), or
both. Two entries:
- `guarded`: a step with a guard. The eval data is split: a tune part for the search, a held-out
  part for the final check; a promise not kept there raises GuardNotMet with the best candidate.
- `floor_repaired`: static_int8 without a guard, in a job whose floor is on. The model as asked is
  judged against the floor on the eval data; only when it misses does the search below run, and
  its best candidate is the result either way (the job's own evaluation judges it on all the eval
  data, and fails the job with `fidelity_floor_not_met` if it still misses).

The search, cheapest candidates first, each starting from the best so far:
1. the method as asked; for static_int8, 16-bit activations on the joins whose inputs' ranges
   differ widely (preflight's check on a few images; a calibration cannot mend those), then the
   other calibration methods;
2. static_int8 repairs (ladder `REPAIRS`, in order of cost): 16-bit activations for every Concat
   and every graph output (the tensors one 8-bit scale covers worst: a detector's joined pixel
   boxes and 0..1 scores); then per-tensor precision (precision_rung.py: the sensitivity of every
   quantized tensor, activations and weights, by the promise itself, from the best candidate's own
   ranges, and the fewest most sensitive ones moved to 16 bits or float: `tensor_precision`); then
   cross-layer equalization, AdaRound and sequential bias correction;
3. per-layer sensitivity (SQNR of each compute layer's output against the float model) ranks the
   layers, and the 1, 2, 4, ... most sensitive stay float (mixed precision). A candidate that keeps
   every layer float is not a quantized model and never counts.
The search stops building candidates when its budget is used up and goes on with the best. Every
candidate built is timed once at the end; the Pareto set of (size, latency, the promise's figure)
is in the metrics, and its members other than the chosen one are stored as `candidate-<i>.onnx`.
"""

import time
from collections.abc import Callable

import numpy as np
import onnx

from modelpress.spec.configs import QuantizeStepConfig
from worker.engine.data import ImageSet, split
from modelpress.spec.errors import EngineError
from worker.engine import preflight
from worker.engine.errors import GuardNotMet, JobCancelled, JobSuperseded, TimeLimitExceeded
from worker.engine.evaluate import RunSettings, latency, open_session, run_outputs
from worker.engine.quantize.layers import layer_sqnr, quantized_layers
from worker.engine.quantize.precision_rung import PrecisionRung
from worker.engine.quantize.promise import Promise
from worker.engine.quantize.tensor_precision import quantized_from
from worker.engine.registry import StepContext, StepResult

CALIBRATIONS = ("minmax", "percentile", "entropy")
SENSITIVITY_SAMPLES = 64
WIDE_JOIN_SAMPLES = 4  # images of the float run that finds wide joins
# The Pareto set's speed: a short batch-1 timing of each candidate, once the search is over.
QUICK_TIMING = RunSettings(warmup_runs=2, min_timed_runs=5, max_timed_runs=50, time_budget_s=0.2)
MAX_STORED_CANDIDATES = 4  # Pareto candidates stored beside model.onnx
# Eval images a floor-driven search judges its candidates on; the job's evaluation then judges the
# chosen one on all of them.
REPAIR_SAMPLES = 512


def _calibration_change(calibration: str | None) -> dict:
    return {} if calibration is None else {"calibration": calibration}


def _calibration_label(calibration: str | None) -> str:
    return f"calibration {calibration}" if calibration else "as asked"


def _wide_candidates(model_path) -> list[str]:
    """Concats and the nodes that produce graph outputs: where tensors of very different ranges
    meet, or where the result is read as it is."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    outputs = {o.name for o in graph.output}
    return sorted({n.name for n in graph.node if n.name and (n.op_type == "Concat" or outputs & set(n.output))})


def _wide_joins(model_path, images: np.ndarray) -> list[str]:
    """Named Concat/Add nodes whose inputs' ranges differ by preflight.WIDE_JOIN_RATIO or more on a
    few images; none when the check cannot run (the ladder's later repairs still cover joins)."""
    try:
        model = onnx.load(str(model_path))
        initializers = {t.name for t in model.graph.initializer}
        inputs = [i.name for i in model.graph.input if i.name not in initializers]
        if len(inputs) != 1:
            return []
        found = preflight.wide_joins(model, inputs[0], images[:WIDE_JOIN_SAMPLES])["joins"]
    except (JobCancelled, JobSuperseded, TimeLimitExceeded):
        raise
    except Exception:
        return []
    names = {n.name for n in model.graph.node if n.name}
    return [join["node"] for join in found if join["node"] in names]


# static_int8 repairs, in order of cost: one more quantization with a few 16-bit tensors; the
# per-tensor precision rung (short runs of graph edits of the best candidate, then one more
# quantization); then the weight repairs (AdaRound learns every layer's rounding). Each gives the
# changes to the best candidate's config, or None where it does not apply.
REPAIRS = (
    ("16-bit joins and outputs", lambda search: {"wide_activations": _wide_candidates(search.ctx.model_path)}),
    ("per-tensor precision", lambda search: search.tensor_precision()),
    ("equalize, AdaRound, bias correction", lambda search: {"equalize": True, "adaround": True, "bias_correction": "sequential"}),
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

    def __init__(self, config: QuantizeStepConfig, ctx: StepContext, run, tune: ImageSet, promise: Promise, budget_s: float):
        self.config, self.ctx, self.run, self.tune, self.promise = config, ctx, run, tune, promise
        self.budget_s = budget_s
        self.float_tune = run_outputs(open_session(ctx.model_path, threads=1), tune.images)
        # The float model's own score: what a guard's accuracy drop is measured from (a floor needs none).
        self.original_tune = promise.score(ctx.model_path, tune, self.float_tune) if promise.guard is not None else {}
        self.attempts: list[dict] = []
        self.models: dict[int, object] = {}  # attempt index -> the candidate's model file
        self.best, self.passing = None, None
        self.deadline = time.monotonic() + budget_s
        # `activation_type: auto` is decided once, by the first candidate; the others reuse it
        # instead of timing both types again.
        self.activation_type: dict = {}
        self.sensitivity: dict | None = None  # the per-tensor rung's report, once it ran

    def judge(self, label: str, result: StepResult) -> dict:
        score = self.promise.score(result.model_path, self.tune, self.float_tune)
        self.models[len(self.attempts)] = result.model_path
        self.attempts.append({"attempt": label, "tune": score, "meets_on_tune": self.promise.meets(score, self.original_tune)})
        if not self.activation_type and getattr(self.config, "activation_type", None) == "auto" \
                and result.metrics.get("activation_type") in ("uint8", "int8"):
            self.activation_type = {"activation_type": result.metrics["activation_type"]}
        return score

    def attempt(self, label: str, **changes) -> tuple[StepResult | None, dict | None]:
        """One candidate, scored on the tuning data; a candidate that fails to build is recorded
        and the search goes on. Past the budget, candidates are listed as not tried."""
        ctx, attempts = self.ctx, self.attempts
        if time.monotonic() > self.deadline and self.best is not None:
            attempts.append({"attempt": label, "skipped": f"the search's budget of {self.budget_s:g} s is used up"})
            return None, None
        workdir = ctx.workdir / f"attempt-{len(attempts)}"
        workdir.mkdir()
        fraction = min(0.9, 0.1 + 0.1 * len(attempts))
        ctx.progress(f"guard: {label}", fraction)
        try:  # the attempt's own progress reports still check cancel, deadline and worker stop
            result = self.run(self.config.model_copy(update={"guard": None, **self.activation_type, **changes}),
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
        return result, self.judge(label, result)

    def consider(self, candidate: tuple) -> bool:
        """Keep the candidate if it is the best so far; True when it keeps the promise on tune."""
        if self.best is None or self.promise.value(candidate[1]) > self.promise.value(self.best[1]):
            self.best = candidate
        if self.promise.meets(candidate[1], self.original_tune):
            self.passing = candidate
            return True
        return False

    def first_candidates(self, built: tuple[StepResult, dict] | None = None) -> None:
        """The method as asked (`built`: already built and judged by the caller); for static_int8,
        16-bit activations on the joins whose inputs' ranges differ widely (found by one short float
        run: no calibration can mend those), then the other calibrations. Only the calibrated schemes
        have a calibration to search; the others run one candidate."""
        config = self.config
        given = getattr(config, "calibration", None)
        result, score = built or self.attempt(_calibration_label(given), **_calibration_change(given))
        if result is not None and self.consider((result, score, _calibration_change(given), [])):
            return
        if config.method != "static_int8":
            return
        joins = _wide_joins(self.ctx.model_path, self.tune.images) if self.best is not None else []
        if joins:
            changes = {**self.best[2], "wide_activations": joins}
            result, score = self.attempt("16-bit wide joins", **changes)
            if result is not None and self.consider((result, score, changes, [])):
                return
        for calibration in (c for c in CALIBRATIONS if c != given):
            changes = {**(self.best[2] if self.best else {}), "calibration": calibration}
            result, score = self.attempt(_calibration_label(calibration), **changes)
            if result is not None and self.consider((result, score, changes, [])):
                return

    def repairs(self) -> None:
        if self.config.method != "static_int8":
            return
        for label, change in REPAIRS:
            if time.monotonic() > self.deadline:
                self.attempts.append({"attempt": label, "skipped": f"the search's budget of {self.budget_s:g} s is used up"})
                continue
            asked = change(self)
            if asked is None:
                continue
            changes = {**self.best[2], **asked}  # on top of the best so far
            result, score = self.attempt(label, **changes)
            if result is not None and self.consider((result, score, changes, [])):
                return

    def tensor_precision(self) -> dict | None:
        """The per-tensor rung's decision on the best candidate so far (precision_rung.py); None
        when it is off or finds no set of tensors that keeps the promise on the tuning data."""
        if not getattr(self.config, "precision_repair", False):
            return None
        labels = self.tune.labels

        def judge(outputs, reference, count):
            score = self.promise.score_outputs(outputs, None if labels is None else labels[:count], reference)
            return self.promise.meets(score, self.original_tune), self.promise.value(score)

        base = self.best[0].model_path
        self.ctx.progress("guard: per-tensor sensitivity", min(0.9, 0.1 + 0.1 * len(self.attempts)))  # its own stage timing
        rung = PrecisionRung(base, quantized_from(base.parent, self.ctx.model_path), judge,
                             self.tune.images, self.float_tune, self.deadline)
        choices, self.sensitivity = rung.decide()
        return {"tensor_precision": {**self.best[2].get("tensor_precision", {}), **choices}} if choices else None

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

    def search(self, built: tuple[StepResult, dict] | None = None) -> None:
        self.first_candidates(built)
        if self.best is None:
            raise EngineError("quantization_failed", f"no quantized candidate could be built: {self.attempts}")
        if self.passing is None:
            self.repairs()
        if self.passing is None:
            self.sensitive_layers_float()

    def chosen(self) -> tuple[StepResult, dict, dict, list]:
        """The passing candidate, else the best, with what it changed (for metrics and recipe), and
        the Pareto set of every candidate built: the others on it become downloadable artifacts."""
        result, score, changes, sensitive = self.passing or self.best
        summary = {
            "calibration": changes.get("calibration"), "repairs": {k: v for k, v in changes.items() if k != "calibration"},
            "kept_float": [{"layer": layer["layer"], "reason": f"sensitive: SQNR {layer['sqnr_db']:.1f} dB when quantized"}
                           for layer in sensitive],
            "tune_samples": len(self.tune), "attempts": self.attempts,
            **({"sensitivity": self.sensitivity} if self.sensitivity else {}),
            "pareto": self.pareto(result),
        }
        return result, score, changes, summary

    def pareto(self, chosen: StepResult) -> list[dict]:
        """Candidates no other beats on size, batch-1 latency and the promise's figure at once, the
        chosen one marked `model.onnx`; up to MAX_STORED_CANDIDATES others stored as candidate-<i>.onnx."""
        points = []
        for index, path in self.models.items():
            attempt = self.attempts[index]
            timing = latency(open_session(path, threads=1), self.tune.images, 1, QUICK_TIMING)
            attempt.update({"size_bytes": path.stat().st_size, "p50_ms_batch_1": timing["p50_ms"] if timing else None})
            points.append((index, path, attempt["size_bytes"], timing["p50_ms"] if timing else float("inf"),
                           self.promise.value(attempt["tune"])))

        def beaten(point) -> bool:
            return any(o[2] <= point[2] and o[3] <= point[3] and o[4] >= point[4] and (o[2], o[3], o[4]) != point[2:]
                       for o in points)

        front = sorted((point for point in points if not beaten(point) or point[1] == chosen.model_path),
                       key=lambda point: point[4], reverse=True)
        listed, stored = [], 0
        for index, path, size, p50, _ in front:
            name = "model.onnx" if path == chosen.model_path else None
            if name is None and stored < MAX_STORED_CANDIDATES:
                name, stored = f"candidate-{index}.onnx", stored + 1
                chosen.artifacts[name] = path
            listed.append({"attempt": self.attempts[index]["attempt"], "size_bytes": size,
                           "p50_ms_batch_1": None if p50 == float("inf") else p50,
                           "meets_on_tune": self.attempts[index]["meets_on_tune"], "artifact": name})
        return listed


def floor_repaired(config: QuantizeStepConfig, ctx: StepContext, run: Callable[[QuantizeStepConfig, StepContext], StepResult]) -> StepResult:
    """The model as asked, unless it misses the job's safety floor on the eval data: then the search's
    best candidate, with `metrics.repair` saying what was tried (see the module's docstring)."""
    result = run(config, ctx)
    data = ctx.data.get("eval") or ctx.data.get("calibration")
    if not config.repair or ctx.floor == "off" or data is None:
        return result
    ctx.progress("floor check", 0.95)
    search = _Search(config, ctx, run, data.head(REPAIR_SAMPLES), Promise(None, ctx.task, ctx.floor), config.repair_budget_s)
    first = search.judge(_calibration_label(getattr(config, "calibration", None)), result)
    if "floor" not in first:  # no floor for this task, or nothing measured: nothing to repair by
        return result
    if search.consider((result, first, {}, [])):
        result.metrics["repair"] = {"needed": False, "met": True, "tune_samples": len(search.tune), "attempts": search.attempts}
        return result
    ctx.progress("repair", 0.1)
    search.search(built=(result, first))
    chosen, _, _, summary = search.chosen()
    chosen.metrics["repair"] = {"needed": True, "met": search.passing is not None, "trigger": first["floor"]["shortfalls"],
                                **summary}
    return chosen


def guarded(config: QuantizeStepConfig, ctx: StepContext, run: Callable[[QuantizeStepConfig, StepContext], StepResult]) -> StepResult:
    guard = config.guard
    data = _check_data(guard, ctx.data.get("eval"))
    tune, holdout = split(data, eval_fraction=guard.holdout_fraction, seed=0)
    search = _Search(config, ctx, run, tune, Promise(guard, ctx.task, ctx.floor), guard.budget_s)
    search.search()
    return _check_holdout(search, holdout)


def _check_holdout(search: _Search, holdout: ImageSet) -> StepResult:
    """The chosen candidate on the held-out data, which the search never saw."""
    guard, model_path, promise = search.config.guard, search.ctx.model_path, search.promise
    float_holdout = run_outputs(open_session(model_path, threads=1), holdout.images)
    original_holdout = promise.score(model_path, holdout, float_holdout)
    result, _, _, summary = search.chosen()
    holdout_score = promise.score(result.model_path, holdout, float_holdout)
    met = search.passing is not None and promise.meets(holdout_score, original_holdout)
    result.metrics.update({
        "guard": {
            "criterion": guard.model_dump(exclude_none=True), "met": met, **summary, "holdout_samples": len(holdout),
            "original_holdout": original_holdout, "candidate_holdout": holdout_score,
        }
    })
    if not met:
        why = "no setting met it on the tuning data" if search.passing is None else "it held on the tuning data but not on the held-out data"
        raise GuardNotMet(f"the accuracy guard {guard.model_dump(exclude_none=True, exclude={'holdout_fraction', 'budget_s'})} "
                          f"was not met: {why}; the best candidate is stored", result)
    return result
