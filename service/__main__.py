"""`python -m service`: serve the API with a broker (production; `make run`'s embedded default is
`python -m worker.serve`, which adds the in-process worker). PORT and HOST (settings) set the address.

With a broker it starts `MODELPRESS_API_WORKERS` uvicorn processes (default: one per core, at most
4), each building its own app from the environment; the embedded default runs one."""

import logging
import os
import shutil
from pathlib import Path

import uvicorn

from service.config import get_settings
from service.main import create_app
from service.ops import logs

LOOPBACK = {"127.0.0.1", "::1"}


def main() -> None:
    serve(create_app)


def serve(app_factory) -> None:
    """Serve the app `app_factory(settings)` builds (`worker.serve` passes one with the embedded worker)."""
    settings = get_settings()
    # The same configuration for uvicorn (handed over below), so every API process logs alike.
    log_config = logs.configure(settings.log_format, os.environ.get("LOG_LEVEL", "INFO"))
    if settings.host in LOOPBACK and not settings.allowed_hosts:
        # Through the environment: with several API processes each builds its own settings.
        os.environ["MODELPRESS_ALLOWED_HOSTS"] = settings.allowed_hosts = ",".join(sorted(LOOPBACK | {"localhost"}))
    mode = "embedded worker, SQLite" if settings.embedded_worker else f"broker {settings.broker_url.split('@')[-1]}"
    workers = settings.effective_api_workers
    logging.getLogger("modelpress").info("data in %s (%s), %d API process(es)", settings.data_dir, mode, workers)
    # No access log of headers or bodies: an Authorization header never reaches a log line.
    # A client that opens a connection and sends nothing is closed after the keep-alive timeout;
    # slow headers and bodies beyond that are the reverse proxy's job in production (README).
    address = {"host": settings.host, "port": settings.port, "log_level": "info", "timeout_keep_alive": 5,
               "log_config": log_config}
    if workers == 1:
        uvicorn.run(app_factory(settings), **address)
    else:
        _share_http_metrics(settings)
        uvicorn.run("service.main:create_app", factory=True, workers=workers, **address)


def _share_http_metrics(settings) -> None:
    """Several API processes: each writes its HTTP counters into prometheus_client's multiprocess
    files, and a scrape of any process sums them. Set in the environment before the processes
    start (the library reads it at import); emptied first, counts of a previous run would add up."""
    folder = Path(settings.prometheus_multiproc_dir or settings.data_dir / "prometheus")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = settings.prometheus_multiproc_dir = str(folder)


if __name__ == "__main__":
    main()
