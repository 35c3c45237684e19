"""The job runner: one function every technique plugs into.

claim -> load model and data -> run each step, each feeding the next -> evaluate against the
original -> store artifacts -> final status. It reaches job state only through
service.jobs.service, and techniques only through the step registry.
"""

import hashlib
import json
import logging
import math
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from billiard.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.datasets import service as datasets
from service.errors import NotFound
from service.jobs import service as jobs
from service.jobs.states import JobStatus
from service.models import service as models
from service.storage import ObjectStore, tenant_prefix
from worker.engine import evaluate
from worker.engine.configs import parse_step
from worker.engine.data import ImageSet, load_dataset, split
from worker.engine.errors import EngineError, GuardNotMet, JobCancelled, JobSuperseded
from worker.engine.fidelity import fidelity
from worker.engine.formats import to_onnx
from worker.engine.layers import layer_sqnr, quantized_layers
from worker.engine.registry import StepContext, handler_for
from worker.engine.train_norm import statistics_path
from worker.engine.report import render as render_report

log = logging.getLogger(__name__)

METRICS_SCHEMA_VERSION = 1
HEARTBEAT_S = 10.0
PROGRESS_WRITE_EVERY_S = 1.0
# Shares of the job's progress bar.
LOAD_SHARE, STEPS_SHARE, EVALUATE_SHARE = 0.05, 0.75, 0.15


class WorkerStopping(Exception):
    """The worker process is shutting down; the job is left for the next worker to claim."""


@dataclass
class RunnerDeps:
    settings: Settings
    session_factory: sessionmaker[Session]
    store: ObjectStore
    stopping: threading.Event = field(default_factory=threading.Event)


class Progress:
    """Stage and percent, throttled, plus the checks every long job needs at each report:
    cancel requested, superseded by another delivery, deadline passed, worker stopping. A heartbeat
    thread keeps reporting while a step is busy inside a library call."""

    def __init__(self, deps: RunnerDeps, job_id: str, token: str):
        self.deps, self.job_id, self.token = deps, job_id, token
        self.deadline = time.monotonic() + deps.settings.job_time_limit_s
        self.stage, self.fraction = "starting", 0.0
        self.verdict = "ok"
        self.last_write = 0.0
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> "Progress":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join(timeout=5)

    def _write(self) -> None:
        with self.lock, self.deps.session_factory() as session:
            self.verdict = jobs.report(session=session, job_id=self.job_id, token=self.token, stage=self.stage, progress=self.fraction)
            self.last_write = time.monotonic()

    def _beat(self) -> None:
        while not self.done.wait(HEARTBEAT_S):
            try:
                self._write()
                # A step stuck inside a library call never reaches check(): the job's state is
                # settled from here, and whatever the step does later is ignored (it lost the claim).
                if self.verdict == "cancel":
                    self._settle(JobStatus.CANCELLED)
                elif time.monotonic() > self.deadline:
                    self._settle(JobStatus.FAILED, error_code="time_limit_exceeded",
                                 error_message=f"the job ran past its limit of {self.deps.settings.job_time_limit_s} s")
            except Exception:  # a missed heartbeat is retried at the next beat
                log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)

    def _settle(self, status: JobStatus, **values) -> None:
        with self.lock, self.deps.session_factory() as session:
            if jobs.finish(session=session, job_id=self.job_id, token=self.token, status=status, **values):
                self.verdict = "lost"

    def check(self) -> None:
        if self.verdict == "cancel":
            raise JobCancelled()
        if self.verdict == "lost":
            raise JobSuperseded()
        if self.deps.stopping.is_set():
            raise WorkerStopping()
        if time.monotonic() > self.deadline:
            raise EngineError("time_limit_exceeded", f"the job ran past its limit of {self.deps.settings.job_time_limit_s} s")

    def __call__(self, stage: str, fraction: float, force: bool = False) -> None:
        changed = stage != self.stage
        self.stage, self.fraction = stage, max(self.fraction, min(1.0, fraction))
        if force or changed or time.monotonic() - self.last_write >= PROGRESS_WRITE_EVERY_S:
            self._write()
        self.check()

    def span(self, start: float, width: float, prefix: str):
        """A progress function for one part of the job, mapping its own 0..1 into [start, start+width]."""
        return lambda stage, fraction: self(f"{prefix}:{stage}", start + width * max(0.0, min(1.0, fraction)))


def run_job(job_id: str, deps: RunnerDeps) -> str:
    settings = deps.settings
    with deps.session_factory() as session:
        claimed = jobs.claim(session=session, job_id=job_id, stale_after_s=settings.stale_job_after_s, max_attempts=settings.max_job_attempts)
    if claimed is None:
        return "skipped"
    job, token = claimed
    log.info("job %s: claimed (attempt %d)", job_id, job.attempts)
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)

    def finish(status: JobStatus, **values) -> None:
        with deps.session_factory() as session:
            jobs.finish(session=session, job_id=job_id, token=token, status=status, **values)
        try:  # checkpoints only serve a re-delivery of an unfinished job
            deps.store.delete_prefix(f"jobs/{job_id}/checkpoints/")
        except Exception:
            log.warning("job %s: checkpoints not deleted", job_id, exc_info=True)

    try:
        with Progress(deps, job_id, token) as progress, tempfile.TemporaryDirectory(dir=settings.tmp_dir, prefix=f"{job_id}-") as tmp:
            metrics, failure = _execute(job, token, deps, progress, Path(tmp))
            if failure is not None:
                # The job failed its promise, but what it made is measured and stored.
                finish(JobStatus.FAILED, metrics=metrics, error_code=failure.code, error_message=failure.message)
                return "failed"
            finish(JobStatus.SUCCEEDED, metrics=metrics)
        log.info("job %s: succeeded", job_id)
        return "succeeded"
    except JobCancelled:
        finish(JobStatus.CANCELLED)
        return "cancelled"
    except JobSuperseded:
        return "released"
    except WorkerStopping:
        return "released"
    except EngineError as exc:
        finish(JobStatus.FAILED, error_code=exc.code, error_message=exc.message)
        return "failed"
    except SoftTimeLimitExceeded:
        finish(JobStatus.FAILED, error_code="time_limit_exceeded", error_message="the job ran past its time limit")
        return "failed"
    except Exception as exc:
        log.exception("job %s: unexpected failure", job_id)
        finish(JobStatus.FAILED, error_code="internal_error", error_message=f"{exc.__class__.__name__}: {str(exc)[:1000]}")
        return "failed"


def _execute(job, token: str, deps: RunnerDeps, progress: Progress, work: Path) -> dict:
    store, tenant_id = deps.store, job.tenant_id
    progress("load", 0.0, force=True)
    data_spec = job.spec["data"]
    split_spec = data_spec.get("split")
    wanted = {role: ds_id for role, ds_id in data_spec.items() if role != "split" and ds_id}
    if split_spec:
        wanted["split"] = split_spec["dataset"]
    with deps.session_factory() as session:
        try:
            model = models.get(session=session, tenant_id=tenant_id, model_id=job.model_id)
            dataset_rows = {role: datasets.get(session=session, tenant_id=tenant_id, dataset_id=ds_id)
                            for role, ds_id in wanted.items()}
        except NotFound as exc:
            raise EngineError(exc.code, exc.message) from exc
    if len(model.inputs) > 1:
        raise EngineError("unsupported_model_input", "models with more than one input are not supported yet")
    input_shape = model.inputs[0]["shape"] if model.inputs else None
    input_name = model.inputs[0]["name"] if model.inputs else "input"

    original_file = store.get_file(model.storage_key, work / Path(model.storage_key).name)
    data: dict[str, ImageSet] = {}
    for role, row in dataset_rows.items():
        local = store.get_file(row.storage_key, work / f"{role}-{Path(row.storage_key).name}")
        data[role] = load_dataset(local, dataset_format=row.format, layout=row.layout, preprocess=row.preprocess,
                                  model_shape=input_shape, role=role, input_name=input_name, channels_hint=row.shape[1])
        progress("load", LOAD_SHARE * 0.5 * len(data) / len(dataset_rows))
    if split_spec:
        rest, held_out = split(data.pop("split"), eval_fraction=split_spec["eval_fraction"], seed=split_spec["seed"])
        data.setdefault("eval", held_out)
        data.setdefault("calibration", rest)
        data.setdefault("train", rest)
    eval_data = data.get("eval") or data.get("calibration") or data.get("train")
    example = eval_data.images if eval_data is not None else None
    original = to_onnx(original_file, model.format, work, example, packed=(model.details or {}).get("packaging") == "zip")
    progress("load", LOAD_SHARE)

    current, step_metrics, failure, extra_artifacts = original, [], None, {}
    last_input = original  # what the last step started from: the float twin of a quantized result
    steps = job.spec["steps"]
    reference_outputs = None
    if len(steps) > 1 and eval_data is not None:
        reference_outputs = evaluate.run_outputs(evaluate.open_session(original, 1), eval_data.head(2000).images)
    def load_model(model_id: str) -> Path:
        with deps.session_factory() as session:
            try:
                row = models.get(session=session, tenant_id=tenant_id, model_id=model_id)
            except NotFound as exc:
                raise EngineError(exc.code, exc.message) from exc
        folder = work / f"model-{model_id}"
        folder.mkdir(exist_ok=True)
        local = store.get_file(row.storage_key, folder / Path(row.storage_key).name)
        return to_onnx(local, row.format, folder, example, packed=(row.details or {}).get("packaging") == "zip")

    for index, step in enumerate(steps):
        config = parse_step(step["type"], step["params"])
        step_dir = work / f"step-{index}"
        step_dir.mkdir()
        step_progress = progress.span(LOAD_SHARE + STEPS_SHARE * index / len(steps), STEPS_SHARE / len(steps), f"{index}:{step['type']}")
        step_progress("start", 0.0)
        saved = _checkpoint_prefix(job.id, index)
        # A re-delivered job takes the finished steps' outputs from storage instead of running them again.
        if index < len(steps) - 1 and store.exists(f"{saved}/result.json"):
            current = store.get_file(f"{saved}/output.onnx", step_dir / "output.onnx")
            if store.exists(f"{saved}/channel-stats.npz"):
                store.get_file(f"{saved}/channel-stats.npz", statistics_path(current))
            result_json = store.get_file(f"{saved}/result.json", step_dir / "result.json")
            step_metrics.append({**json.loads(result_json.read_text()), "resumed": True})
            continue
        last_input = current
        try:
            result = handler_for(step["type"])(config, StepContext(
                model_path=current, original_path=original, workdir=step_dir, data=data, progress=step_progress,
                load_model=load_model, checkpoints=StoredCheckpoint(store, f"{saved}/training.pt", step_dir)))
        except GuardNotMet as exc:
            result, failure = exc.result, exc
        current, extra_artifacts = result.model_path, result.artifacts
        after = {"size_bytes": current.stat().st_size}
        if len(steps) > 1 and eval_data is not None:  # a recipe's report shows where each step left the model
            after.update(evaluate.quality(current, eval_data, reference_outputs) or {})
        step_metrics.append({"type": step["type"], "size_bytes": after["size_bytes"], **result.metrics, "after_step": after})
        step_progress("done", 1.0)
        if failure is not None:
            break  # later steps would build on a model that broke its promise
        if index < len(steps) - 1:
            (step_dir / "result.json").write_text(json.dumps(_finite(step_metrics[-1])))
            store.put_file(f"{saved}/output.onnx", current)
            if statistics_path(current).is_file():  # a later training step starts from them (train_norm)
                store.put_file(f"{saved}/channel-stats.npz", statistics_path(current))
            store.put_file(f"{saved}/result.json", step_dir / "result.json")  # written last: marks the step done

    evaluation = _evaluate(original, current, last_input, eval_data, deps, progress.span(LOAD_SHARE + STEPS_SHARE, EVALUATE_SHARE, "evaluate"))
    metrics = {
        "schema_version": METRICS_SCHEMA_VERSION,
        "model_id": job.model_id,
        "model_format": model.format,
        "eval_dataset": data_spec.get("eval") or (split_spec and f"{split_spec['dataset']} (held-out {split_spec['eval_fraction']:.0%})")
        or data_spec.get("calibration"),
        **evaluation,
        "steps": step_metrics,
    }
    progress("store", LOAD_SHARE + STEPS_SHARE + EVALUATE_SHARE)
    metrics = _finite(metrics)
    metrics_file = work / "metrics.json"
    metrics_file.write_text(json.dumps(metrics, indent=2, allow_nan=False))
    report_file = work / "report.html"
    report_file.write_text(render_report(metrics, job_id=job.id))
    # A complete POST /v1/jobs body, every default filled in: posting it back runs the same job.
    recipe_file = work / "recipe.json"
    recipe_file.write_text(json.dumps({
        "model_id": job.model_id, "steps": job.spec["steps"], "data": job.spec["data"],
        "provenance": {"job_id": job.id, "preset": job.spec.get("preset"), "versions": metrics["environment"]["versions"]},
    }, indent=2))
    for name, path in (("model.onnx", current), *extra_artifacts.items(), ("metrics.json", metrics_file),
                       ("report.html", report_file), ("recipe.json", recipe_file)):
        _store_artifact(deps, job.id, token, name, path, tenant_id=job.tenant_id)
    return metrics, failure


def _checkpoint_prefix(job_id: str, index: int) -> str:
    return f"jobs/{job_id}/checkpoints/step-{index}"


class StoredCheckpoint:
    """A training step's checkpoint in object storage: it outlives the worker that wrote it."""

    def __init__(self, store: ObjectStore, key: str, workdir: Path):
        self.store, self.key, self.local = store, key, workdir / "checkpoint.pt"

    def load(self) -> bytes | None:
        if not self.store.exists(self.key):
            return None
        return self.store.get_file(self.key, self.local).read_bytes()

    def save(self, data: bytes) -> None:
        self.local.write_bytes(data)
        self.store.put_file(self.key, self.local)


def _evaluate(original: Path, compressed: Path, float_twin: Path, eval_data: ImageSet | None, deps: RunnerDeps, progress) -> dict:
    settings = evaluate.RunSettings(threads=deps.settings.bench_threads)
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
    result = {"original": before, "compressed": after, "comparison": comparison}
    if quantized_layers(compressed):
        progress("layers", 0.9)
        fixed = evaluate.fixed_batch(evaluate.open_session(compressed, 1))
        # Per-layer error of quantization: against the model the quantizing step started from (after a
        # prune or distill step the original has other layer shapes).
        result["layers"] = layer_sqnr(float_twin, compressed, eval_data.images[: max(fixed or 0, 64)], compressed.parent)
    progress("done", 1.0)
    return {**result,
            "eval_samples": len(reference[0]), "environment": evaluate.environment(settings.threads)}


def _finite(value):
    """Metrics as strict JSON: a NaN or infinite number (a model that outputs NaN) becomes null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _store_artifact(deps: RunnerDeps, job_id: str, token: str, name: str, path: Path, *, tenant_id: str) -> None:
    """Each delivery writes under its own token, and the row is switched to the new object only
    after the upload completed: a delivery that dies half-way leaves no half-written artifact."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    key = f"{tenant_prefix(tenant_id)}jobs/{job_id}/{token}/{name}"
    deps.store.put_file(key, path)
    with deps.session_factory() as session:
        owned = jobs.record_artifact(session=session, job_id=job_id, token=token, name=name, size_bytes=path.stat().st_size,
                                     sha256=digest.hexdigest(), storage_key=key)
    if not owned:
        deps.store.delete(key)
        raise JobSuperseded()
