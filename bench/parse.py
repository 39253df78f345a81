"""Parse: CPU per request head, llhttp (httptools, what heads.py uses) vs h11 (what Hypercorn uses).

The choice of parser for the front door rests on this: the in-memory routes answer in
~100 µs of CPU a request, so a parser's cost shows directly in their requests/s.
"""

from __future__ import annotations

import timeit
from typing import Any

import h11
import httptools

from .common import log, machine, save_result

HEAD = (b"GET /api/state HTTP/1.1\r\nHost: edge.example\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n"
        b"Accept: application/json\r\nAccept-Language: en-US,en;q=0.9\r\nIf-None-Match: \"4f2a9c1d0e8b7a6f5e4d\"\r\n"
        b"Origin: https://app.example\r\nConnection: keep-alive\r\n\r\n")


class _Sink:
    def on_url(self, url: bytes) -> None: ...
    def on_header(self, name: bytes, value: bytes) -> None: ...


def _h11() -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
    conn.receive_data(HEAD)
    conn.next_event()
    conn.next_event()


def run(number: int = 20000) -> dict[str, Any]:
    parser = httptools.HttpRequestParser(_Sink())  # one per connection, reused as heads.py does
    rows = []
    for name, fn in (("llhttp (httptools), heads.py", lambda: parser.feed_data(HEAD)), ("h11 (new connection)", _h11)):
        best = min(timeit.repeat(fn, number=number, repeat=5)) / number
        rows.append({"parser": name, "us_per_head": round(best * 1e6, 2)})
        log(f"parse: {name}: {best * 1e6:.2f} µs per head")
    result = {"machine": machine(), "head_bytes": len(HEAD), "number": number, "rows": rows}
    save_result("parse", result)
    return result
