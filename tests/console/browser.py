"""Headless Chromium driven over the DevTools protocol (a websocket): load a page, type,
click, read the DOM, take screenshots. Debian's /usr/bin/chromium; .ci/run installs it."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Every headless run in the tests: no GPU, no network of its own, no first-run work.
HEADLESS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FLAGS = [
    *HEADLESS,
    "--disable-extensions",
    "--remote-debugging-port=0",
    "--remote-allow-origins=*",
]
# Generous: the waits end as soon as the page shows what is awaited; these only bound a hang.
WAIT_S = float(os.environ.get("SORAI_BROWSER_WAIT_S", "180"))


def available() -> bool:
    return Path(CHROMIUM).exists()


class Browser:
    """One Chromium process with one tab; `shots`: where screenshots are written."""

    def __init__(self, profile: Path, shots: Path, width: int = 1280, height: int = 800) -> None:
        from websockets.sync.client import connect

        self.shots = shots
        shots.mkdir(parents=True, exist_ok=True)
        # stderr to a file, not a pipe: a pipe nobody reads would block Chromium once full.
        log = profile / "chromium.log"
        profile.mkdir(parents=True, exist_ok=True)
        with log.open("w") as sink:
            self.process = subprocess.Popen(
                [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                stdout=subprocess.DEVNULL,
                stderr=sink,
            )
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline and self.process.poll() is None:
            found = re.search(r"DevTools listening on (ws://\S+)", log.read_text())
            url = found.group(1) if found else time.sleep(0.05)
        if url is None:
            self.process.kill()
            raise RuntimeError(f"chromium gave no DevTools address: {log.read_text()[-2000:]}")
        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(connect(url, max_size=None, open_timeout=60))
        self.ids = itertools.count(1)
        self.errors: list[str] = []  # uncaught page exceptions and console errors
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)
        attached = self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}, False
        )
        self.session = attached["sessionId"]
        for domain in ("Page", "Runtime"):
            self.send(f"{domain}.enable")
        self.viewport(width, height)

    def send(self, method: str, params: dict | None = None, session: bool = True) -> dict:
        call_id = next(self.ids)
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv(timeout=WAIT_S))
            if reply.get("id") == call_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._event(reply)

    def _event(self, event: dict) -> None:
        params = event.get("params", {})
        if event.get("method") == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.errors.append(str(details.get("exception", {}).get("description") or details))
        elif event.get("method") == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(" ".join(str(a.get("value")) for a in params.get("args", [])))

    def viewport(self, width: int, height: int) -> None:
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def eval(self, expression: str) -> Any:
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})
        self.wait("document.readyState === 'complete'")

    def wait(self, expression: str, timeout: float = WAIT_S) -> Any:
        """The value of `expression` once it is truthy (polled); fails with the page's text."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                body = self.eval("document.body ? document.body.innerText : ''")
                raise AssertionError(
                    f"timed out waiting for {expression}; page errors {self.errors}; "
                    f"page text:\n{str(body)[:2000]}"
                )
            time.sleep(0.1)

    def _present(self, selector: str) -> None:
        self.wait(f"document.querySelector({json.dumps(selector)}) !== null")

    def text(self, selector: str) -> str | None:
        return self.eval(
            f"(e => e ? e.innerText : null)(document.querySelector({json.dumps(selector)}))"
        )

    def type(self, selector: str, text: str) -> None:
        """Focus `selector`, clear it and type `text` as keyboard input."""
        self._present(selector)
        found = f"document.querySelector({json.dumps(selector)})"
        self.eval(f"(e => {{ e.focus(); e.select && e.select(); }})({found})")
        self.send("Input.insertText", {"text": text})

    def click(self, selector: str) -> None:
        self._present(selector)
        self.eval(f"document.querySelector({json.dumps(selector)}).click()")

    def select(self, selector: str, value: str) -> None:
        self._present(selector)
        self.eval(
            f"(e => {{ e.value = {json.dumps(value)}; e.dispatchEvent(new Event('change', "
            f"{{bubbles: true}})); }})(document.querySelector({json.dumps(selector)}))"
        )

    def screenshot(self, name: str) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path = self.shots / f"{name}.png"
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self._stack.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
