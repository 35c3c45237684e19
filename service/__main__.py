"""`python -m service`: serve the API (what `make run` starts). PORT and HOST override the address."""

import logging
import os

import uvicorn

from service.config import get_settings
from service.main import create_app

LOOPBACK = {"127.0.0.1", "::1"}


def main() -> None:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    host = os.environ.get("HOST", "127.0.0.1")
    if host in LOOPBACK and not settings.allowed_hosts:
        settings.allowed_hosts = ",".join(sorted(LOOPBACK | {"localhost"}))
    app = create_app(settings)
    mode = "embedded worker, SQLite" if settings.embedded_worker else f"broker {settings.broker_url.split('@')[-1]}"
    logging.getLogger("modelpress").info("data in %s (%s)", settings.data_dir, mode)
    # A client that opens a connection and sends nothing is closed after the keep-alive timeout;
    # slow headers and bodies beyond that are the reverse proxy's job in production (README).
    uvicorn.run(app, host=host, port=int(os.environ.get("PORT", "8000")), log_level="info", timeout_keep_alive=5)


if __name__ == "__main__":
    main()
