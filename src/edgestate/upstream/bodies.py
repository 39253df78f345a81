"""Reading an upstream response body with a size cap.

httpx's ``response.content`` / ``client.get()`` read a body whole, however long: an
endless or huge reply from a provider grows memory without bound (an endless price-API
body took the process to 5.5 GB). Callers send with ``stream=True`` (or
``client.stream()``) and read through :func:`read_capped`, which stops reading past the
cap; the time it may take is bounded by the caller's deadline around it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

_DRAIN_STEPS = 64  # after closing, a transport holds at most a read's worth of buffered chunks


async def read_capped(response: httpx.Response, limit: int) -> bytes | None:
    """The (decoded) body of a streamed ``response``, or None when it exceeds ``limit`` bytes.

    A ``Content-Length`` over the limit is refused before reading anything; otherwise
    reading stops at the first chunk that takes the total over the limit, so at most
    ``limit`` plus one chunk is ever held. Over the limit the response is closed here
    (which drops the connection); otherwise the caller closes it as usual.
    """
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        await response.aclose()
        return None
    chunks: list[bytes] = []
    size = 0
    body = response.aiter_bytes()
    async for chunk in body:
        size += len(chunk)
        if size > limit:
            await _abandon(response, body)
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _abandon(response: httpx.Response, body: AsyncIterator[bytes]) -> None:
    """Close ``response`` mid-body, then run its iterator to the end.

    httpx and httpcore stream through a chain of async generators; one left suspended
    is finalized by the garbage collector, and Trio warns about each (encode/httpx
    #3686). Reading on after the close ends the chain from the inside: the transport
    yields what it had buffered, then fails (or stops) and every generator finishes.
    """
    await response.aclose()
    try:
        for _ in range(_DRAIN_STEPS):
            await body.__anext__()
    except (StopAsyncIteration, httpx.HTTPError, httpx.StreamError):
        return
    aclose = getattr(body, "aclose", None)
    if aclose is not None:  # a transport that ignores close: end what we can
        await aclose()
