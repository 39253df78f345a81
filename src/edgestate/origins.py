"""The Origin allowlist (``server.allowed_origins``), one matcher for CORS and /ws.

An entry is ``"*"`` (any origin), an exact origin (``https://app.example``,
``http://localhost:5173``) or a pattern with one ``*`` as its leftmost host label
(``https://*.example.com``: any subdomain, at any depth, not the apex). An origin has a
scheme and a host, maybe a port, and nothing else: a path, even a trailing ``/``, is a
mistake browsers never send, so :func:`check_entry` rejects it at config time.
"""

from __future__ import annotations

import functools
import re

_ORIGIN = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<host>\[[0-9a-f:.]+\]|[a-z0-9*_.-]+)(?P<port>:[0-9]{1,5})?$")


def check_entry(entry: str) -> str | None:
    """Why ``entry`` is not a valid allowlist entry; None when it is."""
    if entry == "*":
        return None
    if "://" not in entry:
        return f"{entry!r} has no scheme: write it as a browser sends it, e.g. 'https://{entry.strip('/')}'"
    scheme, rest = entry.split("://", 1)
    if "/" in rest or "?" in rest or "#" in rest:
        return (f"{entry!r} has a path: an origin is scheme://host[:port] with no trailing slash, "
                f"e.g. {scheme + '://' + rest.split('/')[0]!r}")
    match = _ORIGIN.match(entry.lower())
    if match is None:
        return f"{entry!r} is not an origin (expected scheme://host[:port])"
    host = match["host"]
    if "*" in host and (not host.startswith("*.") or "*" in host[2:] or host.count(".") < 2):
        return f"{entry!r}: a wildcard must be the leftmost label of a domain, e.g. 'https://*.example.com'"
    return None


class OriginPolicy:
    """Which request origins are allowed.

    Args:
        entries: the allowlist; empty (or holding ``"*"``) allows any origin.
    """

    def __init__(self, entries: tuple[str, ...] | list[str]) -> None:
        cleaned = [e.strip().lower() for e in entries if e.strip()]
        self.any = not cleaned or "*" in cleaned
        self._exact = frozenset(e for e in cleaned if "*" not in e)
        # "https://*.example.com" -> ("https://", ".example.com", ""): scheme, host suffix, port.
        self._patterns: list[tuple[str, str, str]] = []
        for entry in cleaned:
            if entry != "*" and "*" in entry:
                scheme, rest = entry.split("://", 1)
                host, _, port = rest.partition(":")
                self._patterns.append((scheme + "://", host[1:], ":" + port if port else ""))

    def allows(self, origin: str | None) -> bool:
        """Whether a request with this ``Origin`` header may be answered (None: no header)."""
        if self.any:
            return True
        if not origin:
            return False
        origin = origin.lower()
        if origin in self._exact:
            return True
        for scheme, suffix, port in self._patterns:
            if not origin.startswith(scheme):
                continue
            host_port = origin[len(scheme):]
            host, _, rest = host_port.partition(":")
            if (":" + rest if rest else "") != port or "/" in host_port:
                continue
            if host.endswith(suffix) and len(host) > len(suffix) and not host.startswith("."):
                return True
        return False


@functools.lru_cache(maxsize=8)
def policy_for(entries: tuple[str, ...]) -> OriginPolicy:
    """The (cached) policy of a config's ``server.allowed_origins``."""
    return OriginPolicy(entries)
