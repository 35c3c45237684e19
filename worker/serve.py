"""The composition root of the embedded default (`make run`): the API with its jobs run on a worker
thread inside the same process. It is the one place that wires the worker into the API; `service/`
itself never imports `worker/` (an import contract checks it).

`python -m worker.serve` serves it; `create_app(settings)` builds it (tests, scripts). With a broker
configured the app is the same as `service.main.create_app` builds: jobs go to the Celery workers.
"""

from fastapi import FastAPI

from service.__main__ import serve
from service.config import Settings
from service.main import create_app as create_api_app
from worker.embedded import InProcessDispatcher


def in_process_dispatcher(settings: Settings, session_factory, store) -> InProcessDispatcher:
    return InProcessDispatcher(settings=settings, session_factory=session_factory, store=store)


def create_app(settings: Settings | None = None) -> FastAPI:
    return create_api_app(settings, embedded_worker=in_process_dispatcher)


def main() -> None:
    serve(create_app)


if __name__ == "__main__":
    main()
