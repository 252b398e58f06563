"""The handshake and the first frames against the real server process.

The tests share one ``python -m websockify`` (one worker, so that "the same
worker keeps serving" can be read from the log's pid column); those that need
options of their own start their own.  Each talks to it over loopback with
raw sockets and checks three things: the answer on the wire, exactly one log
line about the connection, and a normal echo session afterwards on the same
worker.
"""

import base64
import os
import random
import re
import socket
import struct
import threading
import time

import pytest

from tests.helpers import (RawWebSocket, ServerUnderTest, children_of, free_port,
                           handshake_request, mask_frame, read_http_response, wait_for)

RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="   # RFC 6455 section 1.3
TIMEOUT = 10.0

OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


# -- helpers ------------------------------------------------------------------


def connect(port, timeout=TIMEOUT):
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def local_port(sock):
    return sock.getsockname()[1]


def attach(sock, buffer=b""):
    """A RawWebSocket over a socket whose handshake the test did itself."""
    ws = RawWebSocket.__new__(RawWebSocket)
    ws.sock = sock
    ws.buffer = buffer
    return ws


def open_ws(port, **kwargs):
    ws = RawWebSocket(port, **kwargs)
    assert ws.status == 101, (ws.status, ws.headers, ws.buffer)
    return ws


def close_frame(code, reason=b""):
    return struct.pack("!H", code) + reason


def refusal_pattern(cport, status, request_line=None):
    """The one log line of a refused request from local port ``cport``."""
    what = re.escape(repr(request_line)) if request_line is not None else r"'[^\n]*'"
    return r"127\.0\.0\.1:%d: refused %s: %d \S" % (cport, what, status)


class Bridge(ServerUnderTest):
    """A running server plus what the tests check about it."""

    def echo_session(self, payload=b"still serving"):
        """A normal session; returns the pid of the worker that served it."""
        ws = open_ws(self.port)
        cport = local_port(ws.sock)
        try:
            ws.send_binary(payload)
            assert ws.recv_data(len(payload)) == payload
            ws.send(OP_CLOSE, close_frame(1000))
            assert ws.expect_close()[0] == 1000
            assert ws.at_eof()
        finally:
            ws.close()
        match = self.wait_line(r"\[(\d+)\] INFO 127\.0\.0\.1:%d / -> [^\n]*: closed \(1000\)"
                               % cport)
        return int(match.group(1))

    def assert_still_serving(self):
        """A good session works on the same worker(s); no worker died or crashed."""
        pid = self.echo_session()
        assert pid in self.workers
        assert sorted(children_of(self.proc.pid)) == self.workers
        log = self.log()
        assert "Traceback" not in log, log
        assert " ERROR " not in log, log
        return pid

    def assert_one_line(self, cport, pattern, timeout=10.0):
        """Exactly one log line about ``cport``, matching ``pattern``, and the
        worker that wrote it goes on serving."""
        self.wait_line(r"\b127\.0\.0\.1:%d\b" % cport, timeout)
        pid = self.assert_still_serving()      # any late line would be logged by now
        lines = self.lines_about(cport)
        assert len(lines) == 1, "expected one line about port %d:\n%s" % (cport, self.log())
        assert re.search(pattern, lines[0]), lines[0]
        assert "[%d]" % pid in lines[0], "another process logged it: %s" % lines[0]
        return lines[0]


@pytest.fixture(scope="module")
def shared_bridge(module_websockify, module_echo_target):
    """One worker proxying to the echo target, for every test of the module
    that only talks to it (stopped by its pid when the module is done)."""
    proc, port = module_websockify("--workers", "1", "127.0.0.1:{port}",
                                   "127.0.0.1:%d" % module_echo_target)
    return Bridge(proc, port, module_echo_target)


@pytest.fixture
def bridge(shared_bridge):
    """The shared server, its log read from this test's start on."""
    shared_bridge.mark()
    return shared_bridge


def send_and_read(port, data, timeout=TIMEOUT):
    """Send raw bytes; returns (status, headers, body, client port)."""
    sock = connect(port, timeout)
    cport = local_port(sock)
    try:
        sock.sendall(data)
        status, headers, body = read_http_response(sock)
    finally:
        sock.close()
    return status, headers, body, cport


def check_refused(bridge, data, status, request_line=None, timeout=TIMEOUT):
    got, headers, body, cport = send_and_read(bridge.port, data, timeout)
    assert got == status, (got, headers, body)
    assert headers.get("connection", "").lower() == "close"
    assert headers.get("content-type", "").startswith("text/plain")
    assert body and len(body) == int(headers["content-length"])
    assert b"Switching" not in body
    bridge.assert_one_line(cport, refusal_pattern(cport, status, request_line))
    return headers, body


def upgrade_head(request_line="GET / HTTP/1.1", headers=None, terminator="\r\n"):
    """An upgrade request with chosen lines (headers=None: a valid set)."""
    if headers is None:
        headers = ["Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade",
                   "Sec-WebSocket-Key: %s" % RFC_KEY, "Sec-WebSocket-Version: 13"]
    lines = [request_line] + list(headers)
    return (terminator.join(lines) + terminator * 2).encode("latin-1")


# -- successful handshakes ---------------------------------------------------------


def test_accept_key_of_rfc_sample(bridge):
    sock = connect(bridge.port)
    cport = local_port(sock)
    sock.sendall(handshake_request(key=RFC_KEY))
    status, headers, rest = read_http_response(sock)
    assert status == 101
    assert headers["sec-websocket-accept"] == RFC_ACCEPT
    assert headers["upgrade"].lower() == "websocket"
    assert "upgrade" in headers["connection"].lower()
    assert headers["sec-websocket-protocol"] == "binary"
    ws = attach(sock, rest)
    ws.send_binary(b"rfc")
    assert ws.recv_data(3) == b"rfc"
    ws.send(OP_CLOSE, close_frame(1000))
    assert ws.expect_close()[0] == 1000
    assert ws.at_eof()
    ws.close()
    line = bridge.assert_one_line(cport, r"127\.0\.0\.1:%d / -> 127\.0\.0\.1:%d: closed \(1000\)"
                                  % (cport, bridge.target_port))
    assert "3 bytes from client, 3 bytes to client" in line


@pytest.mark.parametrize("version", ["13", "8", "7"])
def test_supported_versions(bridge, version):
    sock = connect(bridge.port)
    cport = local_port(sock)
    sock.sendall(handshake_request(key=RFC_KEY, version=version))
    status, headers, rest = read_http_response(sock)
    assert status == 101, (status, headers, rest)
    assert headers["sec-websocket-accept"] == RFC_ACCEPT
    ws = attach(sock, rest)
    ws.send_binary(b"v" + version.encode())
    assert ws.recv_data(len(version) + 1) == b"v" + version.encode()
    ws.send(OP_CLOSE, close_frame(1000))
    assert ws.expect_close()[0] == 1000
    ws.close()
    bridge.assert_one_line(cport, r"127\.0\.0\.1:%d / -> .*: closed \(1000\)" % cport)


@pytest.mark.parametrize("offer", ["base64, binary", "binary", " foo ,binary ",
                                   "binary, base64", "a,b,c, binary,d"])
def test_subprotocol_binary_chosen(bridge, offer):
    ws = open_ws(bridge.port, protocols=offer)
    cport = local_port(ws.sock)
    assert ws.headers.get("sec-websocket-protocol") == "binary"
    ws.send_binary(b"proto")
    assert ws.recv_data(5) == b"proto"
    ws.send(OP_CLOSE, close_frame(1000))
    assert ws.expect_close()[0] == 1000
    ws.close()
    bridge.assert_one_line(cport, r"127\.0\.0\.1:%d / -> .*: closed \(1000\)" % cport)


@pytest.mark.parametrize("offer", [None, "chat", "binaryx, chat"],
                         ids=["no-offer", "chat", "lookalike"])
def test_no_subprotocol_chosen(bridge, offer):
    """No offer, or one without ``binary`` or ``base64``: 101 without a protocol
    header (``base64`` alone is chosen: see test_legacy.py).

    (websockify 0.13 answers 400 to an offer without binary/base64; we accept.)
    """
    ws = open_ws(bridge.port, protocols=offer)
    cport = local_port(ws.sock)
    assert "sec-websocket-protocol" not in ws.headers, ws.headers
    ws.send_binary(b"noproto")
    assert ws.recv_data(7) == b"noproto"
    ws.send(OP_CLOSE, close_frame(1000))
    assert ws.expect_close()[0] == 1000
    ws.close()
    bridge.assert_one_line(cport, r"127\.0\.0\.1:%d / -> .*: closed \(1000\)" % cport)


def test_browser_style_headers(bridge):
    """Firefox sends ``Connection: keep-alive, Upgrade``; names and tokens are case-blind."""
    head = upgrade_head(headers=["Host: 127.0.0.1", "upgrade: WebSocket",
                                 "connection: keep-alive, Upgrade",
                                 "sec-websocket-key: %s" % RFC_KEY,
                                 "sec-websocket-version: 13"])
    sock = connect(bridge.port)
    sock.sendall(head)
    status, headers, rest = read_http_response(sock)
    assert status == 101, (status, headers, rest)
    assert headers["sec-websocket-accept"] == RFC_ACCEPT
    sock.close()
    bridge.assert_still_serving()


def test_subprotocol_offer_on_two_header_lines(bridge):
    """Several Sec-WebSocket-Protocol lines are one list (RFC 7230 3.2.2)."""
    head = upgrade_head(headers=["Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade",
                                 "Sec-WebSocket-Key: %s" % RFC_KEY, "Sec-WebSocket-Version: 13",
                                 "Sec-WebSocket-Protocol: chat", "Sec-WebSocket-Protocol: binary"])
    sock = connect(bridge.port)
    sock.sendall(head)
    status, headers, rest = read_http_response(sock)
    assert status == 101
    assert headers.get("sec-websocket-protocol") == "binary"
    sock.close()
    bridge.assert_still_serving()


@pytest.mark.parametrize("terminator", ["\r\n", "\n"], ids=["crlf", "bare-lf"])
def test_handshake_trickled_byte_by_byte(bridge, terminator):
    head = upgrade_head(terminator=terminator)
    frame = mask_frame(OP_BINARY, b"trickle")
    sock = connect(bridge.port)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i in range(len(head)):
        sock.send(head[i:i + 1])
        if head[i:i + 1] in (b"\r", b"\n"):
            time.sleep(0.002)           # let line ends arrive in their own segments
    status, headers, rest = read_http_response(sock)
    assert status == 101, (status, headers, rest)
    ws = attach(sock, rest)
    ws.sock.sendall(frame)
    assert ws.recv_data(7) == b"trickle"
    ws.close()
    bridge.assert_still_serving()


# -- refusals ----------------------------------------------------------------------


def test_binary_garbage_with_blank_line(bridge):
    rnd = random.Random(6455)
    garbage = bytes(rnd.choice(list(range(0, 10)) + list(range(11, 256)))
                    for _ in range(300)).replace(b"\r", b"")
    check_refused(bridge, garbage + b"\r\n\r\n", 400)


def test_tls_client_hello_with_blank_line(bridge):
    hello = (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32))
             + b"\x00\x20" + b"\x13\x01\x13\x02" * 8)
    check_refused(bridge, hello + b"\r\n\r\n", 400)


@pytest.mark.parametrize("line", [b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage\n",
                                  b"hello there, this is not http\r\n"],
                         ids=["binary", "text"])
def test_garbage_request_line_answered_without_waiting_for_more(bridge, line):
    """A request line that cannot be HTTP is refused once that line is in.

    websockify 0.13 reads the request line alone and answers 400 at once; a
    client that sent one bad line and waits must not sit out the 10 s
    handshake timeout and get 408.
    """
    check_refused(bridge, line, 400, timeout=20.0)


@pytest.mark.parametrize("head,line", [
    (b"hello\r\n\r\n", "hello"),
    (b"POST /\r\n\r\n", "POST /"),
    (b"this is not http\r\n\r\n", "this is not http"),
    (b"GET / HTTP/x.y\r\n\r\n", "GET / HTTP/x.y"),
])
def test_request_line_without_http_version(bridge, head, line):
    check_refused(bridge, head, 400, line)


def test_upgrade_without_http_version(bridge):
    """``GET /`` (HTTP/0.9) with the upgrade headers is no WebSocket handshake."""
    headers, body = check_refused(bridge, upgrade_head("GET /"), 400, "GET /")
    assert b"HTTP/1.1" in body


def test_http_10_upgrade(bridge):
    check_refused(bridge, upgrade_head("GET / HTTP/1.0"), 400, "GET / HTTP/1.0")


def test_plain_get_is_405_with_one_log_line(bridge):
    """Not a refusal of the handshake, but a plain request: 405 and one access line."""
    status, headers, body, cport = send_and_read(
        bridge.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 405
    bridge.assert_one_line(cport, r"127\.0\.0\.1:%d: \"GET / HTTP/1\.1\" 405 " % cport)


def test_header_block_over_16k_one_big_header(bridge):
    head = upgrade_head(headers=["Host: 127.0.0.1", "X-Big: " + "a" * 17000,
                                 "Upgrade: websocket", "Connection: Upgrade",
                                 "Sec-WebSocket-Key: %s" % RFC_KEY,
                                 "Sec-WebSocket-Version: 13"])
    check_refused(bridge, head, 431)


def test_header_block_over_16k_many_small_headers(bridge):
    pads = ["X-Pad-%04d: %s" % (i, "p" * 16) for i in range(1000)]   # ~28 KB
    head = upgrade_head(headers=["Host: 127.0.0.1"] + pads)
    check_refused(bridge, head, 431)


def test_header_block_just_over_16k(bridge):
    """The limit counts the whole block, blank line included."""
    base = upgrade_head()
    pad = 16 * 1024 - len(base) + 64
    head = upgrade_head(headers=["Host: 127.0.0.1", "X-Pad: " + "p" * pad, "Upgrade: websocket",
                                 "Connection: Upgrade", "Sec-WebSocket-Key: %s" % RFC_KEY,
                                 "Sec-WebSocket-Version: 13"])
    assert 16 * 1024 < len(head) < 16 * 1024 + 200
    check_refused(bridge, head, 431)


def test_header_block_over_16k_bare_lf(bridge):
    """Bare-LF line endings are tolerated, but not past the 16 KiB limit."""
    base = upgrade_head(terminator="\n")
    pad = 16 * 1024 - len(base) + 100
    head = upgrade_head(headers=["Host: 127.0.0.1", "X-Pad: " + "p" * pad, "Upgrade: websocket",
                                 "Connection: Upgrade", "Sec-WebSocket-Key: %s" % RFC_KEY,
                                 "Sec-WebSocket-Version: 13"], terminator="\n")
    assert 16 * 1024 < len(head) < 16 * 1024 + 200
    check_refused(bridge, head, 431)


def test_header_block_just_under_16k_accepted(bridge):
    base = upgrade_head()
    pad = 16 * 1024 - len(base) - 200
    head = upgrade_head(headers=["Host: 127.0.0.1", "X-Pad: " + "p" * pad, "Upgrade: websocket",
                                 "Connection: Upgrade", "Sec-WebSocket-Key: %s" % RFC_KEY,
                                 "Sec-WebSocket-Version: 13"])
    assert len(head) < 16 * 1024
    sock = connect(bridge.port)
    sock.sendall(head)
    status, headers, rest = read_http_response(sock)
    assert status == 101
    ws = attach(sock, rest)
    ws.send_binary(b"big head")
    assert ws.recv_data(8) == b"big head"
    ws.close()
    bridge.assert_still_serving()


def test_missing_key(bridge):
    headers, body = check_refused(bridge, handshake_request(key=""), 400, "GET / HTTP/1.1")
    assert b"Sec-WebSocket-Key" in body


@pytest.mark.parametrize("key", ["!!!notbase64", "not base64 at all ==="],
                         ids=["punctuation", "spaces"])
def test_key_not_base64(bridge, key):
    check_refused(bridge, handshake_request(key=key), 400, "GET / HTTP/1.1")


@pytest.mark.parametrize("size", [0, 1, 15, 17, 32])
def test_key_of_wrong_length(bridge, size):
    key = base64.b64encode(b"k" * size).decode()
    if not key:
        key = "===="
    check_refused(bridge, handshake_request(key=key), 400, "GET / HTTP/1.1")


@pytest.mark.parametrize("version", ["", "12", "14", "6"],
                         ids=["missing", "12", "14", "6"])
def test_bad_version(bridge, version):
    headers, body = check_refused(bridge, handshake_request(version=version), 400,
                                  "GET / HTTP/1.1")
    assert headers.get("sec-websocket-version") == "13, 8, 7"


# -- clients that leave during the handshake ---------------------------------------


@pytest.mark.parametrize("data", [b"GET / HT",
                                  handshake_request()[:-2],
                                  handshake_request()[:-1]],
                         ids=["half-request-line", "no-blank-line", "half-blank-line"])
def test_client_disconnects_mid_handshake(bridge, data):
    sock = connect(bridge.port)
    cport = local_port(sock)
    sock.sendall(data)
    sock.close()
    bridge.assert_one_line(
        cport, r"127\.0\.0\.1:%d: client disconnected during the handshake" % cport)


def test_client_resets_mid_handshake(bridge):
    sock = connect(bridge.port)
    cport = local_port(sock)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()    # RST
    bridge.assert_one_line(
        cport, r"127\.0\.0\.1:%d: client disconnected during the handshake" % cport)


def test_client_connects_and_sends_nothing(bridge):
    sock = connect(bridge.port)
    sock.close()
    bridge.assert_still_serving()


# -- the first frames ----------------------------------------------------------------


def protocol_error(bridge, frame, code, **open_kwargs):
    """Send ``frame`` after a good handshake: close ``code``, then TCP close."""
    ws = open_ws(bridge.port, **open_kwargs)
    cport = local_port(ws.sock)
    ws.sock.sendall(frame)
    got, _reason = ws.expect_close()
    assert got == code
    assert ws.at_eof()
    ws.close()
    bridge.wait_line(r"127\.0\.0\.1:%d / -> .*: closed \(%d" % (cport, code))
    bridge.assert_still_serving()
    lines = bridge.lines_about(cport)
    errors = [line for line in lines if "protocol error from client" in line]
    closed = [line for line in lines if re.search(r": closed \(%d\b" % code, line)]
    # One line about the violation and the session's closing line.
    assert len(errors) == 1 and "(closing %d)" % code in errors[0], lines
    assert len(closed) == 1, lines
    assert len(lines) == 2, lines
    return lines


def test_frame_length_2_pow_63(bridge):
    header = struct.pack("!BBQ", 0x82, 0xFF, 2 ** 63) + os.urandom(4)
    protocol_error(bridge, header, 1002)


def test_frame_length_2_pow_63_minus_1(bridge):
    header = struct.pack("!BBQ", 0x82, 0xFF, 2 ** 63 - 1) + os.urandom(4)
    protocol_error(bridge, header, 1009)


def test_unmasked_client_frame(bridge):
    protocol_error(bridge, mask_frame(OP_BINARY, b"unmasked", mask=False), 1002)


def test_invalid_utf8_text_frame(bridge):
    protocol_error(bridge, mask_frame(OP_TEXT, b"ok \xff\xfe not utf-8"), 1007)


def test_reserved_bits_frame(bridge):
    protocol_error(bridge, mask_frame(OP_BINARY, b"rsv", rsv=4), 1002)


def test_bad_close_code_from_client(bridge):
    protocol_error(bridge, mask_frame(OP_CLOSE, close_frame(1005)), 1002)


def test_max_frame_size_option(websockify, echo_target):
    proc, port = websockify("--workers", "1", "--max-frame-size", "1000",
                            "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    bridge = Bridge(proc, port, echo_target)
    # At the limit: passes through to the target and back.
    ws = open_ws(port)
    payload = os.urandom(1000)
    ws.send_binary(payload)
    assert ws.recv_data(1000) == payload
    ws.send(OP_CLOSE, close_frame(1000))
    assert ws.expect_close()[0] == 1000
    ws.close()
    # One byte over: 1009.
    protocol_error(bridge, mask_frame(OP_BINARY, os.urandom(1001)), 1009)


def test_max_frame_size_refused_from_header_alone(websockify, echo_target):
    proc, port = websockify("--workers", "1", "--max-frame-size", "1000",
                            "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    bridge = Bridge(proc, port, echo_target)
    header = struct.pack("!BBH", 0x82, 0x80 | 126, 1001) + os.urandom(4)
    protocol_error(bridge, header, 1009)


def test_text_frame_forwarded_as_bytes(bridge):
    ws = open_ws(bridge.port)
    text = "héllo wörld €".encode("utf-8")
    ws.send(OP_TEXT, text)
    got = b""
    while len(got) < len(text):
        fin, opcode, payload = ws.recv_frame()
        assert opcode == OP_BINARY      # the target's bytes always come back binary
        got += payload
    assert got == text
    ws.send(OP_CLOSE, close_frame(1000))
    assert ws.expect_close()[0] == 1000
    ws.close()
    bridge.assert_still_serving()


def test_fragmented_text_forwarded(bridge):
    ws = open_ws(bridge.port)
    raw = "€uro".encode()
    ws.send(OP_TEXT, raw[:1], fin=False)
    ws.send(OP_PING, b"mid")
    ws.send(0x0, raw[1:], fin=True)
    pongs = []
    got = b""
    while len(got) < len(raw) or not pongs:
        fin, opcode, payload = ws.recv_frame()
        if opcode == OP_PONG:
            pongs.append(payload)
        else:
            assert opcode == OP_BINARY
            got += payload
    assert got == raw
    assert pongs == [b"mid"]
    ws.close()
    bridge.assert_still_serving()


# -- target problems: 502 and 504 -------------------------------------------------


def test_target_refused_502(websockify):
    dead = free_port()
    proc, port = websockify("--workers", "1", "127.0.0.1:{port}", "127.0.0.1:%d" % dead)
    workers = wait_for(lambda: children_of(proc.pid), what="worker")
    cports = []
    for _ in range(2):      # the worker answers again after the first 502
        sock = connect(port)
        cports.append(local_port(sock))
        sock.sendall(handshake_request())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        sock.close()
        assert data.startswith(b"HTTP/1.1 502 ")
        assert b" 101 " not in data
        head, _, body = data.partition(b"\r\n\r\n")
        assert b"content-type: text/plain" in head.lower()
        assert 0 < len(body) < 300
        assert str(dead).encode() in body
    for cport in cports:
        proc.wait_log(refusal_pattern(cport, 502, "GET / HTTP/1.1"))
        lines = [l for l in proc.log().splitlines() if "127.0.0.1:%d:" % cport in l]
        assert len(lines) == 1, proc.log()
    assert children_of(proc.pid) == workers
    assert "Traceback" not in proc.log()


@pytest.fixture
def unaccepting_target():
    """A listener whose backlog is full: further SYNs are dropped, connect hangs."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(("127.0.0.1", port))
        pytest.skip("this kernel does not drop SYNs to a full backlog")
    except (socket.timeout, TimeoutError):
        pass
    finally:
        probe.close()
    yield port
    for sock in fillers + [listener]:
        sock.close()


def test_target_connect_timeout_504(websockify, unaccepting_target):
    proc, port = websockify("--workers", "1", "--connect-timeout", "1",
                            "127.0.0.1:{port}", "127.0.0.1:%d" % unaccepting_target)
    workers = wait_for(lambda: children_of(proc.pid), what="worker")
    sock = connect(port, timeout=15.0)
    cport = local_port(sock)
    sock.sendall(handshake_request())
    status, headers, body = read_http_response(sock)
    sock.close()
    assert status == 504, (status, headers, body)
    assert 0 < len(body) < 300
    proc.wait_log(refusal_pattern(cport, 504, "GET / HTTP/1.1"))
    # The worker still answers (a plain request gets its 405).
    status, _, _, _ = send_and_read(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 405
    lines = [l for l in proc.log().splitlines() if "127.0.0.1:%d:" % cport in l]
    assert len(lines) == 1, proc.log()
    assert children_of(proc.pid) == workers
    assert "Traceback" not in proc.log()


# -- control frames and closing ----------------------------------------------------


def test_ping_pong_same_payload(bridge):
    ws = open_ws(bridge.port)
    for payload in (b"", b"ping!", os.urandom(125)):
        ws.send(OP_PING, payload)
        fin, opcode, got = ws.recv_frame()
        assert (fin, opcode, got) == (True, OP_PONG, payload)
    ws.send_binary(b"after pings")
    assert ws.recv_data(11) == b"after pings"
    ws.close()
    bridge.assert_still_serving()


def test_client_close_code_echoed(bridge):
    ws = open_ws(bridge.port)
    cport = local_port(ws.sock)
    ws.send(OP_CLOSE, close_frame(3001, b"client done"))
    code, _reason = ws.expect_close()
    assert code == 3001
    assert ws.at_eof()
    ws.close()
    bridge.assert_one_line(cport, r"127\.0\.0\.1:%d / -> .*: closed \(3001" % cport)


def test_empty_client_close(bridge):
    ws = open_ws(bridge.port)
    ws.send(OP_CLOSE, b"")
    fin, opcode, payload = ws.recv_frame()
    assert opcode == OP_CLOSE
    assert payload == b""        # no status in, no status out (RFC 6455 5.5.1)
    assert ws.at_eof()
    ws.close()
    bridge.assert_still_serving()


@pytest.fixture
def closing_target():
    """A target that accepts and closes each connection at once."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()

    listener.settimeout(0.1)

    def run():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()
    thread.join(2)


def test_target_closes(websockify, closing_target):
    proc, port = websockify("--workers", "1", "127.0.0.1:{port}",
                            "127.0.0.1:%d" % closing_target)
    workers = wait_for(lambda: children_of(proc.pid), what="worker")
    for _ in range(2):
        ws = open_ws(port)
        cport = local_port(ws.sock)
        assert ws.expect_close() == (1000, "Target closed")
        ws.send(OP_CLOSE, close_frame(1000))
        assert ws.at_eof()
        ws.close()
        proc.wait_log(r"127\.0\.0\.1:%d / -> .*: closed \(1000" % cport)
        lines = [l for l in proc.log().splitlines() if "127.0.0.1:%d " % cport in l]
        assert len(lines) == 1, proc.log()
    assert children_of(proc.pid) == workers
    assert "Traceback" not in proc.log()


def test_target_closed_reason_kept_in_log(websockify, closing_target):
    """The session line says why it ended: the target closed, not the client.

    The client's close frame is only the reply to ours; it must not replace
    the reason in the log line.
    """
    proc, port = websockify("--workers", "1", "127.0.0.1:{port}",
                            "127.0.0.1:%d" % closing_target)
    ws = open_ws(port)
    cport = local_port(ws.sock)
    assert ws.expect_close() == (1000, "Target closed")
    ws.send(OP_CLOSE, close_frame(1000))
    assert ws.at_eof()
    ws.close()
    line = proc.wait_log(r"127\.0\.0\.1:%d / -> [^\n]*: closed \([^\n]*" % cport).group(0)
    assert "closed (1000 Target closed)" in line, line


# -- early data ------------------------------------------------------------------------


def test_early_data_in_handshake_packet(bridge):
    sock = connect(bridge.port)
    sock.sendall(handshake_request() + mask_frame(OP_BINARY, b"early bird")
                 + mask_frame(OP_PING, b"early ping"))
    status, headers, rest = read_http_response(sock)
    assert status == 101
    ws = attach(sock, rest)
    frames = [ws.recv_frame(), ws.recv_frame()]
    assert (True, OP_PONG, b"early ping") in frames
    assert b"".join(p for _, op, p in frames if op == OP_BINARY) == b"early bird"
    ws.send(OP_CLOSE, close_frame(1000))
    assert ws.expect_close()[0] == 1000
    ws.close()
    bridge.assert_still_serving()


def test_early_close_in_handshake_packet(bridge):
    sock = connect(bridge.port)
    sock.sendall(handshake_request() + mask_frame(OP_BINARY, b"then bye")
                 + mask_frame(OP_CLOSE, close_frame(4001)))
    status, headers, rest = read_http_response(sock)
    assert status == 101
    ws = attach(sock, rest)
    assert ws.expect_close()[0] == 4001
    assert ws.at_eof()
    ws.close()
    bridge.assert_still_serving()


# -- many refusals ---------------------------------------------------------------------


def test_many_interleaved_refusals_keep_workers(websockify, echo_target):
    proc, port = websockify("--workers", "2", "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    bridge = Bridge(proc, port, echo_target, workers=2)
    kinds = [
        (handshake_request(key=""), 400),
        (handshake_request(key="!!!notbase64"), 400),
        (handshake_request(version="12"), 400),
        (upgrade_head("GET / HTTP/1.0"), 400),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00garbage\r\n\r\n", 400),
        (upgrade_head(headers=["Host: x", "X-Big: " + "b" * 17000]), 431),
        (b"hello\r\n\r\n", 400),
    ]
    plan = [kinds[i % len(kinds)] for i in range(21)]
    socks = [connect(port) for _ in plan]
    cports = [local_port(s) for s in socks]
    # Interleave: first half of every request, then the second halves.
    for sock, (data, _) in zip(socks, plan):
        sock.sendall(data[:len(data) // 2])
    for sock, (data, _) in reversed(list(zip(socks, plan))):
        sock.sendall(data[len(data) // 2:])
    for sock, (_, status) in zip(socks, plan):
        got, _, _ = read_http_response(sock)
        assert got == status
        sock.close()
    # A few clients that give up half way, too.
    for _ in range(3):
        sock = connect(port)
        sock.sendall(b"GET / HTTP/1.1\r\nHost")
        sock.close()
    for cport, (_, status) in zip(cports, plan):
        proc.wait_log(refusal_pattern(cport, status))
    for _ in range(4):
        assert bridge.echo_session() in bridge.workers
    assert sorted(children_of(proc.pid)) == bridge.workers
    for cport in cports:
        assert len(bridge.lines_about(cport)) == 1, proc.log()
    assert proc.log().count(": refused ") == len(plan)
    assert "Traceback" not in proc.log()
