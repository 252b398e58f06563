"""websockify-agent's HTTP side: the upgrade's headers (--http) and the viewer URL from the 101."""

import io
import logging
import os

import pytest
from hypothesis import given, strategies as st

from websockify.agent.cli import parse_args
from websockify.agent.transport import upgrade_headers
from websockify.agent.viewer import BadViewerURL, ViewerURL, check_viewer_url
from websockify.protocol.handshake import check_client_response, client_key
from websockify.protocol.mux import (LARGE_WINDOW, MESSAGE_HEADER, SERVICE_HEADER,
                                     VIEWER_URL_HEADER, WINDOW_HEADER)
from websockify.tunnel.hub import agent_response

BASE = ["--service", "127.0.0.1:8080", "--server", "ws://h/tunnel/a", "--token-stdin"]


# -- the command line and the upgrade request -----------------------------------------

def test_http_and_url_file_options():
    config = parse_args(BASE)
    assert (config.http, config.url_file) == (False, None)
    config = parse_args(BASE + ["--http", "--url-file", "/run/agent/url"])
    assert (config.http, config.url_file) == (True, "/run/agent/url")


def test_upgrade_headers():
    from websockify import __version__
    agent = ("User-Agent", "websockify-agent/%s" % __version__)
    window = (WINDOW_HEADER, str(LARGE_WINDOW))
    message = ("X-Websockify-Max-Message", "1048576")
    assert MESSAGE_HEADER == message[0]
    assert upgrade_headers(None, False) == [agent, window, message]
    assert upgrade_headers("T.K.N", False) == [agent, ("Authorization", "Bearer T.K.N"),
                                               window, message]
    assert upgrade_headers("T.K.N", True) == [agent, ("Authorization", "Bearer T.K.N"),
                                              ("X-Websockify-Service", "http"), window, message]
    assert upgrade_headers(None, True) == [agent, (SERVICE_HEADER, "http"), window, message]


def test_the_servers_101_gives_its_viewer_url_to_the_agent():
    key = client_key(os.urandom(16))
    url = "http://127.0.0.1:8080/t/a/"
    headers = check_client_response(agent_response(key, url), key, "websockify-tunnel.v1")
    assert headers.get(VIEWER_URL_HEADER.lower()) == url
    headers = check_client_response(agent_response(key), key, "websockify-tunnel.v1")
    assert headers.get(VIEWER_URL_HEADER.lower()) is None
    assert headers.get(MESSAGE_HEADER.lower()) is None


def test_the_servers_101_announces_the_largest_message_it_takes():
    key = client_key(os.urandom(16))
    headers = check_client_response(agent_response(key, None, LARGE_WINDOW, 262256), key,
                                    "websockify-tunnel.v1")
    assert headers.get("x-websockify-max-message") == "262256"
    assert headers.get(WINDOW_HEADER.lower()) == str(LARGE_WINDOW)


# -- the URL check --------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/t/a/",
    "https://rdv.example.org/t/LKLAFA151NA774655/",
    "https://rdv.example.org/",
    "http://[::1]:8080/t/a%20b~c.d_e-f/",
    "http://[fe80::1%25eth0]:80/t/x/",
    "HTTPS://Example.ORG:443/t/x/?v=1",
    "http://localhost./t/x/",
])
def test_sane_urls(url):
    assert check_viewer_url(url) == url


@pytest.mark.parametrize("url, message", [
    ("", "not an http:// or https:// URL"),
    ("garbage", "not an http:// or https:// URL"),
    ("ws://h/t/a/", "not an http:// or https:// URL"),
    ("javascript:alert(1)", "not an http:// or https:// URL"),
    ("http:///t/a/", "not an http:// or https:// URL"),
    ("http://h", "not an http:// or https:// URL"),
    ("http://h:/t/a/", "not an http:// or https:// URL"),
    ("http://user@h/t/a/", "not an http:// or https:// URL"),
    ("http://h/t/a b/", "not an http:// or https:// URL"),
    ("http://h/t/a/#frag", "not an http:// or https:// URL"),
    ("http://h/t/\x1b[2J/", "not an http:// or https:// URL"),
    ("http://h/t/a/\r\nX: 1", "not an http:// or https:// URL"),
    ("http://h/t/\u00e9/", "not an http:// or https:// URL"),
    ("http://a/t/x/, http://b/t/y/", "not an http:// or https:// URL"),   # two headers
    ("http://h:0/t/a/", "port 0 out of range"),
    ("http://h:65536/t/a/", "port 65536 out of range"),
    ("http://h/" + "a" * 2048, "longer than 2048 characters"),
])
def test_garbage_urls(url, message):
    with pytest.raises(BadViewerURL, match=message):
        check_viewer_url(url)


@given(st.text(max_size=300))
def test_the_check_accepts_only_printable_http_urls(text):
    try:
        url = check_viewer_url(text)
    except BadViewerURL:
        return
    assert url == text
    assert url.lower().startswith(("http://", "https://"))
    assert all(0x21 <= ord(ch) < 0x7F for ch in url)


@given(st.sampled_from(["http", "https"]), st.from_regex(r"[a-z0-9.-]{1,40}", fullmatch=True),
       st.integers(1, 65535), st.from_regex(r"[A-Za-z0-9_~.%-]{1,60}", fullmatch=True))
def test_every_url_a_server_makes_passes(scheme, host, port, agent_id):
    url = "%s://%s:%d/t/%s/" % (scheme, host, port, agent_id)
    assert check_viewer_url(url) == url


# -- telling it: stdout once per new URL, the file replaced ------------------------------

def test_printed_once_and_again_only_when_it_changes(tmp_path, caplog):
    caplog.set_level(logging.INFO, "websockify.agent")
    out = io.StringIO()
    path = tmp_path / "url"
    viewer = ViewerURL(str(path), out)
    assert viewer.connected("http://127.0.0.1:1/t/a/") == "http://127.0.0.1:1/t/a/"
    assert out.getvalue() == "http://127.0.0.1:1/t/a/\n"
    assert path.read_text() == "http://127.0.0.1:1/t/a/\n"
    # A reconnection to the same URL: nothing printed, the file untouched.
    os.utime(path, (0, 0))
    assert viewer.connected(" http://127.0.0.1:1/t/a/ ") == "http://127.0.0.1:1/t/a/"
    assert out.getvalue() == "http://127.0.0.1:1/t/a/\n"
    assert os.stat(path).st_mtime == 0
    # Another instance: printed and written.
    viewer.connected("https://b.example.org/t/a/")
    assert out.getvalue() == "http://127.0.0.1:1/t/a/\nhttps://b.example.org/t/a/\n"
    assert path.read_text() == "https://b.example.org/t/a/\n"
    assert sorted(os.listdir(tmp_path)) == ["url"]       # no temporary file left
    assert [r.getMessage() for r in caplog.records] == [
        "viewer URL: http://127.0.0.1:1/t/a/", "viewer URL: https://b.example.org/t/a/"]


def test_garbage_is_a_warning_and_nothing_is_printed(tmp_path, caplog):
    out = io.StringIO()
    path = tmp_path / "url"
    viewer = ViewerURL(str(path), out)
    assert viewer.connected("\x1b]0;owned\x07") is None
    assert out.getvalue() == ""
    assert not path.exists()
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "ignoring the server's viewer URL: not an http:// or https:// URL with "
                    "a host and a path: '\\x1b]0;owned\\x07'")]


def test_no_url_is_said_once_when_one_was_wanted(tmp_path, caplog):
    caplog.set_level(logging.INFO, "websockify.agent")
    out = io.StringIO()
    path = tmp_path / "url"
    viewer = ViewerURL(str(path), out)
    assert viewer.connected(None) is None
    assert viewer.connected(None) is None
    assert out.getvalue() == "" and not path.exists()
    assert [r.getMessage() for r in caplog.records] == [
        "the server gave no viewer URL (no HTTP face for this agent): nothing written to %s"
        % path]
    # Without --http or --url-file an agent with no HTTP face logs nothing about it.
    caplog.clear()
    assert ViewerURL(None, out).connected(None) is None
    assert caplog.records == []
    assert ViewerURL(None, out, expected=True).connected(None) is None
    assert [r.getMessage() for r in caplog.records] == [
        "the server gave no viewer URL (no HTTP face for this agent)"]


def test_a_url_given_again_after_none_is_printed_again():
    out = io.StringIO()
    viewer = ViewerURL(None, out)
    viewer.connected("http://h/t/a/")
    viewer.connected(None)
    viewer.connected("http://h/t/a/")
    assert out.getvalue() == "http://h/t/a/\nhttp://h/t/a/\n"


def test_a_file_that_cannot_be_written_is_logged_and_tried_again(tmp_path, caplog):
    out = io.StringIO()
    path = tmp_path / "gone" / "url"
    viewer = ViewerURL(str(path), out)
    viewer.connected("http://h/t/a/")
    assert out.getvalue() == "http://h/t/a/\n"
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "cannot write the viewer URL to %s: No such file or directory" % path]
    (tmp_path / "gone").mkdir()
    viewer.connected("http://h/t/a/")
    assert out.getvalue() == "http://h/t/a/\n"
    assert path.read_text() == "http://h/t/a/\n"


def test_a_closed_stdout_is_a_warning(caplog):
    out = io.StringIO()
    out.close()
    assert ViewerURL(None, out).connected("http://h/t/a/") == "http://h/t/a/"
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "cannot print the viewer URL: I/O operation on closed file")]
