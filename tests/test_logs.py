"""Logs people can read and machines can parse."""

from __future__ import annotations

import io
import json
import logging

import httpx
import pytest

from edgestate import logs
from edgestate.config import LogConfig
from edgestate.telemetry import describe
from tests.conftest import make_config, start_server, wait_for

FAR = {"polling_interval": 3600.0, "participants_interval": 3600.0, "price_interval": 3600.0}
LOGGERS = ("edgestate", "hypercorn.error", "trio.serve_listeners", "edgestate.access")


@pytest.fixture
def captured():
    """logs.setup() into a buffer; the loggers as they were afterwards (caplog relies on them)."""
    saved = {name: (list(lg.handlers), lg.level, lg.propagate, lg.disabled)
             for name in LOGGERS for lg in [logging.getLogger(name)]}
    buffer = io.StringIO()

    def setup(**kwargs: object) -> io.StringIO:
        logs.setup(LogConfig(**kwargs), stream=buffer)  # type: ignore[arg-type]
        return buffer

    yield setup
    logs.set_worker(None)
    for name, (handlers, level, propagate, disabled) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers[:], lg.propagate, lg.disabled = handlers, propagate, disabled
        lg.setLevel(level)


def test_json_lines_have_fields_and_worker(captured):
    out = captured(format="json", level="debug")
    logs.set_worker("2")
    logging.getLogger("edgestate.access").disabled = False
    logging.getLogger("edgestate.access").info("x", extra={"method": "GET", "path": "/api/state", "status": 200,
                                                           "duration_ms": 0.1, "peer": "192.0.2.1"})
    doc = json.loads(out.getvalue().splitlines()[-1])
    assert doc["event"] == "x" and doc["level"] == "info" and doc["logger"] == "edgestate.access"
    assert doc["ts"].endswith("Z") and "T" in doc["ts"]
    assert (doc["method"], doc["path"], doc["status"], doc["duration_ms"], doc["peer"], doc["worker"]) == (
        "GET", "/api/state", 200, 0.1, "192.0.2.1", "2")


def test_text_lines_carry_the_worker(captured):
    out = captured(format="text")
    logs.set_worker("feed")
    logging.getLogger("edgestate.server").info("hello")
    assert "edgestate.server [worker feed]: hello" in out.getvalue()


async def test_access_log_in_json_has_request_fields(captured, nursery, sim):
    out = captured(format="json", level="info", access=True)
    server = await start_server(nursery, make_config(sim.url, state=FAR))
    await wait_for(lambda: server.services.state.ready()[0])
    async with httpx.AsyncClient(base_url=server.url) as client:
        await client.get("/api/state")
        await client.get("/health")
    await server.shutdown()
    access = [json.loads(line) for line in out.getvalue().splitlines() if '"edgestate.access"' in line]
    by_path = {doc["path"]: doc for doc in access}
    for path in ("/api/state", "/health"):
        doc = by_path[path]
        assert doc["method"] == "GET" and doc["status"] == 200 and doc["peer"] == "127.0.0.1"
        assert isinstance(doc["duration_ms"], float)


def test_describe_never_dumps_a_repr():
    class Reason:
        code, name, reason = 1006, "ABNORMAL_CLOSURE", None

        def __repr__(self) -> str:
            return "CloseReason<code=1006, name=ABNORMAL_CLOSURE, reason=None>"

    class ConnectionClosed(Exception):
        def __init__(self) -> None:
            super().__init__(Reason())
            self.reason = Reason()

    assert describe(ConnectionClosed()) == "connection closed (1006 ABNORMAL_CLOSURE)"
    assert describe(TimeoutError()) == "TimeoutError"
    assert describe(ValueError("bad\nsecond line")) == "bad"
