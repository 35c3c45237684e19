"""How an accepted job reaches a worker: a Celery message carrying its id, or, in the embedded
default, a worker thread inside the API process."""

import importlib
from typing import Protocol

from service.config import Settings

RUN_JOB_TASK = "modelpress.run_job"


class Dispatcher(Protocol):
    def enqueue(self, job_id: str, *, queue: str) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def ping(self) -> None: ...


class CeleryDispatcher:
    """Sends by task name, so the API needs none of the worker's code (nor torch)."""

    def __init__(self, broker_url: str, transport_options: dict | None = None):
        from celery import Celery

        self.app = Celery("modelpress-api", broker=broker_url)
        self.app.conf.update(broker_connection_retry_on_startup=True, broker_connection_timeout=5,
                             broker_transport_options=transport_options or {},
                             task_publish_retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5})

    def enqueue(self, job_id: str, *, queue: str) -> None:
        self.app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue, retry=True)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def ping(self) -> None:
        with self.app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=3)


def make_dispatcher(settings: Settings, session_factory, store) -> Dispatcher:
    if settings.broker_url:
        return CeleryDispatcher(settings.broker_url, settings.broker_transport_options)
    # Embedded default: the composition root is the one place the API reaches into the worker.
    embedded = importlib.import_module("worker.embedded")
    return embedded.InProcessDispatcher(settings=settings, session_factory=session_factory, store=store)
