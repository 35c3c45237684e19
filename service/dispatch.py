"""How an accepted job reaches a worker: a Celery message carrying its id, or, in the embedded
default, a worker thread inside the API process."""

from collections.abc import Callable
from typing import Any, Protocol

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


# Builds the dispatcher of the embedded default (no broker) from the app's settings, database and
# storage. The composition root (`worker/serve.py`) hands one in: the API itself never imports the worker.
DispatcherFactory = Callable[[Settings, Any, Any], Dispatcher]


class EmbeddedWorkerMissing(RuntimeError):
    """No broker is configured and no in-process worker was handed in."""


def make_dispatcher(settings: Settings, session_factory, store, embedded: DispatcherFactory | None) -> Dispatcher:
    if settings.broker_url:
        return CeleryDispatcher(settings.broker_url, settings.broker_transport_options)
    if embedded is None:
        raise EmbeddedWorkerMissing(
            "no BROKER_URL and no in-process worker: start the embedded default with `python -m worker.serve` "
            "(what `make run` does), or set BROKER_URL and run Celery workers")
    return embedded(settings, session_factory, store)
