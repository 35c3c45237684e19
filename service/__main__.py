"""`python -m service`: serve the API (what `make run` starts). PORT and HOST (settings) set the address."""

import logging
import os

import uvicorn

from service.config import get_settings
from service.main import create_app


def main() -> None:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    app = create_app(settings)
    mode = "embedded worker, SQLite" if settings.embedded_worker else f"broker {settings.broker_url.split('@')[-1]}"
    logging.getLogger("modelpress").info("data in %s (%s)", settings.data_dir, mode)
    # No access log of headers or bodies: an Authorization header never reaches a log line.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")


if __name__ == "__main__":
    main()
