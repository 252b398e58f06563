"""--record: noVNC playback files, exact bytes both ways, unique names, bad paths.

The recordings are read back with a parser of the playback format written
here (a JavaScript array of single-quoted strings), and, when node is
installed, by JavaScript itself.
"""

import base64
import json
import os
import re
import signal
import socket
import subprocess
import textwrap
import threading
import time

import pytest

from tests.helpers import (PYTHON, ROOT, RawWebSocket, require_program, wait_for,
                           websockify_argv)
from tests.e2e.test_legacy import open_hixie76
from websockify.errors import EXIT_CONFIG
from websockify.record import FOOTER, HEADER, Recorder

TIMEOUT = 10.0
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE = 0x0, 0x1, 0x2, 0x8
ALL_BYTES = bytes(range(256)) + b"'quote' \"double\" \\ end"
BULK = os.urandom(2 * 1024 * 1024)   # large reads: would be spliced if not recorded


# -- reading a recording back ---------------------------------------------------------

_JS_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "v": "\v",
                      "0": "\0", "'": "'", '"': '"', "\\": "\\"}
_ENTRY = re.compile(r"'((?:[^'\\\n]|\\.)*)',\n")


def _js_unescape(text: str) -> bytes:
    def one(match):
        escape = match.group(1)
        if escape[0] == "x":
            return chr(int(escape[1:], 16))
        assert escape in _JS_SIMPLE_ESCAPES, "unexpected escape \\%s" % escape
        return _JS_SIMPLE_ESCAPES[escape]
    return re.sub(r"\\(x[0-9a-fA-F]{2}|.)", one, text).encode("latin-1")


def parse_recording(data: bytes) -> list:
    """[(mark, ms, payload)] of a complete playback file; mark '{' or '}'."""
    text = data.decode("ascii")
    assert text.startswith(HEADER.decode()), text[:80]
    assert text.endswith(FOOTER.decode()), "no footer: %r" % text[-80:]
    body = text[len(HEADER):-len(FOOTER)]
    entries = []
    pos = 0
    for match in _ENTRY.finditer(body):
        assert match.start() == pos, "garbage at %d: %r" % (pos, body[pos:pos + 40])
        pos = match.end()
        value = match.group(1)
        mark = value[0]
        assert mark in "{}", value[:20]
        ms, sep, rest = value[1:].partition(mark)
        assert sep and ms.isdigit(), value[:40]
        entries.append((mark, int(ms), _js_unescape(rest)))
    assert pos == len(body), "garbage at the end: %r" % body[pos:pos + 40]
    return entries


def directions(entries) -> tuple:
    """(bytes to the client, bytes from the client), and the timestamps are in order."""
    stamps = [ms for _, ms, _ in entries]
    assert stamps == sorted(stamps), stamps
    to_client = b"".join(data for mark, _, data in entries if mark == "{")
    from_client = b"".join(data for mark, _, data in entries if mark == "}")
    return to_client, from_client


def complete_recording(path) -> bytes:
    """The file once its footer is written (the writer thread is asynchronous)."""
    def done():
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None
        return data if data.endswith(FOOTER) else None
    return wait_for(done, TIMEOUT, what="footer of %s" % path)


def recordings(prefix) -> dict:
    directory, base = os.path.split(str(prefix))
    return {name: os.path.join(directory, name) for name in os.listdir(directory)
            if re.fullmatch(re.escape(base) + r"\.\d+", name)}


# -- a target that sends known bytes and takes known bytes ----------------------------


class ScriptedTarget:
    """Sends ``payload`` in pieces, then reads until the bridge closes (if
    ``linger``) keeping what came, or closes at once."""

    def __init__(self, payload: bytes, pieces=4, pause=0.05, linger=True):
        self.payload = payload
        self.linger = linger
        self.pieces = pieces
        self.pause = pause
        self.received = bytearray()
        self.finished = threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        conn, _ = self.listener.accept()
        with conn:
            step = max(1, len(self.payload) // self.pieces)
            for start in range(0, len(self.payload), step):
                conn.sendall(self.payload[start:start + step])
                time.sleep(self.pause)
            while self.linger:
                data = conn.recv(65536)
                if not data:
                    break
                self.received += data
        self.finished.set()

    def close(self):
        self.listener.close()


@pytest.fixture
def scripted_target():
    made = []

    def make(payload, **kwargs):
        target = ScriptedTarget(payload, **kwargs)
        made.append(target)
        return target

    yield make
    for target in made:
        target.close()


# -- sessions ---------------------------------------------------------------------------


def send_hybi_messages(ws: RawWebSocket) -> bytes:
    """Client payloads in several shapes; returns the bytes in order."""
    sent = []

    def frame(opcode, payload, fin=True):
        ws.send(opcode, payload, fin=fin)
        sent.append(payload)

    frame(OP_BINARY, ALL_BYTES)
    frame(OP_BINARY, b"")
    time.sleep(0.2)                         # a later timestamp
    frame(OP_BINARY, b"frag'1-", fin=False)  # a fragmented message
    frame(OP_CONT, bytes(range(255, -1, -1)), fin=False)
    frame(OP_CONT, b"-end", fin=True)
    frame(OP_BINARY, os.urandom(300 * 1024))  # more than one read, and one hand-off
    return b"".join(sent)


def test_both_directions_recorded_exactly(websockify, scripted_target, tmp_path):
    target = scripted_target(ALL_BYTES + BULK)
    prefix = tmp_path / "rec"
    proc, port = websockify("--record", str(prefix), "127.0.0.1:{port}",
                            "127.0.0.1:%d" % target.port)
    ws = RawWebSocket(port)
    assert ws.status == 101
    start = time.monotonic()
    assert ws.recv_data(len(ALL_BYTES) + len(BULK)) == ALL_BYTES + BULK
    sent = send_hybi_messages(ws)
    ws.send(OP_CLOSE, b"\x03\xe8")
    assert ws.expect_close()[0] == 1000
    elapsed_ms = (time.monotonic() - start) * 1000
    ws.close()
    assert target.finished.wait(TIMEOUT)
    assert bytes(target.received) == sent

    files = recordings(prefix)
    assert list(files) == ["rec.1"], files
    entries = parse_recording(complete_recording(files["rec.1"]))
    to_client, from_client = directions(entries)
    assert to_client == ALL_BYTES + BULK
    assert from_client == sent
    # Milliseconds since the session started: the pause shows, and no more.
    assert entries[-1][1] >= 150
    assert entries[-1][1] <= elapsed_ms + 1000
    assert os.stat(files["rec.1"]).st_mode & 0o777 == 0o600
    assert re.search(r"recording to .*rec\.1", proc.log())


def test_recording_ends_with_footer_when_client_vanishes(websockify, scripted_target,
                                                         tmp_path):
    target = scripted_target(b"hello'", pieces=1)
    prefix = tmp_path / "rec"
    proc, port = websockify("--record", str(prefix), "127.0.0.1:{port}",
                            "127.0.0.1:%d" % target.port)
    ws = RawWebSocket(port)
    assert ws.recv_data(6) == b"hello'"
    ws.send_binary(b"bye\x00")
    assert wait_for(lambda: bytes(target.received) == b"bye\x00", TIMEOUT, what="bytes at target")
    ws.close()                              # no close frame: an abrupt end
    entries = parse_recording(complete_recording(str(prefix) + ".1"))
    assert directions(entries) == (b"hello'", b"bye\x00")


def test_recording_ends_with_footer_when_target_closes(websockify, scripted_target,
                                                      tmp_path):
    target = scripted_target(ALL_BYTES, pieces=2, linger=False)
    prefix = tmp_path / "rec"
    proc, port = websockify("--record", str(prefix), "127.0.0.1:{port}",
                            "127.0.0.1:%d" % target.port)
    ws = RawWebSocket(port)
    assert ws.recv_data(len(ALL_BYTES)) == ALL_BYTES
    assert ws.expect_close() == (1000, "Target closed")
    ws.send(OP_CLOSE, b"\x03\xe8")
    assert ws.at_eof()
    ws.close()
    entries = parse_recording(complete_recording(str(prefix) + ".1"))
    assert directions(entries) == (ALL_BYTES, b"")


def test_recording_ends_with_footer_when_server_stops(websockify, echo_target, tmp_path):
    prefix = tmp_path / "rec"
    proc, port = websockify("--graceful-timeout", "0.5", "--record", str(prefix),
                            "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    ws = RawWebSocket(port)
    ws.send_binary(ALL_BYTES)
    assert ws.recv_data(len(ALL_BYTES)) == ALL_BYTES
    proc.signal(signal.SIGTERM)             # the worker closes the session, then exits
    assert ws.expect_close()[0] == 1001
    ws.send(OP_CLOSE, b"\x03\xe9")
    ws.close()
    assert proc.wait(TIMEOUT) == 0
    entries = parse_recording(complete_recording(str(prefix) + ".1"))
    assert directions(entries) == (ALL_BYTES, ALL_BYTES)


def test_legacy_codecs_record_decoded_bytes(websockify, echo_target, tmp_path):
    prefix = tmp_path / "rec"
    proc, port = websockify("--workers", "1", "--record", str(prefix), "127.0.0.1:{port}",
                            "127.0.0.1:%d" % echo_target)
    # base64 subprotocol: text frames of base64 each way.
    ws = RawWebSocket(port, protocols="base64")
    assert ws.status == 101 and ws.headers.get("sec-websocket-protocol") == "base64"
    text = base64.b64encode(ALL_BYTES)
    ws.send(OP_TEXT, text[:8], fin=False)   # a group split across fragments is fine
    ws.send(OP_CONT, text[8:], fin=True)
    got = b""
    while len(got) < len(ALL_BYTES):
        fin, opcode, payload = ws.recv_frame()
        assert opcode == OP_TEXT
        got += base64.b64decode(payload)
    assert got == ALL_BYTES
    ws.send(OP_CLOSE, b"\x03\xe8")
    ws.expect_close()
    ws.close()
    # Hixie-76: 0x00 base64 0xFF frames.
    hixie = open_hixie76(port)
    hixie.send(ALL_BYTES)
    assert hixie.recv_data(len(ALL_BYTES)) == ALL_BYTES
    hixie.sock.sendall(b"\xff\x00")
    assert hixie.at_eof()
    hixie.close()

    files = recordings(prefix)
    assert sorted(files) == ["rec.1", "rec.2"], files
    for name in files:
        entries = parse_recording(complete_recording(files[name]))
        assert directions(entries) == (ALL_BYTES, ALL_BYTES), name


def test_echo_service_sessions_are_recorded(websockify, tmp_path):
    prefix = tmp_path / "rec"
    proc, port = websockify("--echo", "--record", str(prefix), "127.0.0.1:{port}")
    ws = RawWebSocket(port)
    ws.send_binary(ALL_BYTES)
    assert ws.recv_data(len(ALL_BYTES)) == ALL_BYTES
    ws.send(OP_CLOSE, b"\x03\xe8")
    ws.expect_close()
    ws.close()
    entries = parse_recording(complete_recording(str(prefix) + ".1"))
    assert directions(entries) == (ALL_BYTES, ALL_BYTES)


def test_concurrent_sessions_on_two_workers_get_distinct_files(websockify, echo_target,
                                                               tmp_path):
    prefix = tmp_path / "rec"
    # One connection per worker: the second session must go to the other worker.
    proc, port = websockify("--workers", "2", "--worker-connections", "1",
                            "--record", str(prefix), "127.0.0.1:{port}",
                            "127.0.0.1:%d" % echo_target)
    first = RawWebSocket(port)
    assert first.status == 101
    second = RawWebSocket(port)
    assert second.status == 101
    payloads = {first: b"first\x00'" * 100, second: b"second\xff\\" * 100}
    for ws, payload in payloads.items():
        ws.send_binary(payload)
    for ws, payload in payloads.items():
        assert ws.recv_data(len(payload)) == payload
        ws.send(OP_CLOSE, b"\x03\xe8")
        ws.expect_close()
        ws.close()

    files = recordings(prefix)
    assert sorted(files) == ["rec.1", "rec.2"], files
    seen = sorted(directions(parse_recording(complete_recording(path)))
                  for path in files.values())
    assert seen == sorted((p, p) for p in payloads.values())
    # Each file was named by a different worker process.
    pids = set(re.findall(r"\[(\d+)\] INFO .*recording to", proc.log()))
    assert len(pids) == 2, proc.log()


def test_numbers_are_unique_across_processes_and_runs(tmp_path):
    """Two recorders (two workers' counters) never take the same file, nor an old one."""
    prefix = str(tmp_path / "rec")
    (tmp_path / "rec.7").write_bytes(b"an earlier run")
    one, two = Recorder(prefix), Recorder(prefix)
    opened = [one.open("a"), two.open("b"), two.open("c"), one.open("d")]
    paths = [rec.path for rec in opened]
    assert paths == [prefix + ".8", prefix + ".9", prefix + ".10", prefix + ".11"]
    for rec in opened:
        rec.close()
    assert (tmp_path / "rec.7").read_bytes() == b"an earlier run"
    for path in paths:
        assert parse_recording(complete_recording(path)) == []


def test_javascript_reads_the_same_bytes(tmp_path):
    """What noVNC's player evaluates: node loads the file and reports char codes."""
    node = require_program("node", "nodejs", "nodejs")
    prefix = str(tmp_path / "rec")
    rec = Recorder(prefix).open("js")
    rec.to_client(ALL_BYTES)
    rec.from_client(b"\x00'\\\n\r\t\x7f\xff")
    rec.close()
    path = prefix + ".1"
    ours = parse_recording(complete_recording(path))
    script = ("const src = require('fs').readFileSync(process.argv[1], 'latin1');"
              "const frames = new Function(src + '; return VNC_frame_data;')();"
              "console.log(JSON.stringify(frames.map(f => Array.from(f, c => c.charCodeAt(0)))));")
    out = subprocess.run([node, "-e", script, path], capture_output=True, timeout=30,
                         check=True).stdout
    frames = [bytes(codes).decode("latin-1") for codes in json.loads(out)]
    assert frames[-1] == "EOF"
    decoded = []
    for frame in frames[:-1]:
        mark = frame[0]
        ms, _, data = frame[1:].partition(mark)
        decoded.append((mark, int(ms), data.encode("latin-1")))
    assert decoded == ours


# -- the writer thread --------------------------------------------------------------------

WRITER_SCRIPT = textwrap.dedent("""
    import json, logging, os, sys, threading, time
    from gevent import monkey
    monkey.patch_all()
    import gevent
    from websockify import record

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="LOG %(message)s")
    record.MAX_BEHIND = 512 * 1024
    read_fd, write_fd = os.pipe()            # blocking, and nobody reads it yet
    writer = record.DiskWriter()
    rec = record.SessionRecording("the-pipe", write_fd, writer)
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(30)])
    most_behind = 0
    for _ in range(100):                     # about 6 MiB of entries
        rec.to_client(b"a" * 60000)
        most_behind = max(most_behind, writer.behind)
        gevent.sleep(0.001)
    ticker.join(5)                           # the loop ran while the writer was stuck
    stuck_ticks = len(ticks)
    active = rec.active
    rec.close()
    chunks = []
    while True:                              # the writer closes the pipe at the end
        chunk = os.read(read_fd, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    data = b"".join(chunks)
    print(json.dumps({
        "ticks": stuck_ticks, "active": active, "most_behind": most_behind,
        "writer_thread": writer.thread_id, "loop_thread": threading.get_native_id(),
        "footer": data.endswith(record.FOOTER), "header": data.startswith(record.HEADER),
        "size": len(data),
    }))
""")


def test_writer_is_a_native_thread_and_memory_is_bounded(tmp_path):
    """A stuck disk neither stalls the gevent loop nor grows memory without limit."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run([PYTHON, "-c", WRITER_SCRIPT], capture_output=True, text=True,
                            env=env, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ticks"] == 30, report          # greenlets ran: not blocked
    assert report["writer_thread"] and report["writer_thread"] != report["loop_thread"]
    assert report["active"] is False, report      # the recording was dropped ...
    assert report["most_behind"] <= 512 * 1024, report   # ... before passing the limit
    assert report["header"] and report["footer"], report  # and still ends well-formed
    assert report["size"] < 1024 * 1024, report
    drops = [line for line in result.stderr.splitlines()
             if line.startswith("LOG") and "dropped" in line]
    assert len(drops) == 1 and "the-pipe" in drops[0], result.stderr


# -- bad --record paths -------------------------------------------------------------------

def run_refused(argv, **kwargs):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=30, **kwargs)


def assert_refused(result, path):
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_CONFIG, output
    lines = [line for line in output.splitlines() if path in line]
    assert len(lines) == 1, output
    assert "Traceback" not in output


def test_missing_directory_is_refused(tmp_path):
    prefix = str(tmp_path / "no-such-dir" / "rec")
    result = run_refused(websockify_argv("--record", prefix, "127.0.0.1:0", "127.0.0.1:9"))
    assert_refused(result, str(tmp_path / "no-such-dir"))
    assert "does not exist" in result.stdout + result.stderr


def test_parent_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "plain").write_text("x")
    for prefix in (tmp_path / "plain" / "rec", tmp_path / "plain" / "sub" / "rec"):
        result = run_refused(websockify_argv("--record", str(prefix), "127.0.0.1:0",
                                             "127.0.0.1:9"))
        assert_refused(result, str(prefix.parent))


def test_directory_not_writable_is_refused(tmp_path):
    if os.geteuid() == 0:
        # Root passes permission checks, so chmod proves nothing; /proc/sys
        # is a directory even root may not create files in.
        locked = "/proc/sys"
        if os.access(locked, os.W_OK):
            pytest.skip("running as root and %s is writable here" % locked)
    else:
        locked = str(tmp_path / "locked")
        os.mkdir(locked, 0o555)
    try:
        result = run_refused(websockify_argv("--record", os.path.join(locked, "rec"),
                                             "127.0.0.1:0", "127.0.0.1:9"))
    finally:
        if locked.startswith(str(tmp_path)):
            os.chmod(locked, 0o755)
    assert_refused(result, locked)
    assert "not writable" in result.stdout + result.stderr
