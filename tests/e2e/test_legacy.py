"""Legacy WebSocket clients: the base64 subprotocol and Hixie-75/76.

Raw-socket clients speak each version byte by byte against the real server
process (one worker, so "the same worker keeps serving" is a pid check),
proxying to the bundled echo target; the parsers are also fed random splits
of valid streams directly.
"""

import base64
import os
import re
import socket
import struct
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

from tests.helpers import (RawWebSocket, ServerUnderTest, children_of, free_port,
                           handshake_request, mask_frame, read_http_response)
from websockify.errors import InvalidPayload, MessageTooBig, ProtocolError
from websockify.protocol.legacy import (Base64Decoder, HixieParser, hixie76_challenge,
                               hixie76_key_number)

TIMEOUT = 10.0
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING = 0x0, 0x1, 0x2, 0x8, 0x9
RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

# draft-hixie-thewebsocketprotocol-76, section 1.3 / 5.2
KEY1 = "4 @1  46546xW%0l 1 5"
KEY2 = "12998 5 Y3 1  .P00"
KEY3 = b"^n:ds[4U"
ANSWER = b"8jKS'y:G*Co,Wxa-"
# Another valid pair (digits / spaces is an integer): 4 spaces, 1 space.
KEY1_B = "1 2 3 6"          # 1236 / 3
KEY2_B = "77 7"             # 777 / 1


# -- clients ------------------------------------------------------------------------


def connect(port):
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


def local_port(sock):
    return sock.getsockname()[1]


def hixie76_head(path="/demo", host="example.com", key1=KEY1, key2=KEY2,
                 protocol="sample", origin="http://example.com") -> bytes:
    lines = ["GET %s HTTP/1.1" % path, "Host: %s" % host, "Connection: Upgrade"]
    if key2 is not None:
        lines.append("Sec-WebSocket-Key2: %s" % key2)
    if protocol:
        lines.append("Sec-WebSocket-Protocol: %s" % protocol)
    lines.append("Upgrade: WebSocket")
    if key1 is not None:
        lines.append("Sec-WebSocket-Key1: %s" % key1)
    if origin:
        lines.append("Origin: %s" % origin)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def hixie75_head(path="/", host="127.0.0.1", origin="http://127.0.0.1",
                 protocol=None) -> bytes:
    lines = ["GET %s HTTP/1.1" % path, "Upgrade: WebSocket", "Connection: Upgrade",
             "Host: %s" % host, "Origin: %s" % origin]
    if protocol:
        lines.append("WebSocket-Protocol: %s" % protocol)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_exact(sock, n, buffer=b""):
    while len(buffer) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed after %d of %d bytes" % (len(buffer), n))
        buffer += chunk
    return buffer[:n], buffer[n:]


def read_head(sock):
    """The raw response head including its blank line, and what follows."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise EOFError("no complete response head: %r" % data)
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def hixie_frame(data: bytes) -> bytes:
    return b"\x00" + base64.b64encode(data) + b"\xff"


class HixieClient:
    """A Hixie-75/76 client over a socket whose handshake is done."""

    def __init__(self, sock, buffer=b""):
        self.sock = sock
        self.buffer = buffer

    def send(self, data: bytes) -> None:
        self.sock.sendall(hixie_frame(data))

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed")
        self.buffer += chunk

    def recv_frame(self):
        """("text", decoded bytes) or ("close", b"")."""
        while not self.buffer:
            self._fill()
        kind = self.buffer[0]
        if kind == 0x00:
            while b"\xff" not in self.buffer:
                self._fill()
            text, _, self.buffer = self.buffer[1:].partition(b"\xff")
            return "text", base64.b64decode(text, validate=True)
        assert kind == 0xFF, "unexpected frame type 0x%02x" % kind
        while len(self.buffer) < 2:
            self._fill()
        assert self.buffer[1] == 0x00, self.buffer[:2]
        self.buffer = self.buffer[2:]
        return "close", b""

    def recv_data(self, n) -> bytes:
        out = b""
        while len(out) < n:
            kind, data = self.recv_frame()
            assert kind == "text", "close frame after %d of %d bytes" % (len(out), n)
            out += data
        return out

    def at_eof(self, timeout=5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self):
        self.sock.close()


def open_hixie76(port, **kwargs):
    sock = connect(port)
    sock.sendall(hixie76_head(**kwargs) + KEY3)
    head, rest = read_head(sock)
    assert head.startswith(b"HTTP/1.1 101 WebSocket Protocol Handshake\r\n"), head
    answer, rest = read_exact(sock, 16, rest)
    assert answer == ANSWER
    return HixieClient(sock, rest)


def open_hixie75(port, **kwargs):
    sock = connect(port)
    sock.sendall(hixie75_head(**kwargs))
    head, rest = read_head(sock)
    assert head.startswith(b"HTTP/1.1 101 Web Socket Protocol Handshake\r\n"), head
    return HixieClient(sock, rest)


def open_hybi(port, protocols):
    ws = RawWebSocket(port, protocols=protocols)
    assert ws.status == 101, (ws.status, ws.headers, ws.buffer)
    return ws


def recv_base64(ws, n) -> bytes:
    """n decoded bytes from base64 text messages (each one complete)."""
    out = b""
    while len(out) < n:
        fin, opcode, payload = ws.recv_frame()
        assert opcode == OP_TEXT and fin, (fin, opcode)
        out += base64.b64decode(payload, validate=True)
    return out


# -- the server under test -----------------------------------------------------------


class Bridge(ServerUnderTest):
    def closed_line(self, cport, code=r"\d+"):
        return self.wait_line(r"\[(\d+)\] INFO 127\.0\.0\.1:%d \S+ -> [^\n]*: closed \((%s)"
                              % (cport, code))

    def assert_still_serving(self):
        """A binary HyBi session works on the same worker; nothing crashed."""
        ws = open_hybi(self.port, "binary")
        cport = local_port(ws.sock)
        ws.send_binary(b"still serving")
        assert ws.recv_data(13) == b"still serving"
        ws.send(OP_CLOSE, struct.pack("!H", 1000))
        assert ws.expect_close()[0] == 1000
        ws.close()
        pid = int(self.closed_line(cport, "1000").group(1))
        assert [pid] == self.workers == children_of(self.proc.pid)
        log = self.log()
        assert "Traceback" not in log and " ERROR " not in log, log

    def assert_refused(self, cport, status):
        line = self.wait_line(r"127\.0\.0\.1:%d: refused '[^\n]*': %d " % (cport, status))
        self.assert_still_serving()
        assert len(self.lines_about(cport)) == 1, self.log()
        return line.group(0)


# The servers below are shared by the module's tests that only talk to them
# (and stopped by their pids when the module is done); each test reads the
# log from its own start on.

@pytest.fixture(scope="module")
def shared_bridge(module_websockify, module_echo_target):
    proc, port = module_websockify("--workers", "1", "127.0.0.1:{port}",
                                   "127.0.0.1:%d" % module_echo_target)
    return Bridge(proc, port, module_echo_target)


@pytest.fixture
def bridge(shared_bridge):
    shared_bridge.mark()
    return shared_bridge


@pytest.fixture(scope="module")
def shared_small_bridge(module_websockify, module_echo_target):
    """--max-frame-size 1000."""
    proc, port = module_websockify("--workers", "1", "--max-frame-size", "1000",
                                   "127.0.0.1:{port}", "127.0.0.1:%d" % module_echo_target)
    return Bridge(proc, port, module_echo_target)


@pytest.fixture
def small_bridge(shared_small_bridge):
    shared_small_bridge.mark()
    return shared_small_bridge


def one_shot_target(payload: bytes):
    """A TCP target that sends ``payload``, closes, and records what it got."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    got = []

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(10)
            try:
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    got.append(chunk)
            except OSError:
                pass
        listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread, got


# -- Hixie-76 handshake ---------------------------------------------------------------


def test_hixie76_published_example(bridge):
    """The draft's own example, answered byte for byte (key3 in the same packet)."""
    sock = connect(bridge.port)
    cport = local_port(sock)
    sock.sendall(hixie76_head() + KEY3)
    expected = (b"HTTP/1.1 101 WebSocket Protocol Handshake\r\n"
                b"Upgrade: WebSocket\r\n"
                b"Connection: Upgrade\r\n"
                b"Sec-WebSocket-Origin: http://example.com\r\n"
                b"Sec-WebSocket-Location: ws://example.com/demo\r\n"
                b"Sec-WebSocket-Protocol: sample\r\n"
                b"\r\n" + ANSWER)
    got, rest = read_exact(sock, len(expected))
    assert got == expected
    client = HixieClient(sock, rest)
    client.send(b"hello hixie")
    assert client.recv_data(11) == b"hello hixie"
    sock.sendall(b"\xff\x00")
    assert client.recv_frame() == ("close", b"")
    assert client.at_eof()
    client.close()
    bridge.closed_line(cport, "1005")
    bridge.assert_still_serving()
    assert "11 bytes from client, 11 bytes to client" in bridge.lines_about(cport)[0]


def test_hixie76_challenge_function():
    number1 = hixie76_key_number(KEY1, "k1")
    number2 = hixie76_key_number(KEY2, "k2")
    assert (number1, number2) == (4146546015 // 5, 1299853100 // 5)   # the draft's numbers
    assert hixie76_challenge(number1, number2, KEY3) == ANSWER


@pytest.mark.parametrize("split", [0, 3, 8], ids=["after-head", "3+5", "all-later"])
def test_hixie76_key3_in_later_packets(bridge, split):
    """The 8 bytes may follow the head later, in pieces: no answer before all 8."""
    sock = connect(bridge.port)
    sock.sendall(hixie76_head() + KEY3[:split] if split < 8 else hixie76_head())
    sock.settimeout(0.5)
    with pytest.raises(socket.timeout):
        sock.recv(1)
    sock.settimeout(TIMEOUT)
    rest_of_key = KEY3[split:] if split < 8 else KEY3
    for byte in rest_of_key:
        sock.sendall(bytes([byte]))
        time.sleep(0.01)
    head, rest = read_head(sock)
    assert head.startswith(b"HTTP/1.1 101 WebSocket Protocol Handshake\r\n")
    answer, rest = read_exact(sock, 16, rest)
    assert answer == ANSWER
    client = HixieClient(sock, rest)
    client.send(b"late key")
    assert client.recv_data(8) == b"late key"
    client.close()
    bridge.assert_still_serving()


def test_hixie76_frames_sent_with_key3(bridge):
    """Frames in the same packet as head and key3 are not lost."""
    sock = connect(bridge.port)
    sock.sendall(hixie76_head() + KEY3 + hixie_frame(b"early") + hixie_frame(b" bird"))
    head, rest = read_head(sock)
    answer, rest = read_exact(sock, 16, rest)
    assert answer == ANSWER
    client = HixieClient(sock, rest)
    assert client.recv_data(10) == b"early bird"
    client.close()


def test_hixie76_other_keys_and_no_protocol(bridge):
    sock = connect(bridge.port)
    key3 = b"\x00\xff\x01\xfe abc"
    sock.sendall(hixie76_head(path="/x?y=1", host="127.0.0.1:%d" % bridge.port,
                              key1=KEY1_B, key2=KEY2_B, protocol=None,
                              origin="http://origin.test") + key3)
    expected = (b"HTTP/1.1 101 WebSocket Protocol Handshake\r\n"
                b"Upgrade: WebSocket\r\n"
                b"Connection: Upgrade\r\n"
                b"Sec-WebSocket-Origin: http://origin.test\r\n"
                b"Sec-WebSocket-Location: ws://127.0.0.1:%d/x?y=1\r\n"
                b"\r\n" % bridge.port)
    got, rest = read_exact(sock, len(expected) + 16)
    assert got[:-16] == expected
    assert got[-16:] == hixie76_challenge(412, 777, key3)
    sock.close()


@pytest.mark.parametrize("key1,key2", [
    ("12345678", KEY2),                 # no spaces
    (KEY1, "1299859Y31.P00"),           # no spaces in key2
    ("1 2 3", KEY2),                    # 123 / 2 is not an integer
    (KEY1, "7 7 7 7"),                  # 7777 / 3 is not an integer
    ("a b c", KEY2),                    # no digits
    ("42949672 96", KEY2),              # 4294967296 / 1 does not fit 32 bits
    (KEY1, None),                       # only one key
    (None, KEY2),
], ids=["no-spaces", "no-spaces-key2", "not-integer", "not-integer-key2", "no-digits",
        "over-32-bits", "key2-only", "key1-only"])
def test_hixie76_bad_keys(bridge, key1, key2):
    sock = connect(bridge.port)
    cport = local_port(sock)
    sock.sendall(hixie76_head(key1=key1, key2=key2) + KEY3)
    status, headers, body = read_http_response(sock)
    sock.close()
    assert status == 400, (status, headers, body)
    assert b"Key" in body
    bridge.assert_refused(cport, 400)


def test_hixie76_target_refused_before_answering(websockify):
    """The target is connected before the 101: a closed port gives 502."""
    dead = free_port()
    proc, port = websockify("--workers", "1", "127.0.0.1:{port}", "127.0.0.1:%d" % dead)
    sock = connect(port)
    cport = local_port(sock)
    sock.sendall(hixie76_head() + KEY3)
    status, headers, body = read_http_response(sock)
    sock.close()
    assert status == 502, (status, body)
    proc.wait_log(r"127\.0\.0\.1:%d: refused '[^\n]*': 502 " % cport)
    sock = connect(port)
    sock.sendall(hixie75_head())
    status, headers, body = read_http_response(sock)
    sock.close()
    assert status == 502, (status, body)


def test_hixie76_client_leaves_before_key3(bridge):
    sock = connect(bridge.port)
    cport = local_port(sock)
    sock.sendall(hixie76_head() + KEY3[:5])
    time.sleep(0.2)
    sock.close()
    line = bridge.wait_line(r"127\.0\.0\.1:%d: client disconnected during the handshake"
                            % cport)
    bridge.assert_still_serving()
    assert len(bridge.lines_about(cport)) == 1, bridge.log()
    assert line


def test_hixie76_key3_deadline(websockify, echo_target):
    """key3 is read under the handshake deadline (--handshake-timeout, from the
    connection; 1 s here instead of the default 10 s, the same mechanism)."""
    proc, port = websockify("--workers", "1", "--handshake-timeout", "1",
                            "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    bridge = Bridge(proc, port, echo_target)
    sock = connect(bridge.port)
    cport = local_port(sock)
    started = time.monotonic()
    sock.sendall(hixie76_head() + KEY3[:7])
    sock.settimeout(20)
    status, headers, body = read_http_response(sock)
    elapsed = time.monotonic() - started
    sock.close()
    assert status == 408, (status, body)
    assert 0.8 < elapsed < 6, elapsed
    bridge.assert_refused(cport, 408)


# -- Hixie-75 -------------------------------------------------------------------------


def test_hixie75_handshake_and_frames(bridge):
    sock = connect(bridge.port)
    cport = local_port(sock)
    sock.sendall(hixie75_head(path="/chat", host="example.com", origin="http://example.com",
                              protocol="base64"))
    expected = (b"HTTP/1.1 101 Web Socket Protocol Handshake\r\n"
                b"Upgrade: WebSocket\r\n"
                b"Connection: Upgrade\r\n"
                b"WebSocket-Origin: http://example.com\r\n"
                b"WebSocket-Location: ws://example.com/chat\r\n"
                b"WebSocket-Protocol: base64\r\n"
                b"\r\n")
    got, rest = read_exact(sock, len(expected))
    assert got == expected
    client = HixieClient(sock, rest)
    payload = bytes(range(256)) * 4
    client.send(payload[:100])
    client.send(payload[100:])
    assert client.recv_data(len(payload)) == payload
    sock.sendall(b"\xff\x00")
    assert client.recv_frame() == ("close", b"")
    assert client.at_eof()
    client.close()
    bridge.closed_line(cport, "1005")
    bridge.assert_still_serving()


def test_hixie75_target_close_hangs_up_without_waiting(websockify):
    """Draft 75 has no closing handshake: 0xFF 0x00, then TCP close at once."""
    target_port, thread, got = one_shot_target(b"goodbye \x00\xff")
    proc, port = websockify("--workers", "1", "127.0.0.1:{port}", "127.0.0.1:%d" % target_port)
    client = open_hixie75(port)
    cport = local_port(client.sock)
    assert client.recv_data(10) == b"goodbye \x00\xff"
    started = time.monotonic()
    assert client.recv_frame() == ("close", b"")
    assert client.at_eof(timeout=3)
    assert time.monotonic() - started < 2
    client.close()
    proc.wait_log(r"127\.0\.0\.1:%d / -> [^\n]*: closed \(1000 Target closed\)" % cport)


def test_hixie76_target_close_handshake(websockify):
    """Draft 76: the server's 0xFF 0x00 is answered, then the connection ends."""
    target_port, thread, got = one_shot_target(b"bye")
    proc, port = websockify("--workers", "1", "127.0.0.1:{port}", "127.0.0.1:%d" % target_port)
    client = open_hixie76(port)
    cport = local_port(client.sock)
    assert client.recv_data(3) == b"bye"
    assert client.recv_frame() == ("close", b"")
    client.sock.sendall(b"\xff\x00")
    assert client.at_eof(timeout=3)
    client.close()
    proc.wait_log(r"127\.0\.0\.1:%d /demo -> [^\n]*: closed \(1000 Target closed\)" % cport)


# -- Hixie data ----------------------------------------------------------------------


@pytest.mark.parametrize("opener", [open_hixie76, open_hixie75], ids=["76", "75"])
def test_hixie_binary_round_trip(bridge, opener):
    """Every byte value, a large payload, several frames per packet, byte-wise sends."""
    client = opener(bridge.port)
    cport = local_port(client.sock)
    every = bytes(range(256))
    client.send(every)
    assert client.recv_data(256) == every
    big = os.urandom(600 * 1024)
    client.send(big)
    assert client.recv_data(len(big)) == big
    client.sock.sendall(hixie_frame(b"\x00\xff") + hixie_frame(b"") + hixie_frame(b"xyz"))
    assert client.recv_data(5) == b"\x00\xffxyz"
    slow = b"one byte at a time \xff\x00"
    for byte in hixie_frame(slow):
        client.sock.sendall(bytes([byte]))
    assert client.recv_data(len(slow)) == slow
    client.sock.sendall(b"\xff\x00")
    assert client.recv_frame() == ("close", b"")
    assert client.at_eof()
    client.close()
    total = 256 + len(big) + 5 + len(slow)
    line = bridge.closed_line(cport, "1005").group(0)
    assert line
    assert "%d bytes from client, %d bytes to client" % (total, total) in \
        bridge.lines_about(cport)[0]
    bridge.assert_still_serving()


def test_hixie_heartbeat_sends_nothing(websockify, echo_target):
    """Hixie has no ping: --heartbeat does nothing for its sessions."""
    proc, port = websockify("--workers", "1", "--heartbeat", "0.2",
                            "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    client = open_hixie76(port)
    client.sock.settimeout(1.0)
    with pytest.raises(socket.timeout):
        client.sock.recv(1)
    client.sock.settimeout(TIMEOUT)
    client.send(b"alive")
    assert client.recv_data(5) == b"alive"
    client.close()


# -- Hixie bad input ---------------------------------------------------------------


def hixie_failure(bridge, data, reason, opener=open_hixie76):
    client = opener(bridge.port)
    cport = local_port(client.sock)
    try:
        client.sock.sendall(data)
    except OSError:
        pass                     # the server may hang up while we still send
    assert client.at_eof()
    assert client.buffer in (b"", b"\xff\x00"), client.buffer
    client.close()
    bridge.closed_line(cport)
    bridge.assert_still_serving()
    lines = bridge.lines_about(cport)
    errors = [line for line in lines if "protocol error from client" in line]
    assert len(errors) == 1 and re.search(reason, errors[0]), lines
    assert len(lines) == 2, lines


@pytest.mark.parametrize("opener", [open_hixie76, open_hixie75], ids=["76", "75"])
def test_hixie_frame_without_terminator(small_bridge, opener):
    hixie_failure(small_bridge, b"\x00" + b"QUFB" * 251, "without a terminator within 1000",
                  opener)


def test_hixie_frame_without_terminator_in_pieces(small_bridge):
    """Detected as the text arrives, whatever the packets."""
    client = open_hixie76(small_bridge.port)
    client.sock.sendall(b"\x00" + b"QUFB" * 200)
    time.sleep(0.1)
    client.sock.sendall(b"QUFB" * 49)          # 996 bytes: still within the limit
    # The text is streamed to the target as it comes (and echoed back).
    assert client.recv_data(249 * 3) == b"AAA" * 249
    assert not client.at_eof(timeout=0.3)
    client.sock.sendall(b"QUFBQUFB")
    assert client.at_eof()
    assert client.buffer == b"\xff\x00"
    client.close()
    small_bridge.assert_still_serving()


def test_hixie_frame_at_the_limit_passes(small_bridge):
    client = open_hixie76(small_bridge.port)
    payload = os.urandom(750)                    # 1000 characters of base64
    client.send(payload)
    assert client.recv_data(750) == payload
    client.close()


@pytest.mark.parametrize("data", [b"\x80\x05hello", b"\x01abc\xff", b"\xff\x05abcde",
                                  hixie_frame(b"ok") + b"\x7f"],
                         ids=["length-frame", "type-1", "ff-with-length", "after-a-frame"])
def test_hixie_unknown_frame_type(bridge, data):
    hixie_failure(bridge, data, "unsupported Hixie frame type")


@pytest.mark.parametrize("text", [b"not base64!", b"QUFB\nQUFB", b"QUF", b"QQ==QUFB",
                                  b"\xc3\xa9t\xc3\xa9"],
                         ids=["punctuation", "whitespace", "partial-group", "after-padding",
                              "utf-8"])
def test_hixie_invalid_base64(bridge, text):
    hixie_failure(bridge, b"\x00" + text + b"\xff", "base64")


# -- HyBi with the base64 subprotocol -------------------------------------------------


def test_base64_chosen_and_used_both_ways(bridge):
    ws = open_hybi(bridge.port, "base64")
    cport = local_port(ws.sock)
    assert ws.headers.get("sec-websocket-protocol") == "base64"
    payload = bytes(range(256))
    ws.send(OP_TEXT, base64.b64encode(payload))
    assert recv_base64(ws, 256) == payload
    # Binary frames carrying base64 are accepted too.
    ws.send(OP_BINARY, base64.b64encode(b"binary frame"))
    assert recv_base64(ws, 12) == b"binary frame"
    big = os.urandom(700 * 1024)
    ws.send(OP_TEXT, base64.b64encode(big))
    assert recv_base64(ws, len(big)) == big
    ws.send(OP_CLOSE, struct.pack("!H", 1000))
    assert ws.expect_close()[0] == 1000
    assert ws.at_eof()
    ws.close()
    bridge.closed_line(cport, "1000")
    total = 256 + 12 + len(big)
    assert "%d bytes from client, %d bytes to client" % (total, total) in \
        bridge.lines_about(cport)[0]
    bridge.assert_still_serving()


@pytest.mark.parametrize("offer", ["binary, base64", "base64, binary", "binary"])
def test_binary_wins_over_base64(bridge, offer):
    ws = open_hybi(bridge.port, offer)
    assert ws.headers.get("sec-websocket-protocol") == "binary"
    ws.send_binary(b"\x00\xffraw")
    fin, opcode, payload = ws.recv_frame()
    assert (fin, opcode, payload) == (True, OP_BINARY, b"\x00\xffraw")
    ws.close()


@pytest.mark.parametrize("offer", ["chat, base64", " base64 "])
def test_base64_chosen_among_others(bridge, offer):
    ws = open_hybi(bridge.port, offer)
    assert ws.headers.get("sec-websocket-protocol") == "base64"
    ws.send(OP_TEXT, b"aGk=")
    assert recv_base64(ws, 2) == b"hi"
    ws.close()


def test_base64_fragmented_message_split_mid_group(bridge):
    ws = open_hybi(bridge.port, "base64")
    data = bytes(range(40))
    text = base64.b64encode(data)            # 56 characters, ends with ==
    ws.send(OP_TEXT, text[:3], fin=False)
    ws.send(OP_CONT, text[3:10], fin=False)
    ws.send(OP_PING, b"between fragments")
    ws.send(OP_CONT, b"", fin=False)
    ws.send(OP_CONT, text[10:55], fin=False)
    ws.send(OP_CONT, text[55:])
    # The pong and the target's echo of the first fragments race each other.
    pongs, echoed = [], b""
    while not pongs or len(echoed) < 40:
        fin, opcode, payload = ws.recv_frame()
        if opcode == 0xA:
            pongs.append(payload)
        else:
            assert opcode == OP_TEXT and fin, (fin, opcode)
            echoed += base64.b64decode(payload, validate=True)
    assert pongs == [b"between fragments"]
    assert echoed == data
    # A second message after a padded one starts afresh.
    ws.send(OP_TEXT, base64.b64encode(b"again"))
    assert recv_base64(ws, 5) == b"again"
    # The whole stream one byte per TCP write, the header cut too.
    frame = mask_frame(OP_TEXT, base64.b64encode(b"bytewise"))
    for byte in frame:
        ws.sock.sendall(bytes([byte]))
    assert recv_base64(ws, 8) == b"bytewise"
    ws.close()


def base64_failure(bridge, frames, why):
    ws = open_hybi(bridge.port, "base64")
    cport = local_port(ws.sock)
    ws.sock.sendall(b"".join(frames))
    code, reason = ws.expect_close()
    assert code == 1007, (code, reason)
    assert ws.at_eof()
    ws.close()
    bridge.closed_line(cport, "1007")
    bridge.assert_still_serving()
    lines = bridge.lines_about(cport)
    errors = [line for line in lines if "protocol error from client" in line]
    assert len(errors) == 1 and "(closing 1007)" in errors[0] and why in errors[0], lines
    assert len(lines) == 2, lines


@pytest.mark.parametrize("text", [b"not base64!", b"QUFB QUFB", b"QUFB\r\n", b"QQ==QUFB",
                                  b"=QUF"],
                         ids=["punctuation", "space", "newline", "after-padding",
                              "leading-padding"])
def test_base64_invalid_closes_1007(bridge, text):
    base64_failure(bridge, [mask_frame(OP_TEXT, text)], "base64")


def test_base64_message_ending_mid_group_closes_1007(bridge):
    base64_failure(bridge, [mask_frame(OP_TEXT, b"QUFBQU", fin=False),
                            mask_frame(OP_CONT, b"F")], "4-character group")


def test_base64_padding_then_more_fragments_closes_1007(bridge):
    base64_failure(bridge, [mask_frame(OP_TEXT, b"QQ==", fin=False),
                            mask_frame(OP_CONT, b"QUFB")], "after padding")


def test_base64_target_close(websockify):
    target_port, thread, got = one_shot_target(b"\xff\x00 done")
    proc, port = websockify("--workers", "1", "127.0.0.1:{port}", "127.0.0.1:%d" % target_port)
    ws = open_hybi(port, "base64")
    assert recv_base64(ws, 7) == b"\xff\x00 done"
    assert ws.expect_close()[0] == 1000
    ws.send(OP_CLOSE, struct.pack("!H", 1000))
    assert ws.at_eof()
    ws.close()


def test_base64_heartbeat_pings(websockify, echo_target):
    """base64 is HyBi: --heartbeat pings as for binary."""
    proc, port = websockify("--workers", "1", "--heartbeat", "0.2",
                            "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    ws = open_hybi(port, "base64")
    fin, opcode, payload = ws.recv_frame()
    assert opcode == OP_PING
    ws.close()


# -- HyBi versions ------------------------------------------------------------------


@pytest.mark.parametrize("version", ["7", "8", "13"])
@pytest.mark.parametrize("protocols", ["binary", "base64"])
def test_hybi_versions_accept_key_and_data(bridge, version, protocols):
    sock = connect(bridge.port)
    sock.sendall(handshake_request(key=RFC_KEY, version=version, protocols=protocols))
    status, headers, rest = read_http_response(sock)
    assert status == 101, (status, headers)
    assert headers["sec-websocket-accept"] == RFC_ACCEPT
    assert headers["sec-websocket-protocol"] == protocols
    ws = RawWebSocket.__new__(RawWebSocket)
    ws.sock, ws.buffer = sock, rest
    data = b"v%s \x00\xff" % version.encode()
    if protocols == "binary":
        ws.send_binary(data)
        assert ws.recv_frame() == (True, OP_BINARY, data)
    else:
        ws.send(OP_TEXT, base64.b64encode(data))
        assert recv_base64(ws, len(data)) == data
    ws.close()


def test_hybi_key_without_version_is_not_hixie(bridge):
    """Sec-WebSocket-Key without a version is a broken HyBi request: 400."""
    sock = connect(bridge.port)
    cport = local_port(sock)
    sock.sendall(handshake_request(version=""))
    status, headers, body = read_http_response(sock)
    sock.close()
    assert status == 400
    assert headers.get("sec-websocket-version") == "13, 8, 7"
    bridge.assert_refused(cport, 400)


# -- the echo service -----------------------------------------------------------------


@pytest.fixture(scope="module")
def echo_server(module_websockify):
    proc, port = module_websockify("--workers", "1", "--echo", "127.0.0.1:{port}")
    return proc, port


def test_echo_binary_and_text_still_work(echo_server):
    proc, port = echo_server
    ws = open_hybi(port, "binary")
    ws.send_binary(b"\x00\xff")
    assert ws.recv_frame() == (True, OP_BINARY, b"\x00\xff")
    ws.send(OP_TEXT, b"text")
    assert ws.recv_frame() == (True, OP_TEXT, b"text")
    ws.close()


@pytest.mark.parametrize("kind", ["base64", "hixie76", "hixie75"])
def test_echo_with_legacy_clients(echo_server, kind):
    """--echo answers legacy clients in their own framing, every byte value."""
    proc, port = echo_server
    data = bytes(range(256))
    if kind == "base64":
        ws = open_hybi(port, "base64")
        assert ws.headers["sec-websocket-protocol"] == "base64"
        ws.send(OP_TEXT, base64.b64encode(data))
        # One text frame back, the exact base64 of what was sent.
        assert ws.recv_frame() == (True, OP_TEXT, base64.b64encode(data))
        ws.close()
        return
    client = open_hixie76(port) if kind == "hixie76" else open_hixie75(port)
    client.send(data)
    # One Hixie frame back, byte for byte what was sent, framed the same way.
    expected = hixie_frame(data)
    got, client.buffer = read_exact(client.sock, len(expected), client.buffer)
    assert got == expected
    client.close()


# -- the parsers, without sockets -------------------------------------------------------


def feed_in_pieces(parser, stream, cuts):
    points = sorted(set(c % (len(stream) + 1) for c in cuts))
    last = 0
    for point in points + [len(stream)]:
        piece = bytearray(stream[last:point])
        parser.feed_buffer(piece, len(piece))
        last = point


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=6), st.lists(st.integers(0, 10 ** 6),
                                                                 max_size=12))
def test_hixie_parser_any_split(messages, cuts):
    got, ends, controls = [], [], []
    decoder = Base64Decoder(lambda data, op: got.append(bytes(data)), ends.append)
    parser = HixieParser(decoder.data, lambda op, p: controls.append((op, p)), 10 ** 6,
                         on_message_end=decoder.message_end)
    stream = b"".join(hixie_frame(m) for m in messages) + b"\xff\x00" + b"ignored"
    feed_in_pieces(parser, stream, cuts)
    assert b"".join(got) == b"".join(messages)
    assert len(ends) == len(messages)
    assert controls == [(OP_CLOSE, b"")]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 500), max_size=10))
def test_base64_decoder_any_split(data, cuts):
    got = []
    decoder = Base64Decoder(lambda chunk, op: got.append(bytes(chunk)))
    text = base64.b64encode(data)
    points = sorted(set(c % (len(text) + 1) for c in cuts)) + [len(text)]
    last = 0
    for point in points:
        decoder.data(memoryview(text)[last:point], OP_TEXT)
        last = point
    decoder.message_end(OP_TEXT)
    assert b"".join(got) == data


@pytest.mark.parametrize("pieces,error", [
    ([b"QUFB", b"QU"], InvalidPayload),
    ([b"QQ==", b"QUFB"], InvalidPayload),
    ([b"QU\nFB"], InvalidPayload),
])
def test_base64_decoder_refusals(pieces, error):
    decoder = Base64Decoder(lambda chunk, op: None)
    with pytest.raises(error) as info:
        for piece in pieces:
            decoder.data(piece, OP_TEXT)
        decoder.message_end(OP_TEXT)
    assert info.value.close_code == 1007


def test_hixie_parser_refusals():
    parser = HixieParser(lambda d, o: None, lambda o, p: None, 10)
    with pytest.raises(MessageTooBig):
        parser.feed(b"\x00" + b"A" * 11)
    parser = HixieParser(lambda d, o: None, lambda o, p: None, 10)
    parser.feed(b"\x00" + b"A" * 10 + b"\xff")          # exactly at the limit
    with pytest.raises(ProtocolError):
        parser.feed(b"\x80\x00")
