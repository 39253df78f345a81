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


# This process's member id in a worker group ("feed", "0", "1", ...): on every line.
_worker: str | None = None

# Structured fields a record may carry (logger.info(..., extra={...})); JSON writes them as
# keys, text appends the ones its message does not already say.
FIELDS = ("method", "path", "status", "duration_ms", "peer")


def set_worker(member: str | None) -> None:
    """Tag every following log line of this process with its worker id (None: no tag)."""
    global _worker
    _worker = member


def _rfc3339(created: float) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{stamp}.{int(created * 1000) % 1000:03d}Z"


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        worker = f" [worker {_worker}]" if _worker is not None else ""
        line = f"{_rfc3339(record.created)} {record.levelname:<7} {record.name}{worker}: {record.getMessage()}"
        if record.exc_info and record.levelno >= logging.ERROR:
            # Unexpected failures keep their traceback for the operator, on stderr only.
            line += "\n" + self.formatException(record.exc_info)
        return scrub(line)


class _JsonFormatter(logging.Formatter):
    """One JSON object a line: ts (RFC 3339), level, logger, event, the structured fields, worker."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": scrub(record.getMessage()),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                doc[name] = scrub(value) if isinstance(value, str) else value
        if _worker is not None:
            doc["worker"] = _worker
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
