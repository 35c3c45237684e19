"""The embedded default: jobs run on one worker thread inside the API process (no broker)."""

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from service.config import Settings
from service.jobs import runner_api
from service.storage import ObjectStore
from worker.runner import RunnerDeps, run_job
from worker.webhooks import WebhookSender
from worker.workdirs import remove_dead_workdirs

log = logging.getLogger(__name__)


class InProcessDispatcher:
    def __init__(self, *, settings: Settings, session_factory, store: ObjectStore):
        self.deps = RunnerDeps(settings=settings, session_factory=session_factory, store=store)
        self.executor: ThreadPoolExecutor | None = None
        self.webhooks = WebhookSender(settings=settings, session_factory=session_factory)

    def start(self) -> None:
        self.deps.stopping = threading.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="modelpress-worker")
        # Nothing else runs this database's jobs: whatever was running when the last process
        # stopped is taken up again, and queued jobs are queued again.
        requeued = runner_api.reap_stale(sessions=self.deps.session_factory, stale_after_s=0)
        pending = [job.id for job in runner_api.queued(sessions=self.deps.session_factory)]
        if requeued:
            log.info("taking up %d job(s) left running by the previous process", len(requeued))
        remove_dead_workdirs(session_factory=self.deps.session_factory, tmp_dir=self.deps.settings.tmp_dir)
        for job_id in pending:
            self.executor.submit(self._run, job_id)
        # After the jobs: deliveries left by the previous process go out now.
        self.webhooks.start()

    def _run(self, job_id: str) -> None:
        try:
            run_job(job_id, self.deps)
        except Exception:
            log.exception("job %s: runner crashed", job_id)

    def enqueue(self, job_id: str, *, queue: str) -> None:
        if self.executor is None:
            raise RuntimeError("the embedded worker is not running")
        self.executor.submit(self._run, job_id)

    def stop(self) -> None:
        self.deps.stopping.set()
        self.webhooks.stop()
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None

    def ping(self) -> None:
        if self.executor is None:
            raise RuntimeError("the embedded worker is not running")
