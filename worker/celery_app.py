"""The Celery app of the worker processes: `celery -A worker.celery_app worker -Q cpu` (or gpu).

Tasks carry only a job id; the job's state lives in the database. acks_late with
reject_on_worker_lost re-delivers a job whose worker died; the runner's claim and heartbeat make
that re-delivery start cleanly, and a reaper thread re-queues jobs whose heartbeat went stale.
"""

import logging
import threading

from celery import Celery
from celery.signals import setup_logging, worker_process_init, worker_ready, worker_shutting_down
from sqlalchemy.exc import OperationalError

from service.config import get_settings
from service.db import make_engine, make_session_factory
from service.dispatch import RUN_JOB_TASK
from service.jobs import runner_api
from service.ops import logs
from service.storage import open_store
from worker.runner import Outcome, RunnerDeps, run_job
from worker.webhooks import WebhookSender
from worker.workdirs import remove_dead_workdirs

log = logging.getLogger(__name__)
settings = get_settings()
settings.load_plugins()

# After the runner's deadline: Celery's soft limit raises wherever Python resumes, even inside
# ONNX Runtime's quantizer, which would report it as that tool's failure.
SOFT_LIMIT_GRACE_S = 30

app = Celery("modelpress", broker=settings.broker_url or "memory://")
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue="cpu",
    # The runner's own deadline (Progress: at every progress check, and from the heartbeat, which
    # stops the job's ONNX Runtime runs) ends a job at job_time_limit_s and settles it; Celery's
    # limits are backstops for a step stuck where neither reaches (one long torch op).
    task_soft_time_limit=settings.job_time_limit_s + SOFT_LIMIT_GRACE_S,
    task_time_limit=settings.job_time_limit_s + 120,
    # The visibility timeout keeps the broker from handing a job to a second worker while the first
    # is still within its limit; the key prefix (when set) keeps deployments on one Redis apart.
    broker_transport_options=settings.broker_transport_options,
    broker_connection_retry_on_startup=True,
    # A broker outage does not stop a running job: its state and heartbeat live in the database, and
    # a message lost with the broker is sent again by the reaper (test_redis_outage.py). Celery 6
    # would cancel such tasks by default and redo them from their last checkpoint.
    worker_cancel_long_running_tasks_on_connection_loss=False,
    worker_send_task_events=False,
    task_ignore_result=True,
)



@setup_logging.connect
def _configure_logging(loglevel=None, **_):
    # Ours instead of Celery's: the API's format (MODELPRESS_LOG_FORMAT), with the job's request id.
    logs.configure(settings.log_format, logging.getLevelName(loglevel) if isinstance(loglevel, int) else (loglevel or "INFO"))


_deps: RunnerDeps | None = None


def deps() -> RunnerDeps:
    # Built per process, after the fork, so no database connection is shared between processes.
    global _deps
    if _deps is None:
        _deps = RunnerDeps(
            settings=settings,
            session_factory=make_session_factory(make_engine(settings.effective_database_url)),
            store=open_store(settings.effective_storage_url, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region),
        )
    return _deps


@worker_process_init.connect
def _reset_after_fork(**_):
    global _deps
    _deps = None


@app.task(name=RUN_JOB_TASK, bind=True, max_retries=20)
def run_job_task(self, job_id: str) -> str:
    try:
        outcome = run_job(job_id, deps())
    except OperationalError as exc:  # the database blinked before the job was claimed or finished
        raise self.retry(exc=exc, countdown=10)
    if outcome is Outcome.SKIPPED:
        if runner_api.is_held(sessions=deps().session_factory, job_id=job_id):
            # Another delivery holds the job. If its worker died, the heartbeat goes stale and
            # this delivery takes over on retry.
            raise self.retry(countdown=max(5, settings.stale_job_after_s // 2))
    return outcome


# Often enough that a dead worker's job is taken up within a minute of its last heartbeat.
REAP_EVERY_S = 10
# A queued job waits behind others as long as they run: sent again only after this long (a message
# lost with its broker), not at every reap.
QUEUED_RESEND_AFTER_S = 300


def _reap_forever(stop: threading.Event) -> None:
    """Re-queue running jobs whose heartbeat went stale, and send again jobs queued for longer than
    that (a message lost with its broker or its worker). Claims are exclusive, so a duplicate send
    does nothing."""
    while not stop.wait(REAP_EVERY_S):
        try:
            remove_dead_workdirs(session_factory=deps().session_factory, tmp_dir=settings.tmp_dir)
            sessions = deps().session_factory
            for job in runner_api.reap_stale(sessions=sessions, stale_after_s=settings.stale_job_after_s):
                log.warning("job %s: worker lost, re-queued", job.id)
                app.send_task(RUN_JOB_TASK, args=[job.id], queue=job.queue)
            for job in runner_api.queued(sessions=sessions, older_than_s=max(settings.stale_job_after_s, QUEUED_RESEND_AFTER_S)):
                app.send_task(RUN_JOB_TASK, args=[job.id], queue=job.queue)
        except Exception:
            log.warning("stale-job reaper failed", exc_info=True)


_reaper_stop = threading.Event()
# In the main process, like the reaper: one sender per worker host, whatever its concurrency.
_webhooks: WebhookSender | None = None


@worker_ready.connect
def _start_reaper(**_):
    global _webhooks
    threading.Thread(target=_reap_forever, args=(_reaper_stop,), name="stale-job-reaper", daemon=True).start()
    _webhooks = WebhookSender(settings=settings, session_factory=deps().session_factory)
    _webhooks.start()


@worker_shutting_down.connect
def _stop_reaper(**_):
    _reaper_stop.set()
    if _webhooks is not None:
        _webhooks.stop()
