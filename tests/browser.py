"""Headless Chromium (Debian's ``chromium``) driven over the DevTools protocol.

Loads a page, collects console errors and uncaught exceptions, measures every
``<svg>`` and takes a full-page screenshot::

    python -m tests.browser PAGE.html OUT.png     # e.g. the README's docs/report.png
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from websockets.sync.client import connect

MEASURE_SVGS = """JSON.stringify(Array.from(document.querySelectorAll('svg')).map(s => {
  const r = s.getBoundingClientRect();
  return {width: r.width, height: r.height, marks: s.querySelectorAll('path,use').length};
}))"""


@dataclass
class PageCheck:
    svgs: list[dict]  # width, height, marks (drawn paths) of each <svg>
    errors: list[str] = field(default_factory=list)  # console errors, uncaught exceptions
    title: str = ""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise RuntimeError("no chromium: apt-get install chromium (.ci/run does)")
    return found


class _Session:
    def __init__(self, ws_url: str) -> None:
        self.ws = connect(ws_url, max_size=None, open_timeout=30)
        self.ids = itertools.count(1)
        self.events: list[dict] = []

    def call(self, method: str, timeout_s: float = 60.0, **params) -> dict:
        call_id = next(self.ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == call_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, event: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(e.get("method") == event for e in self.events):
            self.events.append(json.loads(self.ws.recv(timeout=deadline - time.monotonic())))


def check_page(url: str, screenshot: Path | None = None, width: int = 1100) -> PageCheck:
    """Open ``url`` in headless Chromium; optionally save a full-page PNG screenshot."""
    # Chromium's helper processes can still write to the profile after the browser exits.
    with tempfile.TemporaryDirectory(
        prefix="knowstream-chromium-", ignore_cleanup_errors=True
    ) as profile:
        proc = subprocess.Popen(
            [
                chromium(),
                "--headless=new",
                "--no-sandbox",  # CI runs as root
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            return _drive(proc, url, screenshot, width)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _drive(proc: subprocess.Popen, url: str, screenshot: Path | None, width: int) -> PageCheck:
    port = None
    for line in proc.stderr:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/…"
        if m := re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line):
            port = int(m.group(1))
            break
    if port is None:
        raise RuntimeError(f"chromium exited ({proc.wait()}) before its DevTools endpoint")
    # Keep reading its stderr: a full pipe would stall the browser.
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as r:
        page = next(t for t in json.load(r) if t["type"] == "page")
    s = _Session(page["webSocketDebuggerUrl"])
    try:
        for domain in ("Page", "Runtime", "Log"):
            s.call(f"{domain}.enable")
        s.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=900,
            deviceScaleFactor=1,
            mobile=False,
        )
        s.events.clear()
        s.call("Page.navigate", url=url)
        s.wait_for("Page.loadEventFired")
        value = s.call("Runtime.evaluate", expression=MEASURE_SVGS, returnByValue=True)
        check = PageCheck(json.loads(value["result"]["value"]))
        check.title = s.call("Runtime.evaluate", expression="document.title", returnByValue=True)[
            "result"
        ]["value"]
        if screenshot is not None:
            size = s.call("Page.getLayoutMetrics")["cssContentSize"]
            shot = s.call(
                "Page.captureScreenshot",
                format="png",
                captureBeyondViewport=True,
                clip={"x": 0, "y": 0, "width": width, "height": size["height"], "scale": 1},
            )
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        for e in s.events:
            params = e.get("params", {})
            if e.get("method") == "Runtime.exceptionThrown":
                check.errors.append(params["exceptionDetails"].get("text", "exception"))
            elif e.get("method") == "Runtime.consoleAPICalled" and params.get("type") == "error":
                check.errors.append(" ".join(str(a.get("value", "")) for a in params["args"]))
            elif e.get("method") == "Log.entryAdded" and params["entry"]["level"] == "error":
                check.errors.append(params["entry"].get("text", ""))
        return check
    finally:
        s.ws.close()


if __name__ == "__main__":
    page_file, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    result = check_page(page_file.as_uri(), out)
    print(f"{len(result.svgs)} svgs, errors: {result.errors or 'none'} -> {out}")
