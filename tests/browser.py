"""Headless Chromium for tests that look at a report as a reader does: a small Chrome DevTools Protocol client over
`--remote-debugging-pipe` (JSON messages ended by a NUL byte on the browser's fd 3 (in) and fd 4 (out)), so it
needs only the standard library and a `chromium` binary: no websocket package, no driver download.

    with Chromium() as browser:
        browser.open(Path("report.html"))
        browser.set_viewport(1280, 800)
        facts = browser.evaluate(LAYOUT_JS)
        browser.screenshot(Path("report.png"))

The browser comes from $LOCAUDIT_CHROMIUM, else the first of chromium, chromium-browser, google-chrome on PATH.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
ENABLE = "install Debian's browser (`apt-get install chromium`) or set LOCAUDIT_CHROMIUM=/path/to/chromium"

# What a reader would notice, measured in the page at the current viewport: every <img> decoded with a real size,
# and nothing wider than the window (the document's scroll width; each element's box and content, so that a
# scrolling box or a line running out of its box counts too: a reader should never scroll sideways).
LAYOUT_JS = """
(async () => {
  const imgs = Array.from(document.images);
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  await document.fonts.ready;
  const view = document.documentElement.clientWidth;
  const wide = [];
  for (const el of document.querySelectorAll('body, body *')) {
    const r = el.getBoundingClientRect();
    // its box past the window, or its content past its box and the window (a <pre> line that does not wrap)
    const spill = el.clientWidth > 0 && el.scrollWidth > el.clientWidth + 1 ? r.left + el.scrollWidth : r.right;
    if (r.width > 0 && (Math.max(r.right, spill) > view + 0.5 || r.left < -0.5)) {
      wide.push({tag: el.tagName.toLowerCase(), left: r.left, right: Math.max(r.right, spill),
                 overflowX: getComputedStyle(el).overflowX, text: (el.textContent || '').trim().slice(0, 60)});
    }
  }
  return {
    innerWidth: window.innerWidth,
    clientWidth: view,
    scrollWidth: document.documentElement.scrollWidth,
    scrollHeight: document.documentElement.scrollHeight,
    images: imgs.map(i => ({alt: i.alt, naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight,
                            width: i.getBoundingClientRect().width})),
    wide: wide,
  };
})()
"""


def find_chromium() -> str | None:
    """The browser to use: $LOCAUDIT_CHROMIUM if set (even when wrong, so a typo fails loudly), else one on PATH."""
    env = os.environ.get("LOCAUDIT_CHROMIUM")
    if env:
        return env
    return next((p for p in map(shutil.which, NAMES) if p), None)


class BrowserError(RuntimeError):
    pass


class Chromium:
    """One headless browser with one page; commands time out after `timeout` seconds with the browser's stderr."""

    def __init__(self, binary: str | None = None, timeout: float = 60.0):
        self.binary = binary or find_chromium()
        if not self.binary:
            raise BrowserError(f"no Chromium found: {ENABLE}")
        if not (os.path.isfile(self.binary) and os.access(self.binary, os.X_OK)):
            raise BrowserError(f"LOCAUDIT_CHROMIUM={self.binary} is not an executable file: {ENABLE}")
        self.timeout = timeout
        self._next_id = 0
        self._buf = b""
        self._events: list[dict] = []
        self.session: str | None = None
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Chromium":
        self._profile = tempfile.TemporaryDirectory(prefix="locaudit-chromium-")
        self._stderr = tempfile.TemporaryFile()
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # the protocol pipe must be the child's fd 3 (commands in) and fd 4 (replies out): copies above 4 first,
        # so that neither dup2 overwrites the other; the child keeps 3 and 4 (pass_fds) and closes the rest.
        # 3 and 4 are open here while Popen runs (if they were free, the pipes above took them), as pass_fds needs.
        hi_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD_CLOEXEC, 5)
        hi_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD_CLOEXEC, 5)

        def wire():
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        args = [self.binary, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check", "--hide-scrollbars",
                "--force-device-scale-factor=1", "--allow-file-access-from-files",
                f"--user-data-dir={self._profile.name}", "about:blank"]
        try:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=self._stderr, pass_fds=(3, 4), preexec_fn=wire)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        finally:
            for fd in (to_browser_r, from_browser_w, hi_r, hi_w):
                os.close(fd)
        try:
            target = self._send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
            self.session = self._send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                      session=False)["sessionId"]
            self._send("Page.enable")
            self._send("Runtime.enable")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                try:
                    self._send("Browser.close", session=False, timeout=5)
                except (BrowserError, OSError):
                    pass
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            for fd in (self._to_browser, self._from_browser):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._stderr.close()
            self._profile.cleanup()

    # -- protocol -------------------------------------------------------------------------------------------------

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-2000:]

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"Chromium did not answer in time; its stderr:\n{self._stderr_tail()}")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise BrowserError(f"Chromium closed the protocol pipe (exited?); its stderr:\n{self._stderr_tail()}")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def _send(self, method: str, params: dict | None = None, session: bool = True, timeout: float | None = None) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        try:
            os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        except BrokenPipeError:
            raise BrowserError(f"Chromium is not listening (exit code {self.proc.poll()}); its stderr:\n"
                               f"{self._stderr_tail()}") from None
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self._events.append(reply)

    def _wait_event(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            for i, ev in enumerate(self._events):
                if ev["method"] == method:
                    return self._events.pop(i)
            reply = self._read_message(deadline)
            if "method" in reply:
                self._events.append(reply)

    # -- page -----------------------------------------------------------------------------------------------------

    def open(self, path: Path) -> None:
        """Load a local file and wait for its load event (all images and styles fetched)."""
        self._events.clear()
        nav = self._send("Page.navigate", {"url": Path(path).resolve().as_uri()})
        if nav.get("errorText"):
            raise BrowserError(f"cannot open {path}: {nav['errorText']}")
        self._wait_event("Page.loadEventFired")

    def set_viewport(self, width: int, height: int) -> None:
        """A desktop window of this CSS size (scale 1, not mobile emulation)."""
        self._send("Emulation.setDeviceMetricsOverride",
                   {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def set_media(self, media: str) -> None:
        """Lay the page out for this CSS media type ("print": as it prints, `@media print` rules applied;
        "": the screen again)."""
        self._send("Emulation.setEmulatedMedia", {"media": media})

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (a promise is awaited); page exceptions raise."""
        res = self._send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in res:
            raise BrowserError(f"script failed: {res['exceptionDetails'].get('exception', res['exceptionDetails'])}")
        return res["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page at the current viewport width (taller than the window when the page is)."""
        size = self._send("Page.getLayoutMetrics")["cssContentSize"]
        data = self._send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path
