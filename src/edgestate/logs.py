"""Logging: one line per event on stderr, as text for people or JSON for shippers."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

from .config import LogConfig

# Last line of defence: whatever a message holds, credentials in URLs are masked.
_SECRET = re.compile(r"((?:api[-_]?key|token|secret|password)=)[^&\s\"']+", re.I)


def scrub(text: str) -> str:
    """Mask ``api-key=...``-style credentials anywhere in ``text``."""
    return _SECRET.sub(r"\1***", text)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname:<7} {record.name}: {record.getMessage()}"
        if record.exc_info and record.levelno >= logging.ERROR:
            # Unexpected failures keep their traceback for the operator, on stderr only.
            line += "\n" + self.formatException(record.exc_info)
        return scrub(line)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        if record.exc_info and record.levelno >= logging.ERROR:
            doc["exc"] = scrub(self.formatException(record.exc_info))
        return json.dumps(doc, default=str)


def setup(cfg: LogConfig, stream: object = None) -> None:
    """Route the ``edgestate`` loggers (and Hypercorn's errors) to stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(_JsonFormatter() if cfg.format == "json" else _TextFormatter())
    for name in ("edgestate", "hypercorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(cfg.level.upper())
        logger.propagate = False
    # httpx logs every request URL at INFO, API keys included: keep it to warnings.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    access = logging.getLogger("edgestate.access")
    access.disabled = not cfg.access
