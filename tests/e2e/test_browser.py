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

import pytest

from tests.browser import Chromium, spki_hash
from tests.helpers import (PYTHON, free_port, port_open, require_module, require_program,
                           skip_or_fail, wait_for)

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
