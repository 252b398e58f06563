"""In a real browser: Debian's headless chromium over the DevTools protocol.

The `make run` demo page, Debian's noVNC (/usr/share/novnc) served by --web
against TigerVNC desktops painted a known colour (directly, through a token
file, over wss://, behind nginx as the seed blog sets it up), keyboard input
reaching an xterm on the desktop, and a --record file played back by noVNC.
One chromium, and one Xvnc per colour, for the whole module.

Skipped, with the reason, where chromium (or, per test, noVNC, TigerVNC,
the X tools or nginx) is missing; under CI=true those fail instead.
"""

import os
import re
import shutil
import subprocess

import pytest

from tests.browser import Chromium, spki_hash
from tests.helpers import (PYTHON, free_port, port_open, require_module, require_program,
                           skip_or_fail, start_nginx, wait_for)

TIMEOUT = 20.0


@pytest.fixture(scope="module")
def chromium_program():
    return require_program("chromium", "chromium")


@pytest.fixture(scope="module")
def browser(chromium_program, module_processes, tmp_path_factory, pki):
    websocket = require_module("websocket", "pip install websocket-client")
    # The wss:// tests' server certificate is trusted by its key's hash.
    flags = ["--ignore-certificate-errors-spki-list=%s" % spki_hash(pki.server.cert)]
    chromium = Chromium(websocket, chromium_program, module_processes,
                        tmp_path_factory.mktemp("chromium-profile"), flags)
    yield chromium
    chromium.close()


@pytest.fixture
def page(browser, processes):
    """A tab in a browser context of its own. Closed (after processes: before
    the servers it used are stopped) with its context, which closes the
    context's connections, the idle keep-alive ones too."""
    context = browser.new_context()
    yield browser.new_page(context)
    browser.close_context(context)


# -- the make run demo ----------------------------------------------------------------

def test_demo_page_echoes_a_typed_message(page, processes):
    port, target = free_port(), free_port()
    # What `make run` starts (python -m websockify.demo PORT TARGET_PORT).
    processes([PYTHON, "-m", "websockify.demo", str(port), str(target)], name="demo")
    wait_for(lambda: port_open(port) and port_open(target), what="the demo")
    page.navigate("http://127.0.0.1:%d/" % port)
    page.wait_js("document.getElementById('status').textContent.startsWith('connected')",
                 what="the demo page's WebSocket open")
    assert page.evaluate("document.getElementById('status').textContent") == \
        "connected (subprotocol: binary)"
    page.evaluate("(() => { const t = document.getElementById('text');"
                  " t.focus(); t.select(); })()")
    page.type_text("Hi from chromium 42")
    page.press("Enter")
    got = page.wait_js("[...document.querySelectorAll('#log .got')]"
                       ".map(d => d.textContent).join('\\n')", what="the echo")
    assert got == "\u2190 19 bytes: Hi from chromium 42"
    assert page.evaluate("[...document.querySelectorAll('#log .sent')]"
                         ".map(d => d.textContent).join('\\n')") == \
        "\u2192 19 bytes: Hi from chromium 42"
    assert page.errors() == []


# -- TigerVNC desktops and noVNC -------------------------------------------------------

NOVNC = "/usr/share/novnc"
ALICE, BOB = (0x33, 0x66, 0x99), (0x99, 0x33, 0x66)     # their root windows' colours


class Desktop:
    """An Xvnc display (no authentication, loopback only) with its root window
    painted ``colour``."""

    def __init__(self, processes, colour, name):
        xvnc = require_program("Xvnc", "tigervnc-standalone-server")
        xsetroot = require_program("xsetroot", "x11-xserver-utils")
        self.colour = colour
        self.display = ":%d" % free_display()
        self.port = free_port()
        self.proc = processes([xvnc, self.display, "-geometry", "1024x768", "-depth", "24",
                               "-SecurityTypes", "None", "-rfbport", str(self.port),
                               "-localhost", "-nolisten", "tcp", "-AlwaysShared",
                               "-desktop", name], name="xvnc")
        wait_for(lambda: port_open(self.port) or self.proc.proc.poll() is not None,
                 what="Xvnc %s on port %d" % (self.display, self.port))
        assert self.proc.proc.poll() is None, self.proc.log()
        self.x11(xsetroot, "-solid", "#%02x%02x%02x" % colour)

    def env(self):
        return dict(os.environ, DISPLAY=self.display)

    def x11(self, *argv, timeout=20):
        """Run an X client on this display; its standard output."""
        result = subprocess.run(list(argv), env=self.env(), capture_output=True, text=True,
                                timeout=timeout)
        assert result.returncode == 0, (argv, result.stderr)
        return result.stdout


def free_display() -> int:
    """A display number with neither an X socket nor a lock file."""
    for number in range(60, 200):
        if not (os.path.exists("/tmp/.X11-unix/X%d" % number)
                or os.path.exists("/tmp/.X%d-lock" % number)):
            return number
    raise AssertionError("no free X display number")


@pytest.fixture(scope="module")
def novnc():
    if not os.path.isfile(os.path.join(NOVNC, "vnc.html")):
        skip_or_fail("noVNC is not installed (Debian package novnc)")
    return NOVNC


@pytest.fixture(scope="module")
def alice(module_processes):
    return Desktop(module_processes, ALICE, "alice")


@pytest.fixture(scope="module")
def bob(module_processes):
    return Desktop(module_processes, BOB, "bob")


def connect_novnc(page, url, timeout=TIMEOUT):
    """Open noVNC's vnc.html at ``url`` and wait until it is connected."""
    page.navigate(url)
    page.wait_js("document.documentElement.classList.contains('noVNC_connected')",
                 timeout=timeout, what="noVNC connected at %s (status: %s)" % (url, ""))


# Debian's novnc leaves out the package.json that vnc.html reads its version
# from: the 404 (websockify's right answer) is logged as a console error.
DEBIAN_NOVNC_ERRORS = {"Couldn't fetch package.json: Error: 404 Not Found"}


def novnc_errors(page) -> list:
    """The page's errors, less the one Debian's noVNC always has."""
    return [error for error in page.errors() if error not in DEBIAN_NOVNC_ERRORS]


def canvas_point(page, fx=0.75, fy=0.75, selector="#noVNC_container canvas"):
    """A point of the remote screen's canvas, at fractions of its size."""
    rect = page.wait_js("(() => { const c = document.querySelector('%s');" % selector +
                        " if (!c || !c.width) return null;"
                        " const r = c.getBoundingClientRect();"
                        " return [r.x, r.y, r.width, r.height]; })()", what="noVNC's canvas")
    return int(rect[0] + rect[2] * fx), int(rect[1] + rect[3] * fy)


def assert_shows(page, colour, fx=0.75, fy=0.75, selector="#noVNC_container canvas"):
    """The desktop shows ``colour`` (a screenshot's pixels, exactly)."""
    x, y = canvas_point(page, fx, fy, selector)
    wait_for(lambda: page.pixels(x, y) == {colour}, timeout=TIMEOUT,
             what="colour #%02x%02x%02x at %d,%d (saw %s)" % (colour + (x, y, page.pixels(x, y))))


@pytest.fixture(scope="module")
def direct(module_websockify, novnc, alice):
    """websockify --web /usr/share/novnc in front of alice's desktop."""
    proc, port = module_websockify("--web", novnc, "{port}", "127.0.0.1:%d" % alice.port)
    return proc, port


def test_novnc_shows_the_desktop(page, direct, alice):
    proc, port = direct
    connect_novnc(page, "http://127.0.0.1:%d/vnc.html?autoconnect=true" % port)
    assert_shows(page, alice.colour)
    assert novnc_errors(page) == []


def test_novnc_through_a_token_file(page, websockify, novnc, alice, bob, tmp_path):
    tokens = tmp_path / "tokens"
    # The seed blog's file: a space after the colon.
    tokens.write_text("U6F7msdQ: 127.0.0.1:%d\n1oJw2DwG: 127.0.0.1:%d\n"
                      % (alice.port, bob.port))
    proc, port = websockify("--web", novnc, "--token-plugin", "TokenFile",
                            "--token-source", str(tokens), "{port}")
    connect_novnc(page, "http://127.0.0.1:%d/vnc.html?autoconnect=true"
                        "&path=websockify?token=1oJw2DwG" % port)
    assert_shows(page, bob.colour)
    assert novnc_errors(page) == []


def test_novnc_over_wss(page, websockify, novnc, alice, pki):
    proc, port = websockify("--web", novnc, "--cert", pki.server.cert, "--key",
                            pki.server.key, "--ssl-only", "{port}",
                            "127.0.0.1:%d" % alice.port)
    # The browser trusts the certificate by its key (--ignore-certificate-errors-spki-list).
    connect_novnc(page, "https://127.0.0.1:%d/vnc.html?autoconnect=true" % port)
    assert page.evaluate("location.protocol") == "https:"
    assert_shows(page, alice.colour)
    assert novnc_errors(page) == []


def test_keyboard_reaches_an_xterm_on_the_desktop(page, direct, alice, processes, tmp_path):
    xterm = require_program("xterm", "xterm")
    xdotool = require_program("xdotool", "xdotool")
    typed = tmp_path / "typed"
    # The xterm's shell writes the line it reads to a file, then the xterm ends.
    processes([xterm, "-geometry", "60x4+0+0", "-e", "sh", "-c",
               'IFS= read -r line; printf "%%s\\n" "$line" > %s.part && mv %s.part %s'
               % (typed, typed, typed)], name="xterm", env=alice.env())
    window = alice.x11(xdotool, "search", "--sync", "--onlyvisible", "--class", "xterm")
    window = window.split()[0]
    # No window manager: give the xterm the keyboard focus.
    alice.x11(xdotool, "windowfocus", "--sync", window)
    proc, port = direct
    connect_novnc(page, "http://127.0.0.1:%d/vnc.html?autoconnect=true" % port)
    assert_shows(page, alice.colour)
    # A click on the remote screen gives noVNC the browser's keyboard focus.
    page.click(*canvas_point(page, 0.9, 0.9))
    page.wait_js("document.activeElement && document.activeElement.tagName === 'CANVAS'",
                 what="noVNC's canvas focused")
    page.type_text("Typed in Chromium 7")
    page.press("Enter")
    wait_for(typed.exists, timeout=TIMEOUT, what="the xterm's line in %s" % typed)
    assert typed.read_text() == "Typed in Chromium 7\n"
    assert novnc_errors(page) == []


# -- the seed blog: two desktops, one websockify, behind nginx at /novnc/ ------------------

BLOG_INDEX = """\
<a id="alice" href="/novnc/vnc.html?resize=remote&path=novnc/websockify?token=U6F7msdQ">
  Alice
</a>
<a id="bob" href="/novnc/vnc.html?resize=remote&path=novnc/websockify?token=1oJw2DwG">
  Bob
</a>
"""

BLOG_NGINX_CONF = """\
  server {{
    # the blog's server block, on a free loopback port instead of 80
    listen 127.0.0.1:{port} default_server;

    location / {{
      root {tmp}/www;
      try_files $uri $uri/ /index-both.html;
    }}

    location /novnc/ {{
      proxy_pass http://127.0.0.1:{websockify}/;
    }}
    location /novnc/websockify {{
      proxy_pass http://127.0.0.1:{websockify}/;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection "Upgrade";
      proxy_set_header Host $host;
      # Don't disconnect if inactive.
      proxy_read_timeout 600s;
      # Disable caching of VNC stream.
      proxy_buffering off;
    }}
  }}
"""


def test_blog_two_desktops_behind_nginx(browser, websockify, processes, novnc, alice, bob,
                                        tmp_path):
    nginx_program = require_program("nginx", "nginx")
    tokens = tmp_path / "websockify-token.cfg"
    tokens.write_text("U6F7msdQ: 127.0.0.1:%d\n1oJw2DwG: 127.0.0.1:%d\n"
                      % (alice.port, bob.port))
    # The blog's command line, in the foreground (-D would leave the test's control).
    _, wport = websockify("--verbose", "--web", novnc, "--token-plugin=TokenFile",
                          "--token-source=%s" % tokens, "{port}")
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "index-both.html").write_text(BLOG_INDEX)
    nport = free_port()
    start_nginx(processes, nginx_program, tmp_path,
                BLOG_NGINX_CONF.format(tmp=tmp_path, port=nport, websockify=wport), nport)

    # Two users, each in a browser (context) of their own, connected at once.
    contexts = [browser.new_context(), browser.new_context()]
    try:
        pages = []
        for context, user in zip(contexts, ("alice", "bob")):
            page = browser.new_page(context)
            # (/ itself is the www folder, which has no index.html: 403)
            page.navigate("http://127.0.0.1:%d/index-both.html" % nport)
            page.click_element("#" + user, navigates=True)
            assert page.evaluate("location.pathname") == "/novnc/vnc.html"
            # (the UI is ready once it drops noVNC_loading and opens the dialog)
            page.wait_js("!document.documentElement.classList.contains('noVNC_loading') &&"
                         " document.getElementById('noVNC_connect_dlg')"
                         ".classList.contains('noVNC_open')", what="noVNC's connect dialog")
            page.click_element("#noVNC_connect_button")
            page.wait_js("document.documentElement.classList.contains('noVNC_connected')",
                         timeout=TIMEOUT, what="%s's noVNC connected" % user)
            pages.append(page)
        for page, desktop in zip(pages, (alice, bob)):
            assert_shows(page, desktop.colour)
            assert novnc_errors(page) == []
    finally:
        for context in contexts:
            browser.close_context(context)


# -- a --record file played back by noVNC ------------------------------------------

# Debian's novnc does not ship noVNC's playback page (upstream's tests/ folder),
# so this page, written here, does its job: it hands noVNC's own RFB client
# (core/rfb.js of Debian's package) the bytes the recording says the server
# sent, in order, through an object shaped like a WebSocket, and drops what
# the client sends. The recording is loaded as recording.js (it sets
# VNC_frame_data, as the playback format is made for).
PLAYBACK_PAGE = """\
<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>playback</title>
<style>html, body { margin: 0; } #screen { width: 1100px; height: 800px; }</style>
</head>
<body>
<div id="screen"></div>
<script src="recording.js"></script>
<script type="module">
import RFB from "./core/rfb.js";

const result = { frames: 0, bytes: 0, events: [], done: false };
window.playback = result;

class RecordedServer {
  constructor() {
    this.binaryType = "arraybuffer";
    this.protocol = "binary";
    this.readyState = "connecting";
    this.onopen = null; this.onmessage = null; this.onclose = null; this.onerror = null;
  }
  send(data) {}
  close() { this.readyState = "closed"; }
}

// '{<ms>{<bytes to the client>' entries, in order; 'EOF' ends the array.
const toClient = VNC_frame_data.filter(f => f[0] === "{").map(f => {
  const text = f.slice(f.indexOf("{", 1) + 1);
  return Uint8Array.from(text, c => c.charCodeAt(0));
});
const channel = new RecordedServer();
const rfb = new RFB(document.getElementById("screen"), channel, { shared: true });
for (const name of ["connect", "disconnect", "securityfailure", "credentialsrequired"]) {
  rfb.addEventListener(name, e => result.events.push(
    name + (name === "disconnect" ? (e.detail.clean ? " clean" : " unclean") : "")));
}
channel.readyState = "open";
channel.onopen(new Event("open"));
let next = 0;
function feed() {
  if (next < toClient.length) {
    const bytes = toClient[next++];
    result.frames += 1;
    result.bytes += bytes.length;
    channel.onmessage(new MessageEvent("message", { data: bytes.buffer }));
    setTimeout(feed, 0);
  } else {
    // Give the last update time to be drawn, then end as the server did.
    setTimeout(() => { result.done = true; }, 200);
  }
}
setTimeout(feed, 0);
</script>
</body>
</html>
"""


def test_recorded_session_plays_back_in_novnc(browser, websockify, novnc, alice, tmp_path):
    from tests.e2e.test_record import complete_recording, directions, parse_recording
    prefix = tmp_path / "recording"
    _, port = websockify("--web", novnc, "--record", str(prefix), "{port}",
                         "127.0.0.1:%d" % alice.port)
    context = browser.new_context()
    try:
        page = browser.new_page(context)
        connect_novnc(page, "http://127.0.0.1:%d/vnc.html?autoconnect=true" % port)
        assert_shows(page, alice.colour)
    finally:
        browser.close_context(context)      # the session ends: the recording is complete
    files = wait_for(lambda: sorted(tmp_path.glob("recording.*")), what="the recording")
    assert len(files) == 1, files
    data = complete_recording(files[0])
    to_client, from_client = directions(parse_recording(data))
    assert to_client.startswith(b"RFB 003.008\n") and from_client.startswith(b"RFB 003.008\n")

    web = tmp_path / "playback"
    shutil.copytree(novnc, str(web))
    (web / "playback.html").write_text(PLAYBACK_PAGE)
    shutil.copy(str(files[0]), str(web / "recording.js"))
    _, wport = websockify("--web", str(web), "{port}", "127.0.0.1:%d" % free_port())
    context = browser.new_context()
    try:
        page = browser.new_page(context)
        page.navigate("http://127.0.0.1:%d/playback.html" % wport)
        result = page.wait_js("window.playback && window.playback.done && window.playback",
                              what="the playback's end")
        assert result["events"] == ["connect"], result
        assert result["bytes"] == len(to_client)
        assert page.errors() == []
        assert_shows(page, alice.colour, selector="#screen canvas")
    finally:
        browser.close_context(context)
