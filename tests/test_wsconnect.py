"""wsconnect.network_failure: what one upstream WebSocket session's failure may cost."""

from __future__ import annotations

import logging

import pytest
import trio

from edgestate.wsconnect import network_failure


def test_network_errors_are_retried_quietly(caplog):
    err = OSError("reset")
    with caplog.at_level(logging.ERROR, logger="edgestate.wsconnect"):
        assert network_failure(err) is err
        assert network_failure(ExceptionGroup("session", [err])) is err
    assert not caplog.records


def test_a_bug_on_one_session_costs_the_session_not_the_process(caplog):
    # A hostile upstream message that meets a bug must not reach the server's nursery.
    bug = KeyError("params")
    with caplog.at_level(logging.ERROR, logger="edgestate.wsconnect"):
        assert network_failure(bug) is bug
        assert network_failure(ExceptionGroup("session", [bug, OSError()])) is bug
    assert len(caplog.records) == 2 and caplog.records[0].exc_info is not None


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(1)])
def test_base_exceptions_propagate(exc):
    assert network_failure(exc) is None
    assert network_failure(BaseExceptionGroup("session", [exc, OSError()])) is None


async def test_cancellation_propagates():
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.sleep(1)
        except trio.Cancelled as cancelled:
            assert network_failure(cancelled) is None
            raise
