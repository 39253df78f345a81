"""Every exception edgestate raises on purpose.

    EdgeStateError
    ├── ConfigError            bad config file, key or value (exit 2)
    ├── ListenError            the listening address cannot be bound (exit 1)
    ├── BadRequest             a client's request is refused: 4xx/5xx status, code, message
    ├── Overloaded             the upstream queue is full; retry later (HTTP 503)
    ├── RateLimited            a client is over its own request budget (HTTP 429)
    └── UpstreamError          the upstream answered badly or not at all (HTTP 502)
        ├── UpstreamTimeout    no answer within the deadline (HTTP 504)
        ├── UpstreamUnavailable every endpoint is down / connection refused (HTTP 502)
        └── RpcError           a JSON-RPC error object for this one call

Messages say what was wrong and which value was seen, and never hold a secret:
URLs are passed through :func:`edgestate.config.redact` before they reach a message.
"""

from __future__ import annotations


class EdgeStateError(Exception):
    """Base class of every error edgestate raises on purpose."""


class ConfigError(EdgeStateError):
    """The configuration is invalid; one line per problem, naming file, key, problem.

    ``problems`` lists them (one for most errors; every one found for a whole file).
    """

    def __init__(self, message: str, *, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems) if problems else [message]


class ListenError(EdgeStateError):
    """The listening address cannot be bound (busy, not permitted, unknown host)."""


class BadRequest(EdgeStateError):
    """A request refused before any route ran (malformed head, failed handshake).

    ``status`` is the HTTP status to answer, ``code`` the contract's error code.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Overloaded(EdgeStateError):
    """Too much queued work: the caller should retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(EdgeStateError):
    """A client exceeded its request budget."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamError(EdgeStateError):
    """The upstream failed: bad status, malformed body, or a transport error."""

    retryable: bool = True


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer within the deadline."""


class UpstreamUnavailable(UpstreamError):
    """No upstream endpoint could be reached."""


class RpcError(UpstreamError):
    """The upstream answered this call with a JSON-RPC error object.

    ``code`` and ``message`` are the provider's. Errors that are the caller's fault
    (invalid params, method not found, ...) are not retryable.
    """

    # JSON-RPC codes that retrying cannot fix.
    _CALLER_FAULTS = frozenset({-32600, -32601, -32602, -32700})

    def __init__(self, code: int, message: str, data: object = None) -> None:
        super().__init__(f"RPC error {code}: {message}")
        self.code = code
        self.rpc_message = message
        self.data = data
        self.retryable = code not in self._CALLER_FAULTS and code != -32002
