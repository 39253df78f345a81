"""Reading an upstream response body with a size cap.

httpx's ``response.content`` / ``client.get()`` read a body whole, however long: an
endless or huge reply from a provider grows memory without bound (an endless price-API
body took the process to 5.5 GB). Callers send with ``stream=True`` (or
``client.stream()``) and read through :func:`read_capped`, which stops reading past the
cap; the time it may take is bounded by the caller's deadline around it.
"""

from __future__ import annotations

import httpx


async def read_capped(response: httpx.Response, limit: int) -> bytes | None:
    """The (decoded) body of a streamed ``response``, or None when it exceeds ``limit`` bytes.

    A ``Content-Length`` over the limit is refused before reading anything; otherwise
    reading stops at the first chunk that takes the total over the limit, so at most
    ``limit`` plus one chunk is ever held. The caller closes the response (the
    ``client.stream()`` context, or ``aclose()``), which drops the rest of the body.
    """
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
