"""`python -m service`: serve the API (what `make run` starts). PORT and HOST override the address."""

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
    uvicorn.run(app, host=os.environ.get("HOST", "127.0.0.1"), port=int(os.environ.get("PORT", "8000")), log_level="info")


if __name__ == "__main__":
    main()
