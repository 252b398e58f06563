"""Property-based fuzzing of the frame path against a real server process.

One websockify (one worker, --max-frame-size 65536) bridges to the bundled
echo target for the whole module.  Each Hypothesis example opens a session
with a valid handshake and then sends random bytes, or valid frames followed
by garbage, or a plausible but invalid frame (reserved bits, unknown opcodes,
unmasked, huge or over-long control lengths, bad close bodies, invalid UTF-8
text, broken fragmentation, truncation).  A reference model of RFC 6455 says
how the stream must end; the test then checks that the session ends within a
few seconds, never hangs, that every server frame is well formed, that the
close code is the one the input deserves, that the worker survives, that a
normal session still echoes, and that the worker's memory stays bounded.
"""

import codecs
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.helpers import (PYTHON, Process, RawWebSocket, children_of, free_port, rss_kib,
                           handshake_request, mask_frame, pid_alive, port_open,
                           read_http_response, wait_for, websockify_argv)

MAX_FRAME = 65536
END_TIMEOUT = 5.0           # the session must be over this long after our last byte
RSS_GROWTH_KIB = 20 * 1024
# Close codes the server may send of its own accord.
SERVER_CODES = frozenset((1000, 1001, 1002, 1007, 1009, 1011))
# Codes a peer may put on the wire (RFC 6455 7.4.1, 7.4.2 and the registry).
SENDABLE = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014))


# -- one server for the module ------------------------------------------------

class Server:
    def __init__(self, master: Process, port: int, worker: int):
        self.master = master
        self.port = port
        self.worker = worker


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    logs = tmp_path_factory.mktemp("fuzz")
    started = []
    try:
        echo_port = free_port()
        echo = Process([PYTHON, "-m", "websockify.demo.echo", "127.0.0.1:%d" % echo_port],
                       str(logs / "echo.log"))
        started.append(echo)
        wait_for(lambda: port_open(echo_port), what="echo target on port %d" % echo_port)
        port = free_port()
        master = Process(websockify_argv("--workers", "1", "--max-frame-size", MAX_FRAME,
                                         "127.0.0.1:%d" % port, "127.0.0.1:%d" % echo_port),
                         str(logs / "websockify.log"))
        started.append(master)
        wait_for(lambda: port_open(port) or master.proc.poll() is not None,
                 what="websockify on port %d" % port)
        assert master.proc.poll() is None, master.log()
        master.wait_log(r"worker \d+ .*serving|proxying from", timeout=10)
        workers = wait_for(lambda: children_of(master.pid), what="the worker")
        assert len(workers) == 1, workers
        yield Server(master, port, workers[0])
    finally:
        for proc in reversed(started):
            proc.stop()


def check_worker(srv: Server, context=""):
    kids = children_of(srv.master.pid)
    assert kids == [srv.worker] and pid_alive(srv.worker), (
        "worker %d replaced or dead (children now %r) %s\n%s"
        % (srv.worker, kids, context, srv.master.log()[-4000:]))


def check_echo(srv: Server, tag: bytes):
    """A normal session still works: data echoes and a close is answered."""
    ws = RawWebSocket(srv.port, timeout=5.0)
    try:
        assert ws.status == 101, (ws.status, ws.buffer)
        payload = b"echo check " + tag
        ws.send_binary(payload)
        assert ws.recv_data(len(payload)) == payload
        ws.send(0x8, struct.pack("!H", 1000))
        assert ws.expect_close() == (1000, "")
        assert ws.at_eof(5.0)
    finally:
        ws.close()


# -- frames a client could send -----------------------------------------------

def frame(opcode, payload=b"", fin=True, rsv=0, mask=True, key=b"\x01\x02\x03\x04",
          length=None, form=None) -> bytes:
    """Any client frame; ``form`` forces a 7-, 16- or 64-bit length encoding."""
    length = len(payload) if length is None else length
    if form is None:
        form = 7 if length < 126 else 16 if length < 65536 else 64
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    m = 0x80 if mask else 0
    if form == 7:
        head = struct.pack("!BB", b0, m | length)
    elif form == 16:
        head = struct.pack("!BBH", b0, m | 126, length)
    else:
        head = struct.pack("!BBQ", b0, m | 127, length)
    if not mask:
        return head + payload
    return head + key + xor(payload, key)


def xor(data: bytes, key: bytes, offset: int = 0) -> bytes:
    return bytes(b ^ key[(i + offset) & 3] for i, b in enumerate(data))


# -- the reference model: how must this byte stream end? ------------------------

class Expect:
    """``kind``: "error" (close with one of ``codes``), "echo" (our close
    echoed with ``code``), "open" (a valid session still waiting for bytes).
    ``data``: payload bytes the target gets, in order, up to the end;
    ``pongs``: the payloads of the pongs the server owes us."""

    def __init__(self, kind, codes=frozenset(), code=None, why="", data=b"", pongs=()):
        self.kind, self.codes, self.code, self.why = kind, codes, code, why
        self.data, self.pongs = data, list(pongs)

    def __repr__(self):
        return "Expect(%s %s %s %r, %d data bytes, %d pongs)" % (
            self.kind, sorted(self.codes), self.code, self.why, len(self.data), len(self.pongs))



def _first_invalid_byte(state, chunk: bytes) -> int:
    """Where a decoder in ``state``, fed ``chunk`` byte by byte, first fails."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    decoder.setstate(state)
    for index in range(len(chunk)):
        try:
            decoder.decode(chunk[index:index + 1])
        except UnicodeDecodeError:
            return index
    return len(chunk)

def model(stream: bytes, max_frame: int = MAX_FRAME) -> Expect:
    pos = 0
    data = bytearray()
    pongs = []
    message = 0                      # opcode of the open data message, 0 if none
    text = None

    def end(kind, codes=(), code=None, why=""):
        return Expect(kind, frozenset(codes), code, why, bytes(data), pongs)

    while True:
        avail = len(stream) - pos
        if avail < 2:
            return end("open", why="between frames" if not avail else "1 header byte")
        b0, b1 = stream[pos], stream[pos + 1]
        fin, rsv, opcode = bool(b0 & 0x80), b0 & 0x70, b0 & 0x0F
        masked, length = bool(b1 & 0x80), b1 & 0x7F
        # What the first two bytes already condemn.
        errors = set()
        if rsv:
            errors.add("rsv")
        if opcode in (3, 4, 5, 6, 7) or opcode > 0xA:
            errors.add("opcode %d" % opcode)
        if opcode >= 8 and not fin:
            errors.add("fragmented control")
        if opcode >= 8 and length > 125:
            errors.add("control over 125")
        if not masked:
            errors.add("unmasked")
        if errors:
            return end("error", {1002}, why=", ".join(sorted(errors)))
        size = 2 + {126: 2, 127: 8}.get(length, 0) + 4
        if avail < size:
            return end("open", why="partial header")
        codes = set()
        reasons = []
        if length == 126:
            length = struct.unpack("!H", stream[pos + 2:pos + 4])[0]
        elif length == 127:
            length = struct.unpack("!Q", stream[pos + 2:pos + 10])[0]
            if length >> 63:
                codes.add(1002)
                reasons.append("length MSB")
        if length > max_frame:
            codes.add(1009)
            reasons.append("too big")
        if opcode == 0 and not message:
            codes.add(1002)
            reasons.append("continuation without message")
        if opcode in (1, 2) and message:
            codes.add(1002)
            reasons.append("new message inside fragmented one")
        if codes:
            return end("error", codes, why=", ".join(reasons))
        key = stream[pos + size - 4:pos + size]
        pos += size
        chunk = xor(stream[pos:pos + length], key)
        pos += len(chunk)
        complete = len(chunk) == length
        if opcode >= 8:
            if not complete:
                return end("open", why="partial control frame")
            if opcode == 0x9:
                pongs.append(chunk)
            elif opcode == 0x8:
                if len(chunk) == 1:
                    return end("error", {1002}, why="1-byte close body")
                if not chunk:
                    return end("echo", code=None, why="empty close")
                code = struct.unpack("!H", chunk[:2])[0]
                if not (code in SENDABLE or 3000 <= code <= 4999):
                    return end("error", {1002}, why="close code %d" % code)
                try:
                    chunk[2:].decode("utf-8")
                except UnicodeDecodeError:
                    return end("error", {1007}, why="close reason not UTF-8")
                return end("echo", code=code, why="close %d" % code)
            continue
        if opcode:
            message = opcode
            text = codecs.getincrementaldecoder("utf-8")() if opcode == 1 else None
        if text is not None:
            state = text.getstate()
            try:
                text.decode(chunk, complete and fin)
            except UnicodeDecodeError:
                # Payload is streamed in pieces: every byte before the one that
                # makes the text invalid (the start of an unfinished sequence
                # included) may already be on its way to the target.
                data += chunk[:_first_invalid_byte(state, chunk)]
                return end("error", {1007}, why="text not UTF-8")
        data += chunk
        if not complete:
            return end("open", why="partial data frame")
        if fin:
            message, text = 0, None


# -- strategies -----------------------------------------------------------------

keys = st.binary(min_size=4, max_size=4)
small = st.binary(max_size=200)
utf8_text = st.text(max_size=80).map(lambda s: s.encode("utf-8"))
BAD_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xc0\xaf", b"\xc1\xbf", b"\xe0\x80\xaf",
            b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80",
            b"\xf8\x88\x80\x80\x80", b"\xe2\x82", b"\xce", b"\xf0\x9f\x98"]


@st.composite
def split(draw, payload: bytes, max_parts=4):
    """Cut a payload into fragments (possibly empty ones)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=max_parts - 1)))
    bounds = [0] + cuts + [len(payload)]
    return [payload[a:b] for a, b in zip(bounds, bounds[1:])]


@st.composite
def valid_control(draw, key):
    opcode = draw(st.sampled_from([0x9, 0xA]))
    return frame(opcode, draw(st.binary(max_size=125)), key=key)


@st.composite
def valid_message(draw):
    """One valid data message (maybe fragmented, with control frames between)."""
    key = draw(keys)
    kind = draw(st.sampled_from(["binary", "text", "control"]))
    if kind == "control":
        return draw(valid_control(key))
    opcode = 2 if kind == "binary" else 1
    payload = draw(small) if opcode == 2 else draw(utf8_text)
    parts = draw(split(payload))
    out = b""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        form = draw(st.sampled_from([None, None, None, 16, 64]))
        out += frame(opcode if i == 0 else 0, part, fin=last, key=key, form=form)
        if not last and draw(st.booleans()):
            out += draw(valid_control(key))
    return out


@st.composite
def invalid_frame(draw):
    """A plausible frame that breaks one rule (or a valid close, or a cut frame)."""
    key = draw(keys)
    kind = draw(st.sampled_from([
        "rsv", "opcode", "unmasked", "huge", "msb", "long control", "fragmented control",
        "close 1 byte", "close bad code", "close bad reason", "close ok", "close ok",
        "text bad utf8", "fragmented bad utf8", "continuation first", "new message inside",
        "truncated", "header only"]))
    if kind == "rsv":
        return frame(draw(st.sampled_from([1, 2, 8, 9, 10])), draw(small),
                     rsv=draw(st.integers(1, 7)), key=key)
    if kind == "opcode":
        return frame(draw(st.sampled_from([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])),
                     draw(st.binary(max_size=125)), key=key)
    if kind == "unmasked":
        return frame(draw(st.sampled_from([0, 1, 2, 8, 9, 10])), draw(st.binary(max_size=125)),
                     mask=False)
    if kind in ("huge", "msb"):
        if kind == "huge":
            length = draw(st.integers(MAX_FRAME + 1, 2 ** 63 - 1))
        else:
            length = draw(st.integers(2 ** 63, 2 ** 64 - 1))
        return frame(draw(st.sampled_from([1, 2])), draw(small), length=length, form=64,
                     key=key)
    if kind == "long control":
        payload = draw(st.binary(min_size=126, max_size=600))
        return frame(draw(st.sampled_from([8, 9, 10])), payload, key=key)
    if kind == "fragmented control":
        return frame(draw(st.sampled_from([8, 9, 10])), draw(st.binary(max_size=125)),
                     fin=False, key=key)
    if kind == "close 1 byte":
        return frame(8, draw(st.binary(min_size=1, max_size=1)), key=key)
    if kind == "close bad code":
        code = draw(st.one_of(st.integers(0, 999), st.sampled_from([1004, 1005, 1006, 1015]),
                              st.integers(1016, 2999), st.integers(5000, 65535)))
        return frame(8, struct.pack("!H", code) + draw(st.binary(max_size=20)), key=key)
    if kind == "close bad reason":
        bad = draw(st.sampled_from(BAD_UTF8[:-3]))       # complete but invalid
        reason = draw(utf8_text)[:40] + bad + draw(utf8_text)[:40]
        return frame(8, struct.pack("!H", draw(st.sampled_from([1000, 1001, 3000])))
                     + reason, key=key)
    if kind == "close ok":
        code = draw(st.one_of(st.sampled_from(sorted(SENDABLE)), st.integers(3000, 4999)))
        body = draw(st.sampled_from([b"", struct.pack("!H", code) + draw(utf8_text)[:100]]))
        return frame(8, body, key=key)
    if kind in ("text bad utf8", "fragmented bad utf8"):
        payload = draw(utf8_text) + draw(st.sampled_from(BAD_UTF8)) + draw(utf8_text)
        parts = draw(split(payload)) if kind == "fragmented bad utf8" else [payload]
        return b"".join(frame(1 if i == 0 else 0, part, fin=i == len(parts) - 1, key=key)
                        for i, part in enumerate(parts))
    if kind == "continuation first":
        return frame(0, draw(small), fin=draw(st.booleans()), key=key)
    if kind == "new message inside":
        return (frame(draw(st.sampled_from([1, 2])), b"abc", fin=False, key=key)
                + frame(draw(st.sampled_from([1, 2])), draw(small), key=key))
    if kind == "truncated":
        whole = frame(draw(st.sampled_from([1, 2, 8, 9, 10])), draw(st.binary(max_size=120)),
                      key=key)
        return whole[:draw(st.integers(1, max(1, len(whole) - 1)))]
    # header only: a valid data header announcing more than follows, maybe cut itself
    header = frame(draw(st.sampled_from([1, 2])), b"", length=draw(st.integers(1, MAX_FRAME)),
                   key=key)
    return header[:draw(st.integers(1, len(header)))]


@st.composite
def valid_header_then_garbage(draw):
    """A valid masked frame header, then random bytes as (part of) its payload."""
    opcode = draw(st.sampled_from([1, 2, 8, 9, 10]))
    limit = 125 if opcode >= 8 else 4096
    length = draw(st.integers(0, limit))
    return frame(opcode, b"", length=length, key=draw(keys)) + draw(st.binary(max_size=4096))


@st.composite
def streams(draw):
    shape = draw(st.sampled_from(["garbage", "header+garbage", "frames+garbage",
                                  "frames+invalid", "frames+invalid", "frames+invalid",
                                  "frames"]))
    if shape == "garbage":
        return draw(st.binary(max_size=4096))
    if shape == "header+garbage":
        return draw(valid_header_then_garbage())
    prefix = b"".join(draw(st.lists(valid_message(), min_size=shape == "frames", max_size=5)))
    if shape == "frames+garbage":
        return prefix + draw(st.binary(min_size=1, max_size=4096))
    if shape == "frames":
        return prefix
    tail = draw(st.binary(max_size=300)) if draw(st.booleans()) else b""
    return prefix + draw(invalid_frame()) + tail


# -- reading what the server sends ------------------------------------------------

class Received:
    def __init__(self):
        self.frames = []        # (fin, rsv, opcode, payload)
        self.ending = None      # "eof", "reset" or "timeout"

    @property
    def data(self):
        return b"".join(p for _, _, op, p in self.frames if op == 0x2)

    @property
    def pongs(self):
        return [p for _, _, op, p in self.frames if op == 0xA]

    @property
    def close(self):
        closes = [p for _, _, op, p in self.frames if op == 0x8]
        return closes[0] if closes else None


class Reader:
    """Parses server frames as they come, checking each is well formed."""

    def __init__(self, sock, buffer: bytes):
        self.sock = sock
        self.buffer = bytearray(buffer)
        self.got = Received()

    def _parse(self):
        while len(self.buffer) >= 2:
            b0, b1 = self.buffer[0], self.buffer[1]
            assert not b1 & 0x80, "server frame is masked: %r" % bytes(self.buffer[:16])
            length, pos = b1 & 0x7F, 2
            if length == 126:
                if len(self.buffer) < 4:
                    return
                length, pos = struct.unpack("!H", self.buffer[2:4])[0], 4
                assert length >= 126, "non-minimal 16-bit length %d" % length
            elif length == 127:
                if len(self.buffer) < 10:
                    return
                length, pos = struct.unpack("!Q", self.buffer[2:10])[0], 10
                assert 65536 <= length < 2 ** 63, "bad 64-bit length %d" % length
            if len(self.buffer) < pos + length:
                return
            payload = bytes(self.buffer[pos:pos + length])
            del self.buffer[:pos + length]
            fin, rsv, opcode = bool(b0 & 0x80), (b0 >> 4) & 7, b0 & 0x0F
            assert self.got.close is None, "frame after the close frame: %r" % ((fin, opcode),)
            assert rsv == 0, "server frame with reserved bits %d" % rsv
            assert opcode in (0x2, 0x8, 0xA), "unexpected server opcode %d" % opcode
            assert fin, "server sent a fragment (opcode %d)" % opcode
            if opcode >= 8:
                assert length <= 125, "server control frame of %d bytes" % length
            self.got.frames.append((fin, rsv, opcode, payload))

    def read(self, timeout, until=None) -> Received:
        """Read until EOF/reset, ``until(received)`` is true, or the timeout."""
        deadline = time.monotonic() + timeout
        self._parse()
        while not (until and until(self.got)):
            left = deadline - time.monotonic()
            if left <= 0:
                self.got.ending = "timeout"
                return self.got
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                self.got.ending = "reset"
                return self.got
            if not chunk:
                self.got.ending = "eof"
                assert not self.buffer, "connection ended inside a frame: %r" % bytes(
                    self.buffer[:32])
                return self.got
            self.buffer += chunk
            self._parse()
        return self.got


# -- the property -----------------------------------------------------------------

def check_close_body(body: bytes, expect: Expect, stream: bytes):
    context = "expected %r for %d bytes %r" % (expect, len(stream), stream[:64])
    assert len(body) != 1, "close frame with a 1-byte body; " + context
    code = struct.unpack("!H", body[:2])[0] if body else None
    body[2:].decode("utf-8")            # the reason must be UTF-8
    if expect.kind == "error":
        assert code in expect.codes, "close code %r, want one of %s; %s" % (
            code, sorted(expect.codes), context)
    elif expect.kind == "echo":
        assert code == expect.code, "close code %r, want our own %r echoed; %s" % (
            code, expect.code, context)
    else:
        assert code is None or code in SERVER_CODES, "close code %r; %s" % (code, context)


def run_example(srv: Server, stream: bytes, mode: str, early: bool, cuts=()):
    expect = model(stream)
    context = "expected %r" % (expect,)
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=5.0)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request = handshake_request("/", "127.0.0.1")
        bounds = [0] + sorted(min(c, len(stream)) for c in cuts) + [len(stream)]
        pieces = [stream[a:b] for a, b in zip(bounds, bounds[1:])]
        if early:
            # The first piece rides in the same segment as the request.
            sock.sendall(request + pieces.pop(0))
        else:
            sock.sendall(request)
        status, _, rest = read_http_response(sock)
        assert status == 101, (status, rest)
        if not early:
            assert not rest, "server spoke first: %r" % rest
        try:
            for piece in pieces:
                if len(pieces) > 1:
                    time.sleep(0.002)   # separate segments, separate reads
                sock.sendall(piece)
        except OSError:
            pass                        # the server may hang up on us mid-send
        reader = Reader(sock, rest)
        if mode == "shutdown" or expect.kind == "open":
            if expect.kind == "open" and mode != "shutdown":
                # A valid session: everything must echo back, and no close.
                got = reader.read(END_TIMEOUT, until=lambda r: len(r.data) >= len(expect.data)
                                  and len(r.pongs) >= len(expect.pongs))
                assert got.ending is None and got.close is None, (
                    "valid session ended early (%s, close %r); %s"
                    % (got.ending, got.close, context))
                assert got.data == expect.data, context
                assert got.pongs == expect.pongs, context
                got = reader.read(0.05)                 # and it stays open
                assert got.ending == "timeout" and got.close is None, (
                    "valid session ended (%s, close %r); %s" % (got.ending, got.close, context))
                got.ending = None
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            got = reader.read(END_TIMEOUT)
        elif mode == "reply":
            got = reader.read(END_TIMEOUT, until=lambda r: r.close is not None)
            if got.close is not None:
                try:
                    sock.sendall(mask_frame(0x8, got.close[:2]))
                except OSError:
                    pass
                got = reader.read(END_TIMEOUT)
        else:   # "wait": no shutdown, the server must end the session by itself
            got = reader.read(END_TIMEOUT)
        assert got.ending in ("eof", "reset"), (
            "session still open %gs after the last byte (close frame %r); %s"
            % (END_TIMEOUT, got.close, context))
        if expect.kind != "open":
            assert got.close is not None, (
                "connection ended (%s) without a close frame; %s" % (got.ending, context))
        if got.close is not None:
            check_close_body(got.close, expect, stream)
        assert expect.data.startswith(got.data), (
            "echoed bytes are not a prefix of the data sent; %s" % context)
        assert got.pongs == expect.pongs[:len(got.pongs)], "wrong pongs; " + context
    finally:
        sock.close()


K = b"\x37\xfa\x21\x3d"
_VALID = (frame(2, b"hello", key=K) + frame(9, b"are you there", key=K)
          + frame(1, "d\u00e9j\u00e0 ".encode()[:2], fin=False, key=K)
          + frame(10, b"unsolicited", key=K)
          + frame(0, "d\u00e9j\u00e0 ".encode()[2:], key=K))
# Every rule at least once, whatever the random phase draws.
EXAMPLES = [
    (_VALID, "wait"),
    (frame(2, bytes(range(256)) * 256, key=K), "wait"),                  # exactly the limit
    (_VALID + frame(2, b"x" * 100, length=MAX_FRAME, key=K), "wait"),    # partial frame
    (_VALID + frame(2, b"", length=MAX_FRAME + 1, form=64, key=K), "wait"),
    (frame(2, b"", length=2 ** 40, form=64, key=K), "reply"),
    (frame(2, b"", length=2 ** 63 + 5, form=64, key=K), "wait"),
    (frame(1, b"abc\xff", key=K), "wait"),
    (frame(1, b"abc\xe2\x82", key=K), "shutdown"),                       # cut at the end
    (frame(1, b"ab\xe2", fin=False, key=K) + frame(0, b"\x82xy", key=K), "wait"),
    (frame(1, b"ab\xe2", fin=False, key=K) + frame(0, b"", key=K), "reply"),
    (frame(1, b"ab\xed", fin=False, key=K) + frame(0, b"\xa0\x80", key=K), "wait"),
    (_VALID + frame(8, struct.pack("!H", 3000) + b"bye", key=K), "reply"),
    (frame(8, struct.pack("!H", 1001), key=K), "wait"),
    (frame(8, b"", key=K), "reply"),
    (frame(8, b"\x03", key=K), "wait"),
    (frame(8, struct.pack("!H", 1005), key=K), "wait"),
    (frame(8, struct.pack("!H", 999), key=K), "shutdown"),
    (frame(8, struct.pack("!H", 5000), key=K), "wait"),
    (frame(8, struct.pack("!H", 1000) + b"\xc0\xaf", key=K), "wait"),
    (frame(9, b"p" * 126, key=K), "wait"),
    (frame(8, struct.pack("!H", 1000) + b"r" * 124, key=K), "wait"),
    (frame(9, b"ping", fin=False, key=K), "wait"),
    (frame(2, b"unmasked", mask=False), "wait"),
    (frame(2, b"reserved", rsv=4, key=K), "wait"),
    (frame(3, b"opcode 3", key=K), "wait"),
    (frame(0xB, b"opcode 11", key=K), "wait"),
    (frame(0, b"orphan", key=K), "wait"),
    (frame(2, b"one", fin=False, key=K) + frame(1, b"two", key=K), "wait"),
    (_VALID + b"\x00" * 64, "wait"),
    (_VALID + b"\xff" * 64, "reply"),
]


def test_fuzzed_frames_end_cleanly_and_the_worker_survives(server):
    """Random and malformed frames: a proper close or EOF, never a hang or a crash."""
    for i in range(20):                               # warm up before measuring memory
        check_echo(server, b"warm-up %d" % i)
    check_worker(server)
    rss_start = rss_kib(server.worker)
    counter = [0]

    @settings(max_examples=200, deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow,
                                     HealthCheck.function_scoped_fixture,
                                     HealthCheck.data_too_large])
    @given(stream=streams(),
           mode=st.sampled_from(["shutdown", "wait", "reply"]),
           early=st.booleans(),
           cuts=st.lists(st.integers(0, 4200), max_size=4))
    def fuzz(stream, mode, early, cuts):
        """One session of fuzzed input, then the health checks."""
        counter[0] += 1
        run_example(server, stream, mode, early, cuts)
        check_worker(server, "after %d bytes %r" % (len(stream), stream[:64]))
        check_echo(server, b"%d" % counter[0])

    for i, (stream, mode) in enumerate(EXAMPLES):
        cuts = [1, 3, 7, 13] if i % 4 == 3 else []
        fuzz = example(stream=stream, mode=mode, early=i % 5 == 4, cuts=cuts)(fuzz)
    fuzz()
    check_worker(server)
    growth = rss_kib(server.worker) - rss_start
    assert growth < RSS_GROWTH_KIB, "worker RSS grew by %d KiB over %d examples" % (
        growth, counter[0])
