"""--web: static files on the WebSocket port, and what a server without it answers."""

import os
import re
import socket

import pytest

from tests.helpers import (Process, RawWebSocket, free_port, port_open,
                           read_http_response, wait_for, websockify_argv)

SECRET = b"TOP-SECRET-6d1f0c2e outside the web root"
INDEX = b"<!DOCTYPE html><html><body>websockify index page</body></html>\n"
NESTED = b"console.log('nested file');\n"


def build_tree(base):
    """base/www is the web root; base/secret.txt and base/outside/ are not in it."""
    (base / "secret.txt").write_bytes(SECRET)
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret2.txt").write_bytes(SECRET)
    www = base / "www"
    www.mkdir()
    (www / "index.html").write_bytes(INDEX)
    (www / "sub").mkdir()
    (www / "sub" / "app.js").write_bytes(NESTED)
    (www / "list").mkdir()
    (www / "list" / "alpha.txt").write_bytes(b"alpha\n")
    (www / "list" / "beta.txt").write_bytes(b"beta\n")
    (www / "list" / "deeper").mkdir()
    (www / "my dir").mkdir()
    (www / "my dir" / "index.html").write_bytes(INDEX)
    os.symlink(str(base / "secret.txt"), str(www / "link.txt"))
    os.symlink(str(outside), str(www / "linkdir"))
    return www


def start_server(log_path, *args, target_port=None):
    port = free_port()
    target = "127.0.0.1:%d" % (target_port or free_port())
    proc = Process(websockify_argv("--workers", "1", *args, "127.0.0.1:%d" % port, target),
                   str(log_path))
    try:
        wait_for(lambda: port_open(port) or proc.proc.poll() is not None,
                 what="websockify on port %d" % port)
        assert proc.proc.poll() is None, proc.log()
        proc.wait_log(r"worker \d+ .*serving|proxying from")
    except BaseException:
        proc.stop()
        raise
    return proc, port


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return build_tree(tmp_path_factory.mktemp("web"))


@pytest.fixture(scope="module")
def web_server(tree, tmp_path_factory):
    """One --web server shared by the read-only tests of this module: (proc, port)."""
    log_path = tmp_path_factory.mktemp("weblog") / "websockify.log"
    proc, port = start_server(log_path, "--web", str(tree))
    yield proc, port
    proc.stop()


def raw_request(port, request, timeout=5.0):
    """Send raw request bytes, read until the server closes; the whole answer."""
    if isinstance(request, str):
        request = request.encode("latin-1")
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    return data


def parse_response(data):
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1."), data[:200]
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def request(port, path, method="GET", extra=""):
    data = raw_request(port, "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%sConnection: close\r\n\r\n"
                       % (method, path, extra))
    return parse_response(data)


# -- files, directories ----------------------------------------------------------

def test_index_html_served_for_root(web_server):
    status, headers, body = request(web_server[1], "/")
    assert status == 200
    assert headers["content-type"].split(";")[0].strip() == "text/html"
    assert body == INDEX
    assert int(headers["content-length"]) == len(INDEX)


def test_index_html_by_name(web_server):
    status, headers, body = request(web_server[1], "/index.html")
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert body == INDEX


def test_file_in_subdirectory(web_server):
    status, headers, body = request(web_server[1], "/sub/app.js")
    assert status == 200
    assert body == NESTED
    assert int(headers["content-length"]) == len(NESTED)
    assert "javascript" in headers["content-type"]


def test_query_string_ignored_for_file(web_server):
    status, _, body = request(web_server[1], "/sub/app.js?v=3")
    assert status == 200
    assert body == NESTED


def test_query_string_on_directory_with_slash(web_server):
    # noVNC-style links: "/?host=...&port=..." must still get the index page.
    status, headers, body = request(web_server[1], "/?host=localhost&port=6080")
    assert status == 200, headers
    assert body == INDEX


def test_directory_listing(web_server):
    status, headers, body = request(web_server[1], "/list/")
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    text = body.decode("utf-8")
    assert "alpha.txt" in text
    assert "beta.txt" in text
    assert "deeper/" in text
    assert int(headers["content-length"]) == len(body)


def test_directory_without_slash_redirects(web_server):
    status, headers, body = request(web_server[1], "/list")
    assert status == 301
    assert headers["location"].endswith("/list/")
    status, headers, _ = request(web_server[1], "/sub")
    assert status == 301
    assert headers["location"].endswith("/sub/")


def test_escaped_directory_name(web_server):
    status, _, body = request(web_server[1], "/my%20dir/")
    assert status == 200
    assert body == INDEX


def test_redirect_keeps_escaped_directory_name(web_server):
    # /my%20dir names the directory "my dir"; the redirect must name it too.
    status, headers, _ = request(web_server[1], "/my%20dir")
    assert status == 301
    location = headers["location"]
    assert location.endswith("/my%20dir/"), location
    status, _, body = request(web_server[1], location[location.index("/my"):])
    assert status == 200
    assert body == INDEX


def test_redirect_keeps_query_string(web_server):
    status, headers, _ = request(web_server[1], "/sub?a=1")
    assert status == 301
    location = headers["location"]
    assert re.search(r"/sub/\?a=1$", location), location


def test_head_returns_headers_only(web_server):
    data = raw_request(web_server[1], "HEAD /index.html HTTP/1.1\r\nHost: x\r\n"
                                      "Connection: close\r\n\r\n")
    status, headers, body = parse_response(data)
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert int(headers["content-length"]) == len(INDEX)
    assert body == b""


def test_head_on_directory_listing(web_server):
    status, headers, body = request(web_server[1], "/list/", method="HEAD")
    assert status == 200
    assert int(headers["content-length"]) > 0
    assert body == b""


def test_post_not_allowed(web_server):
    status, headers, _ = request(web_server[1], "/index.html", method="POST",
                                 extra="Content-Length: 0\r\n")
    assert status == 405
    assert "GET" in headers.get("allow", "")


def test_post_with_body_not_allowed(web_server):
    data = raw_request(web_server[1], "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                                      "Connection: close\r\n\r\nhello")
    status, _, body = parse_response(data)
    assert status == 405
    assert INDEX not in body


def test_missing_file_404(web_server):
    status, _, _ = request(web_server[1], "/no-such-file.html")
    assert status == 404
    status, _, _ = request(web_server[1], "/sub/no-such-file.js")
    assert status == 404


TRAVERSALS = [
    "/../secret.txt",
    "/%2e%2e/secret.txt",
    "/%2E%2E%2Fsecret.txt",
    "/..%2fsecret.txt",
    "/sub/../../secret.txt",
    "/sub/%2e%2e/%2e%2e/secret.txt",
    "/..%5csecret.txt",
    "/%252e%252e/secret.txt",
    "/secret.txt%00.html",
    "//etc/passwd",
    "/../../../../../../etc/passwd",
    "/link.txt",
    "/linkdir/secret2.txt",
    "/linkdir/",
    "/linkdir",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_traversal_refused(web_server, path):
    data = raw_request(web_server[1], "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                      "Connection: close\r\n\r\n" % path)
    assert SECRET not in data
    assert b"secret2.txt" not in data
    assert b"root:x:0:0" not in data
    status, _, _ = parse_response(data)
    assert status == 404, data[:300]


def test_symlink_out_refused_over_http10(web_server):
    data = raw_request(web_server[1], "GET /linkdir/secret2.txt HTTP/1.0\r\n\r\n")
    assert SECRET not in data
    assert parse_response(data)[0] == 404


def test_keep_alive_two_requests(web_server):
    with socket.create_connection(("127.0.0.1", web_server[1]), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = read_http_response(sock)
        assert status == 200
        assert body == INDEX
        sock.sendall(b"GET /sub/app.js HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = read_http_response(sock)
        assert status == 200
        assert body == NESTED


def test_pipelined_requests(web_server):
    with socket.create_connection(("127.0.0.1", web_server[1]), timeout=5) as sock:
        sock.sendall(b"GET /list/alpha.txt HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /list/beta.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.count(b"HTTP/1.1 200") == 2, data
    assert data.index(b"alpha\n") < data.index(b"beta\n")


def test_each_request_logs_one_line(web_server):
    proc, port = web_server
    paths = ["/sub/app.js?log-test-1", "/list/beta.txt?log-test-2", "/missing?log-test-3"]
    statuses = []
    for path in paths:
        statuses.append(request(port, path)[0])
    assert statuses == [200, 200, 404]
    for path, status in zip(paths, statuses):
        marker = path.split("?")[1]
        proc.wait_log(re.escape(marker))
        lines = [line for line in proc.log().splitlines() if marker in line]
        assert len(lines) == 1, lines
        assert "GET %s HTTP/1.1" % path in lines[0]
        assert re.search(r"\b%d\b" % status, lines[0].split(path)[1]), lines[0]
        assert "127.0.0.1:" in lines[0]


# -- --file-only ---------------------------------------------------------------

def test_file_only(tree, tmp_path):
    proc, port = start_server(tmp_path / "ws.log", "--web", str(tree), "--file-only")
    try:
        status, _, body = request(port, "/list/")
        assert status == 404
        assert b"alpha.txt" not in body
        status, _, body = request(port, "/list/alpha.txt")
        assert status == 200
        assert body == b"alpha\n"
        status, _, body = request(port, "/")
        assert status == 200
        assert body == INDEX
        status, _, _ = request(port, "/link.txt")
        assert status == 404
    finally:
        proc.stop()


# -- without --web ---------------------------------------------------------------

def test_without_web_get_and_head_405(websockify, echo_target):
    proc, port = websockify("--workers", "1", "127.0.0.1:{port}",
                            "127.0.0.1:%d" % echo_target)
    status, headers, body = request(port, "/")
    assert status == 405
    assert "GET" in headers.get("allow", "")
    status, headers, body = request(port, "/index.html", method="HEAD")
    assert status == 405
    assert body == b""
    status, _, _ = request(port, "/", method="POST")
    assert status == 405


# -- WebSocket on the same port --------------------------------------------------

def test_websocket_upgrade_with_web(tree, websockify, echo_target):
    proc, port = websockify("--workers", "1", "--web", str(tree), "127.0.0.1:{port}",
                            "127.0.0.1:%d" % echo_target)
    status, _, body = request(port, "/")
    assert status == 200 and body == INDEX
    ws = RawWebSocket(port, path="/websockify")
    try:
        assert ws.status == 101
        ws.send_binary(b"through the web port")
        assert ws.recv_data(20) == b"through the web port"
        ws.send(0x8, b"\x03\xe8")
        assert ws.expect_close() == (1000, "")
    finally:
        ws.close()
    # An upgrade to a path that is a file is still a WebSocket, not the file.
    ws = RawWebSocket(port, path="/index.html")
    try:
        assert ws.status == 101
        ws.send_binary(b"ping")
        assert ws.recv_data(4) == b"ping"
    finally:
        ws.close()
