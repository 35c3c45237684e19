"""Log lines as JSON objects (MODELPRESS_LOG_FORMAT=json) or readable text, with the request id.

One `logging_config` serves the API (also handed to uvicorn, so every API process, spawned or not,
logs alike) and the Celery worker (its `setup_logging` signal), so one request id is found in both.
"""

import json
import logging
import logging.config
import traceback
from datetime import datetime, timezone

from service.ops.context import job_id_var, request_id_var

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


class ContextFilter(logging.Filter):
    """Puts the current request id and job id on every record (`-` when there is none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = request_id_var.get() or "-"
        if not getattr(record, "job_id", None):
            record.job_id = job_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, job_id, exception."""

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        entry = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": None if request_id in (None, "-") else request_id,
        }
        if getattr(record, "job_id", None):
            entry["job_id"] = record.job_id
        if record.exc_info:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info))[-8000:]
        return json.dumps(entry, default=str)


def logging_config(log_format: str, level: str = "INFO") -> dict:
    """A logging.config.dictConfig: one stderr handler on the root logger; uvicorn's and Celery's
    loggers pass their records up to it."""
    formatter = {"()": "service.ops.logs.JsonFormatter"} if log_format == "json" else {"format": TEXT_FORMAT}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": "service.ops.logs.ContextFilter"}},
        "formatters": {"main": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "main", "filters": ["context"],
                                "stream": "ext://sys.stderr"}},
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {name: {"handlers": [], "propagate": True} for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }


def configure(log_format: str, level: str = "INFO") -> dict:
    config = logging_config(log_format, level)
    logging.config.dictConfig(config)
    return config
