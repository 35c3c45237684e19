"""A job's life: claim it, run it under a heartbeat that checks cancel, deadline and worker stop,
settle its final status. The outcome of a delivery is an `Outcome`; the heartbeat's answer a
`runner_api.Heartbeat`. Job state is reached only through `service.jobs.runner_api`."""

import contextvars
import logging
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from billiard.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.jobs import runner_api
from service.jobs.runner_api import ClaimedJob, Heartbeat, JobStatus
from service.ops.context import bound
from service.storage import ObjectStore
from modelpress.spec.errors import EngineError
from worker.engine.errors import FidelityFloorNotMet, JobCancelled, JobSuperseded, TaskDoesNotFitModel, TimeLimitExceeded
from worker.engine.tasks import floor as safety_floor
from worker.engine.stoppable import RunStopper, stopping_with
from worker.runner.artifacts import METRICS_SCHEMA_VERSION, finite, write_and_store
from worker.runner.evaluation import evaluate_job
from worker.runner.inputs import LOAD_SHARE, load_inputs, run_preflight
from worker.runner.steps import STEPS_SHARE, run_steps
from worker.quality_warnings import quality_warnings
from worker.workdirs import make_workdir

log = logging.getLogger(__name__)

# Also how soon a cancel reaches a step inside a long library call (an ONNX Runtime run, ORT's
# calibrator between batches, a torch loop's stoppable.check): within one beat. One small UPDATE
# per beat per running job.
HEARTBEAT_S = 2.0
PROGRESS_WRITE_EVERY_S = 1.0
EVALUATE_SHARE = 0.15  # of the job's progress bar, after loading and the steps


class Outcome(StrEnum):
    """What one delivery of a job came to (the Celery task logs it; skipped: nothing to claim)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RELEASED = "released"  # left for another delivery: superseded, or this worker stopping
    SKIPPED = "skipped"


class WorkerStopping(Exception):
    """The worker process is shutting down; the job is left for the next worker to claim."""


@dataclass
class RunnerDeps:
    settings: Settings
    session_factory: sessionmaker[Session]
    store: ObjectStore
    stopping: threading.Event = field(default_factory=threading.Event)


class StageClock:
    """Seconds spent in each stage a job reported, in the order first seen: the job's and every
    step's `timings` (where a slow job spends its time, without a profiler)."""

    MAX_STAGES = 200  # distinct labels kept; later ones are added up under "other"

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.current, self.since = None, time.monotonic()

    def enter(self, stage: str) -> None:
        now = time.monotonic()
        if self.current is not None:
            label = self._label(self.current, self.seconds)
            self.seconds[label] = self.seconds.get(label, 0.0) + now - self.since
        self.current, self.since = stage, now

    def _label(self, stage: str, seconds: dict) -> str:
        return stage if stage in seconds or len(seconds) < self.MAX_STAGES else "other"

    def _so_far(self) -> dict[str, float]:
        seconds = dict(self.seconds)
        if self.current is not None:  # the stage running now, up to now
            label = self._label(self.current, seconds)
            seconds[label] = seconds.get(label, 0.0) + time.monotonic() - self.since
        return seconds

    def under(self, prefix: str) -> dict[str, float]:
        """The stages that start with `prefix`, named without it: a step's timings."""
        return {stage[len(prefix):]: round(seconds, 3) for stage, seconds in self._so_far().items() if stage.startswith(prefix)}

    def phases(self) -> dict[str, float]:
        """The job's timings by phase: load, preflight, steps (every step's stages), evaluate."""
        totals: dict[str, float] = {}
        for stage, seconds in self._so_far().items():
            phase = stage.split(":", 1)[0]
            phase = "steps" if phase.isdigit() else phase
            totals[phase] = totals.get(phase, 0.0) + seconds
        return {phase: round(seconds, 3) for phase, seconds in totals.items()}


class Progress:
    """Stage and percent, throttled, plus the checks every long job needs at each report:
    cancel requested, superseded by another delivery, deadline passed, worker stopping. A heartbeat
    thread keeps reporting while a step is busy inside a library call."""

    def __init__(self, deps: RunnerDeps, job_id: str, token: str):
        self.deps, self.job_id, self.token = deps, job_id, token
        self.deadline = time.monotonic() + deps.settings.job_time_limit_s
        self.stage, self.fraction = "starting", 0.0
        self.verdict = Heartbeat.CONTINUE
        self.settled = False  # the heartbeat ended the job itself (a cancel or the deadline)
        self.last_write = 0.0
        self.lock = threading.Lock()
        self.done = threading.Event()
        # Several beats within the stale limit: a busy step (a long epoch) is never taken for a dead one.
        self.beat_s = min(HEARTBEAT_S, deps.settings.stale_job_after_s / 3)
        # In a copy of the caller's context: its log lines carry the job's request id too.
        self.thread = threading.Thread(target=contextvars.copy_context().run, args=(self._beat,),
                                       name=f"heartbeat-{job_id}", daemon=True)
        # Ends the job's ONNX Runtime runs in progress when the heartbeat settles a cancel or deadline.
        self.runs = RunStopper()
        self.clock = StageClock()

    def __enter__(self) -> "Progress":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join(timeout=5)

    def _write(self) -> None:
        with self.lock:
            self.verdict = runner_api.heartbeat(sessions=self.deps.session_factory, job_id=self.job_id, token=self.token,
                                                stage=self.stage, progress=self.fraction)
            self.last_write = time.monotonic()

    def _beat(self) -> None:
        while not self.done.wait(self.beat_s):
            try:
                self._write()
                # A step stuck inside a library call never reaches check(): the job's state is
                # settled from here, and whatever the step does later is ignored (it lost the claim).
                if self.verdict is Heartbeat.CANCEL:
                    self._settle(JobStatus.CANCELLED)
                    self.runs.stop(JobCancelled)
                elif time.monotonic() > self.deadline:
                    self._settle(JobStatus.FAILED, error_code="time_limit_exceeded",
                                 error_message=self._time_limit().message)
                    self.runs.stop(self._time_limit)
                elif self.verdict is Heartbeat.SUPERSEDED:  # another delivery owns the job: this one's runs are waste
                    self.runs.stop(JobSuperseded)
            except Exception:  # a missed heartbeat is retried at the next beat
                log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)

    def _settle(self, status: JobStatus, **values) -> None:
        with self.lock:
            if runner_api.finish(sessions=self.deps.session_factory, job_id=self.job_id, token=self.token, status=status, **values):
                self.settled, self.verdict = True, Heartbeat.SUPERSEDED

    def check(self) -> None:
        if self.verdict is Heartbeat.CANCEL:
            raise JobCancelled()
        if self.verdict is Heartbeat.SUPERSEDED:
            raise JobSuperseded()
        if self.deps.stopping.is_set():
            raise WorkerStopping()
        if time.monotonic() > self.deadline:
            raise self._time_limit()

    def _time_limit(self) -> TimeLimitExceeded:
        return TimeLimitExceeded(self.deps.settings.job_time_limit_s)

    def __call__(self, stage: str, fraction: float, force: bool = False) -> None:
        changed = stage != self.stage
        if changed:
            self.clock.enter(stage)
        self.stage, self.fraction = stage, max(self.fraction, min(1.0, fraction))
        if force or changed or time.monotonic() - self.last_write >= PROGRESS_WRITE_EVERY_S:
            self._write()
        self.check()

    def log(self, line: str) -> None:
        """A line of the job's log (its SSE `log` events). A failed write never fails the job."""
        try:
            with self.lock:
                runner_api.log_line(sessions=self.deps.session_factory, job_id=self.job_id, token=self.token, line=line)
        except Exception:
            log.warning("job %s: log line not stored", self.job_id, exc_info=True)

    def span(self, start: float, width: float, prefix: str):
        """A progress function for one part of the job, mapping its own 0..1 into [start, start+width]."""
        return lambda stage, fraction: self(f"{prefix}:{stage}", start + width * max(0.0, min(1.0, fraction)))


def run_job(job_id: str, deps: RunnerDeps) -> Outcome:
    settings = deps.settings
    job = runner_api.claim(sessions=deps.session_factory, job_id=job_id, stale_after_s=settings.stale_job_after_s,
                           max_attempts=settings.max_job_attempts)
    if job is None:
        return Outcome.SKIPPED
    token = job.token
    # Every line logged for this job (this thread's, and the heartbeat's) carries the id of the
    # request that created it, as the API's lines for that request do.
    with bound(request_id=job.request_id, job_id=job_id):
        log.info("job %s: claimed (attempt %d, request %s)", job_id, job.attempts, job.request_id or "-")
        return _run_claimed(job, token, deps)


def _run_claimed(job: ClaimedJob, token: str, deps: RunnerDeps) -> Outcome:
    settings, job_id = deps.settings, job.id
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)

    def drop_checkpoints() -> None:
        try:  # checkpoints only serve a re-delivery of an unfinished job
            deps.store.delete_prefix(f"jobs/{job_id}/checkpoints/")
        except Exception:
            log.warning("job %s: checkpoints not deleted", job_id, exc_info=True)

    def finish(status: JobStatus, **values) -> None:
        runner_api.finish(sessions=deps.session_factory, job_id=job_id, token=token, status=status, **values)
        drop_checkpoints()

    progress: Progress | None = None
    try:
        with (Progress(deps, job_id, token) as progress, stopping_with(progress.runs),
              make_workdir(settings.tmp_dir, job_id, token) as tmp):
            progress.log(f"claimed by a worker (attempt {job.attempts})")
            metrics, failure = _execute(job, token, deps, progress, Path(tmp))
            if failure is not None:
                # The job failed its promise, but what it made is measured and stored.
                finish(JobStatus.FAILED, metrics=metrics, error_code=failure.code, error_message=failure.message)
                return Outcome.FAILED
            finish(JobStatus.SUCCEEDED, metrics=metrics)
        log.info("job %s: succeeded", job_id)
        return Outcome.SUCCEEDED
    except JobCancelled:
        finish(JobStatus.CANCELLED)
        return Outcome.CANCELLED
    except JobSuperseded:
        if progress is not None and progress.settled:
            # This delivery's heartbeat ended the job while a step was inside a long call: the job
            # is finished, so its checkpoints go as after any end.
            drop_checkpoints()
        return Outcome.RELEASED
    except WorkerStopping:
        return Outcome.RELEASED
    except EngineError as exc:
        finish(JobStatus.FAILED, error_code=exc.code, error_message=exc.message)
        return Outcome.FAILED
    except SoftTimeLimitExceeded:
        finish(JobStatus.FAILED, error_code="time_limit_exceeded", error_message="the job ran past its time limit")
        return Outcome.FAILED
    except Exception as exc:
        log.exception("job %s: unexpected failure", job_id)
        finish(JobStatus.FAILED, error_code="internal_error", error_message=f"{exc.__class__.__name__}: {str(exc)[:1000]}")
        return Outcome.FAILED


def _execute(job: ClaimedJob, token: str, deps: RunnerDeps, progress: Progress, work: Path) -> tuple[dict, EngineError | None]:
    """Inputs -> steps -> evaluation -> artifacts; the metrics, and the broken promise if one was:
    a guard not met, else a given task that does not fit the outputs, else the safety floor missed."""
    inputs = load_inputs(job, deps, progress, work)
    checks = run_preflight(inputs, progress)
    run = run_steps(job, inputs, deps.store, progress, work)
    task, floor = job.spec.get("task"), job.spec.get("floor", "default")
    evaluation = evaluate_job(inputs.original, run.current, run.last_result, inputs.eval_data, deps.settings.bench_threads,
                              progress.span(LOAD_SHARE + STEPS_SHARE, EVALUATE_SHARE, "evaluate"), task=task, floor=floor,
                              examples_dir=work / "examples")
    data_spec, split_spec = job.spec["data"], job.spec["data"].get("split")
    metrics = finite({
        "schema_version": METRICS_SCHEMA_VERSION,
        "model_id": job.model_id,
        "model_format": inputs.model.format,
        "eval_dataset": data_spec.get("eval") or (split_spec and f"{split_spec['dataset']} (held-out {split_spec['eval_fraction']:.0%})")
        or data_spec.get("calibration"),
        **evaluation,
        "preflight": checks,
        "steps": run.metrics,
    })
    verdict = safety_floor.judge(metrics["comparison"]["task"], floor)
    metrics["floor"] = verdict
    metrics["warnings"] = quality_warnings(metrics)
    metrics["timings"] = progress.clock.phases()  # up to here: storing the artifacts comes after
    failure = run.failure
    if failure is None and metrics["comparison"]["task"].get("fits") is False:
        failure = TaskDoesNotFitModel(f"the job's task does not fit the model: {metrics['comparison']['task']['note']}")
    if failure is None and safety_floor.failed(verdict):
        failure = FidelityFloorNotMet(safety_floor.message(verdict))
    progress("store", LOAD_SHARE + STEPS_SHARE + EVALUATE_SHARE)
    write_and_store(job, token, deps, work, metrics, run.current, run.last_result.artifacts if run.last_result else {})
    return metrics, failure
