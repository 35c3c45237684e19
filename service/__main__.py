"""`python -m service`: serve the API with a broker (production; `make run`'s embedded default is
`python -m worker.serve`, which adds the in-process worker). PORT and HOST (settings) set the address.

With a broker it starts `MODELPRESS_API_WORKERS` uvicorn processes (default: one per core, at most
4), each building its own app from the environment; the embedded default runs one."""

import logging
import os

import uvicorn

from service.config import get_settings
from service.main import create_app

LOOPBACK = {"127.0.0.1", "::1"}


def main() -> None:
    serve(create_app)


def serve(app_factory) -> None:
    """Serve the app `app_factory(settings)` builds (`worker.serve` passes one with the embedded worker)."""
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    if settings.host in LOOPBACK and not settings.allowed_hosts:
        # Through the environment: with several API processes each builds its own settings.
        os.environ["MODELPRESS_ALLOWED_HOSTS"] = settings.allowed_hosts = ",".join(sorted(LOOPBACK | {"localhost"}))
    mode = "embedded worker, SQLite" if settings.embedded_worker else f"broker {settings.broker_url.split('@')[-1]}"
    workers = settings.effective_api_workers
    logging.getLogger("modelpress").info("data in %s (%s), %d API process(es)", settings.data_dir, mode, workers)
    # No access log of headers or bodies: an Authorization header never reaches a log line.
    # A client that opens a connection and sends nothing is closed after the keep-alive timeout;
    # slow headers and bodies beyond that are the reverse proxy's job in production (README).
    address = {"host": settings.host, "port": settings.port, "log_level": "info", "timeout_keep_alive": 5}
    if workers == 1:
        uvicorn.run(app_factory(settings), **address)
    else:
        uvicorn.run("service.main:create_app", factory=True, workers=workers, **address)


if __name__ == "__main__":
    main()
