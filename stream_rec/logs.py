"""Log output for every ``stream-rec`` command: plain text, or one JSON object per line.

JSON lines (``log_format = "json"``, ``STREAM_REC_LOG_FORMAT=json``) are what
cluster log collectors parse without a custom pattern: each line holds the
time (UTC, ISO 8601, milliseconds), level, logger, message, the process id,
and the exception's traceback when there is one.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NOISY = ("kafka", "httpx", "faiss")  # libraries whose INFO lines drown ours


class JsonFormatter(logging.Formatter):
    """One JSON object per record; never raises on odd arguments."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return json.dumps(data, ensure_ascii=False, default=str)


def resolve(level: str | None = None, fmt: str | None = None) -> tuple[str, str]:
    """Level and format: explicit arguments, else the settings (file and environment).

    Settings that do not load fall back to ``INFO``/text here; the command itself
    loads them again and reports the problem as its one-line error.
    """
    if level and fmt:
        return level, fmt
    try:
        from stream_rec.settings import Settings

        settings = Settings()
        return level or settings.log_level, fmt or settings.log_format
    except (ValueError, OSError):
        return level or "INFO", fmt or "text"


def configure_logging(level: str | None = None, fmt: str | None = None) -> str:
    """Configure the root logger on stderr; returns the format in effect.

    Like :func:`logging.basicConfig`, it leaves a root logger that already has
    handlers (an embedding application's, a test runner's) as it is.
    """
    level, fmt = resolve(level, fmt)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
    root = logging.getLogger()
    if root.handlers:
        return fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())
    return fmt


def uvicorn_log_config(fmt: str | None = None) -> dict[str, Any]:
    """uvicorn's logging config in our format (its own default is a text layout).

    A plain dict naming the formatter by import path, so that server processes
    uvicorn spawns (``serve.workers`` > 1) build the same formatter.
    """
    fmt = fmt or resolve("INFO", None)[1]
    formatter: dict[str, Any] = ({"()": f"{__name__}.JsonFormatter"} if fmt == "json"
                                 else {"format": TEXT_FORMAT})
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "default",
                                 "stream": "ext://sys.stderr"}},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["default"], "level": "INFO", "propagate": False},
        },
    }
