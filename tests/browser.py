"""A headless chromium driven over the DevTools protocol, for the browser tests.

Chromium listens for DevTools on a port it picks (--remote-debugging-port=0
writes it to DevToolsActivePort in its profile folder); this client speaks
the protocol over that WebSocket with websocket-client: pages are targets
attached in flat mode, each command waits for its answer, and the events
that come in between are kept for the page they belong to (exceptions and
console errors, load events).
"""

import base64
import hashlib
import json
import os
import struct
import subprocess
import time
import zlib

from tests.helpers import wait_for

# What a test browser needs: no sandbox (the tests run as root in CI), no
# first-run or sync machinery, colours as sent (the pixel checks are exact).
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--no-first-run", "--no-default-browser-check", "--disable-extensions",
    "--disable-background-networking", "--disable-sync", "--disable-component-update",
    "--disable-features=Translate,MediaRouter,OptimizationHints",
    "--password-store=basic", "--use-mock-keychain", "--mute-audio",
    "--force-color-profile=srgb", "--window-size=1280,900", "--hide-scrollbars",
    "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
]


class DevToolsError(AssertionError):
    """A DevTools command answered with an error, or a page raised."""


class Chromium:
    """One headless chromium process and its DevTools connection."""

    def __init__(self, websocket, program, processes, profile, extra_flags=()):
        self._websocket = websocket
        self.profile = str(profile)
        argv = [program] + CHROMIUM_FLAGS + list(extra_flags) + [
            "--user-data-dir=%s" % self.profile, "about:blank"]
        self.proc = processes(argv, name="chromium")
        active = os.path.join(self.profile, "DevToolsActivePort")

        def ready():
            if self.proc.proc.poll() is not None:
                raise AssertionError("chromium exited:\n%s" % self.proc.log())
            try:
                with open(active) as handle:
                    lines = handle.read().split("\n")
            except OSError:
                return None
            return lines if len(lines) >= 2 and lines[1] else None

        port, path = wait_for(ready, timeout=30, what="chromium's DevTools port")[:2]
        # No Origin header: chromium refuses DevTools connections from origins
        # it was not told to allow.
        self.ws = websocket.create_connection("ws://127.0.0.1:%s%s" % (port, path),
                                              timeout=60, suppress_origin=True)
        self._next_id = 0
        self.events = []

    def call(self, method, session=None, timeout=30.0, **params):
        """The result of one DevTools command (raises DevToolsError on an error)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        deadline = time.time() + timeout
        while True:
            reply = self._receive(deadline, "the answer to %s" % method)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise DevToolsError("%s: %s" % (method, reply["error"]))
                return reply.get("result", {})

    def _receive(self, deadline, what):
        remaining = deadline - time.time()
        if remaining <= 0:
            raise AssertionError("timed out waiting for %s" % what)
        self.ws.settimeout(remaining)
        try:
            message = json.loads(self.ws.recv())
        except self._websocket.WebSocketTimeoutException:
            raise AssertionError("timed out waiting for %s" % what) from None
        if "method" in message:
            self.events.append(message)
        return message

    def wait_event(self, method, session=None, timeout=30.0, since=0):
        """The first event ``method`` (of page ``session``) from index ``since`` on."""
        deadline = time.time() + timeout
        index = since
        while True:
            while index < len(self.events):
                event = self.events[index]
                index += 1
                if event["method"] == method and (session is None
                                                  or event.get("sessionId") == session):
                    return event
            self._receive(deadline, "event %s" % method)

    def new_context(self) -> str:
        """A browser context of its own (like a separate browser profile)."""
        return self.call("Target.createBrowserContext")["browserContextId"]

    def close_context(self, context):
        """Close a context's pages and its connections (idle keep-alive ones too)."""
        self.call("Target.disposeBrowserContext", browserContextId=context)

    def new_page(self, context=None) -> "Page":
        params = {"url": "about:blank"}
        if context:
            params["browserContextId"] = context
        target = self.call("Target.createTarget", **params)["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        return Page(self, target, session)

    def close(self):
        try:
            self.call("Browser.close", timeout=10)
        except Exception:
            pass            # it may be gone already; the process is stopped anyway
        try:
            self.ws.close()
        except Exception:
            pass


class Page:
    """One tab: navigate, evaluate, type, click, screenshot; its errors kept."""

    def __init__(self, browser, target, session):
        self.browser = browser
        self.target = target
        self.session = session
        self.call("Page.enable")
        self.call("Runtime.enable")

    def call(self, method, **params):
        return self.browser.call(method, session=self.session, **params)

    def navigate(self, url, timeout=30.0):
        since = len(self.browser.events)
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise DevToolsError("navigating to %s: %s" % (url, result["errorText"]))
        self.browser.wait_event("Page.loadEventFired", self.session, timeout, since)

    def evaluate(self, expression, await_promise=True):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=await_promise)
        if "exceptionDetails" in result:
            raise DevToolsError("%s: %s" % (expression, describe_exception(
                result["exceptionDetails"])))
        return result["result"].get("value")

    def wait_js(self, expression, timeout=20.0, what=None):
        """Poll ``expression`` until it is truthy; its value."""
        return wait_for(lambda: self.evaluate(expression), timeout=timeout, interval=0.1,
                        what=what or expression)

    def errors(self) -> list:
        """Uncaught exceptions and console.error lines of this page, as text."""
        found = []
        for event in self.browser.events:
            if event.get("sessionId") != self.session:
                continue
            if event["method"] == "Runtime.exceptionThrown":
                found.append(describe_exception(event["params"]["exceptionDetails"]))
            elif (event["method"] == "Runtime.consoleAPICalled"
                  and event["params"]["type"] in ("error", "assert")):
                found.append(" ".join(str(arg.get("value", arg.get("description", "")))
                                      for arg in event["params"]["args"]))
        return found

    def click(self, x, y):
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                      clickCount=1 if kind != "mouseMoved" else 0)

    def click_element(self, selector, navigates=False, timeout=30.0):
        """A click at the middle of the element ``selector`` matches, once it
        is shown and stays in place (not sliding in); with ``navigates``, wait
        for the page it leads to to load."""
        where = ("(() => { const e = document.querySelector(%s);"
                 " if (!e) return null; const r = e.getBoundingClientRect();"
                 " return r.width ? [r.x, r.y, r.width, r.height] : null; })()"
                 % json.dumps(selector))
        seen = []

        def settled():
            seen.append(self.evaluate(where))
            return seen[-1] if len(seen) > 1 and seen[-1] and seen[-1] == seen[-2] else None

        rect = wait_for(settled, timeout=timeout, interval=0.1,
                        what="element %s shown and still" % selector)
        since = len(self.browser.events)
        self.click(int(rect[0] + rect[2] / 2), int(rect[1] + rect[3] / 2))
        if navigates:
            self.browser.wait_event("Page.loadEventFired", self.session, timeout, since)

    def type_text(self, text):
        """Key presses, one character at a time, as a keyboard sends them."""
        for char in text:
            self.press(char)

    def press(self, key):
        if key in ("\n", "Enter"):
            params = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13,
                      "text": "\r"}
        else:
            params = {"key": key, "text": key, "windowsVirtualKeyCode": key_code(key)}
            if key.isalpha() and key.isascii():
                params["code"] = "Key" + key.upper()
            elif key.isdigit():
                params["code"] = "Digit" + key
            elif key == " ":
                params["code"] = "Space"
            if key.isupper():
                params["modifiers"] = 8     # shift
        self.call("Input.dispatchKeyEvent", type="keyDown", **params)
        up = dict(params)
        up.pop("text", None)
        self.call("Input.dispatchKeyEvent", type="keyUp", **up)

    def pixels(self, x, y, width=4, height=4) -> set:
        """The distinct (r, g, b) colours of a screenshot of that area."""
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=False,
                         clip={"x": x, "y": y, "width": width, "height": height, "scale": 1})
        return set(png_pixels(base64.b64decode(shot["data"])))

    def close(self):
        self.browser.call("Target.closeTarget", targetId=self.target)


def describe_exception(details) -> str:
    exception = details.get("exception") or {}
    return "%s (%s:%s)" % (exception.get("description") or details.get("text"),
                           details.get("url", ""), details.get("lineNumber", ""))


def key_code(char) -> int:
    if char.isalnum() and char.isascii():
        return ord(char.upper())
    return {" ": 32, "-": 189, ".": 190, ",": 188, "/": 191}.get(char, 0)


def png_pixels(data: bytes) -> list:
    """[(r, g, b)] of an 8-bit RGB or RGBA PNG, row by row."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack("!I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack("!IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and not interlace, header
    channels = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * channels
    previous = bytearray(stride)
    pixels = []
    for row in range(height):
        kind = raw[row * (stride + 1)]
        line = bytearray(raw[row * (stride + 1) + 1:(row + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            corner = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                estimate = left + up - corner
                pa, pb, pc = abs(estimate - left), abs(estimate - up), abs(estimate - corner)
                best = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + best) & 0xFF
        pixels += [tuple(line[i:i + 3]) for i in range(0, stride, channels)]
        previous = line
    return pixels


def spki_hash(cert_path) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)) of a certificate, as
    --ignore-certificate-errors-spki-list takes it (made with openssl)."""
    public = subprocess.run(["openssl", "x509", "-in", cert_path, "-noout", "-pubkey"],
                            check=True, capture_output=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "der"], input=public,
                         check=True, capture_output=True).stdout
    return base64.b64encode(hashlib.sha256(der).digest()).decode()
