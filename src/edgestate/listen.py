"""Listening sockets: bind parsing, SO_REUSEPORT, and the open-files limit."""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
from collections.abc import Awaitable, Callable

import trio

from .errors import ListenError

log = logging.getLogger("edgestate.listen")

BACKLOG = 4096  # connect bursts of thousands of WebSocket clients
# File descriptors kept for everything that is not a client connection (upstream
# sockets, logs, the listener itself, a worker's pipes).
FD_RESERVE = 64


def split_bind(bind: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 hosts in brackets) as (host, port)."""
    host, _, port = bind.rpartition(":")
    return host.strip("[]"), int(port)


async def open_listener(bind: str, *, reuse_port: bool = False) -> trio.SocketListener:
    """Bind ``HOST:PORT`` (port 0 picks a free one).

    Args:
        reuse_port: set SO_REUSEPORT, so that several processes (workers) listen on the
            same port and the kernel spreads new connections over them.

    Raises:
        ListenError: one line saying why (address in use, permission, bad host).
    """
    host, port = split_bind(bind)
    try:
        if reuse_port:
            listeners = [await _reuse_port_listener(host, port)]
        else:
            listeners = await trio.open_tcp_listeners(port, host=host, backlog=BACKLOG)
    except OSError as exc:
        why = {errno.EADDRINUSE: "address already in use", errno.EACCES: "permission denied"}.get(
            exc.errno or 0, exc.strerror or str(exc)
        )
        raise ListenError(f"cannot listen on {bind}: {why}") from None
    # One address (the first) is enough: bind is a single HOST:PORT.
    for extra in listeners[1:]:
        await extra.aclose()
    return listeners[0]


async def _reuse_port_listener(host: str, port: int) -> trio.SocketListener:
    family, type_, proto, _, addr = (
        await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    )[0]
    sock = trio.socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        await sock.bind(addr)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


def bound_url(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one; the limit now in force.

    systemd and most shells start a process at 1,024, which would silently cap a server
    near a thousand clients.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return hard if soft == resource.RLIM_INFINITY else soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft
    return hard


def connection_capacity(max_connections: int, max_clients: int) -> int:
    """The connections this process can really hold; warns once when config asks for more."""
    limit = raise_open_files_limit()
    usable = max(1, limit - FD_RESERVE)
    asked = {name: value for name, value in (("server.max_connections", max_connections),
                                               ("ws.max_clients", max_clients)) if value > usable}
    if asked:
        log.warning(
            "%s over the open-files limit of %d: this process holds at most %d connections "
            "(raise LimitNOFILE / ulimit -n, or run several workers)",
            " and ".join(f"{k} = {v}" for k, v in asked.items()), limit, usable,
        )
    return min(max_connections, usable)


def peer_of(stream: trio.SocketStream) -> tuple[str, int]:
    """The peer's (host, port) of a connection; ("?", 0) once the socket is gone."""
    try:
        host, port = stream.socket.getpeername()[:2]
        return str(host), int(port)
    except (OSError, ValueError):
        return "?", 0


_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_CAPACITY_LOG_EVERY = 60.0


async def accept_forever(listener: trio.SocketListener, handler: Callable[[trio.SocketStream], Awaitable[None]],
                         nursery: trio.Nursery) -> None:
    """Accept until cancelled; each connection is ``handler(stream)`` in ``nursery``.

    What ``trio.serve_listeners`` does, minus its per-connection wrapper frame (the
    handler closes its own stream): tracemalloc put that frame at 272 bytes per idle
    WebSocket client, ~3.5% of one. Out of file descriptors or kernel memory, it retries
    every 0.1 s and says so once a minute.
    """
    next_log = 0.0
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                now = trio.current_time()
                if now >= next_log:
                    next_log = now + _CAPACITY_LOG_EVERY
                    log.warning("accept failed: %s (at the open-files limit?); existing clients are served, "
                                "new ones wait in the backlog", os.strerror(exc.errno or 0))
                await trio.sleep(0.1)
                continue
            nursery.start_soon(handler, stream)
