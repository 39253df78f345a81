"""A bare ASGI callable answering every request with fixed bytes (the body in $BENCH_BODY_FILE),
served by `hypercorn -k trio`: the framework-free ceiling of Hypercorn's trio worker, the
baseline issue 5 sets for GET /api/state ("at least the bare-ASGI rate in the same run")."""

import os

_BODY = open(os.environ.get("BENCH_BODY_FILE", "/dev/null"), "rb").read() or b"{}"
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(_BODY)).encode()),
            (b"cache-control", b"public, max-age=1, stale-while-revalidate=5")]


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _BODY})


async def _lifespan_app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    await app(scope, receive, send)


if __name__ == "__main__":  # python -m bench.bare_asgi HOST:PORT  (one process, no reloader, no access log)
    import sys

    import hypercorn.config
    import hypercorn.trio
    import trio

    cfg = hypercorn.config.Config()
    cfg.bind = [sys.argv[1]]
    cfg.backlog = 4096
    cfg.accesslog = None
    trio.run(hypercorn.trio.serve, _lifespan_app, cfg)
