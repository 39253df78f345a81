"""Headless Chromium for tests, driven over the DevTools protocol (no npm, no webdriver).

``Browser.start(tmp)`` launches Debian's ``chromium`` with a fresh profile and
``--remote-debugging-port=0``, connects to it with trio-websocket, and opens pages in
which tests evaluate JavaScript and take screenshots. ``serve_files`` is a tiny static
HTTP server for test pages (loopback, bounded reads).
"""

from __future__ import annotations

import base64
import functools
import itertools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or ""
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
         "--disable-default-apps", "--mute-audio", "--hide-scrollbars"]


class Page:
    def __init__(self, browser: Browser, session: str) -> None:
        self._browser, self._session = browser, session

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        return await self._browser.call(method, session=self._session, **params)

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (awaited when it is a promise)."""
        reply = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in reply:
            raise AssertionError(f"JavaScript error: {json.dumps(reply['exceptionDetails'])[:2000]}")
        return reply["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 5.0, interval: float = 0.05) -> Any:
        with trio.fail_after(timeout):
            while True:
                value = await self.evaluate(expression)
                if value:
                    return value
                await trio.sleep(interval)

    async def screenshot(self, path: Path, width: int = 1200, height: int = 900) -> None:
        await self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                        mobile=False)
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)
        path.write_bytes(base64.b64decode(shot["data"]))  # noqa: ASYNC240 - a test helper, tiny file


class Browser:
    def __init__(self, proc: trio.Process, ws: WebSocketConnection) -> None:
        self._proc, self._ws = proc, ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[trio.Event, list[dict[str, Any]]]] = {}
        self.console: list[str] = []

    async def _reader(self) -> None:
        while True:
            message = json.loads(await self._ws.get_message())
            if "id" in message and message["id"] in self._waiting:
                done, box = self._waiting.pop(message["id"])
                box.append(message)
                done.set()
            elif message.get("method") == "Runtime.consoleAPICalled":
                args = message["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))

    async def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        done, box = trio.Event(), []
        self._waiting[ident] = (done, box)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        await self._ws.send_message(json.dumps(message))
        with trio.fail_after(10):
            await done.wait()
        reply = box[0]
        if "error" in reply:
            raise AssertionError(f"{method}: {reply['error']}")
        return dict(reply.get("result", {}))

    async def open(self, url: str) -> Page:
        target = await self.call("Target.createTarget", url="about:blank")
        attached = await self.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        page = Page(self, attached["sessionId"])
        await page.call("Runtime.enable")
        await page.call("Page.enable")
        await page.call("Page.navigate", url=url)
        await page.wait_for("document.readyState === 'complete'")
        return page


async def start_browser(nursery: trio.Nursery, profile: Path) -> Browser:
    """Launch chromium (fresh profile ``profile``) and connect; it is killed when ``nursery`` ends."""
    profile.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    proc = await trio.lowlevel.open_process(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = profile / "DevToolsActivePort"
    with trio.fail_after(20):
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
            if proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {proc.returncode}")
            await trio.sleep(0.05)
    port, path = port_file.read_text().split()[:2]
    ws = await nursery.start(_connect, f"ws://127.0.0.1:{port}{path}", proc)
    browser = Browser(proc, ws)
    nursery.start_soon(browser._reader)
    return browser


async def _connect(url: str, proc: trio.Process, task_status: trio.TaskStatus[WebSocketConnection]) -> None:
    try:
        async with open_websocket_url(url, max_message_size=64 * 1024 * 1024) as ws:
            task_status.started(ws)
            await trio.sleep_forever()
    finally:
        proc.kill()  # our own chromium, by its process handle
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await proc.wait()


async def serve_files(nursery: trio.Nursery, files: dict[str, tuple[str, bytes]]) -> str:
    """Serve ``{path: (content_type, body)}`` on a loopback port; the base URL."""

    async def handle(stream: trio.SocketStream) -> None:
        data = b""
        with trio.move_on_after(5):
            while b"\r\n\r\n" not in data and len(data) < 16384:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
        path = data.split(b" ", 2)[1].decode("latin-1").split("?")[0] if data.count(b" ") >= 2 else "/"
        found = files.get(path)
        if found is None:
            head, body = b"HTTP/1.1 404 Not Found\r\n", b"not found"
            kind = "text/plain"
        else:
            (kind, body), head = found, b"HTTP/1.1 200 OK\r\n"
        try:
            await stream.send_all(head + f"content-type: {kind}\r\ncontent-length: {len(body)}\r\n"
                                  "cache-control: no-store\r\nconnection: close\r\n\r\n".encode() + body)
        except trio.BrokenResourceError:
            pass
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    host, port = listeners[0].socket.getsockname()[:2]
    return f"http://{host}:{port}"
