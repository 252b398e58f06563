"""Session log lines, -v, --traffic, --log-file and --heartbeat."""

import re
import socket
import threading
import time

import pytest

from tests.helpers import RawWebSocket, port_open, wait_for

FROM_CLIENT = (1000, 234)      # two frames from the client
GREETING = b"G" * 321          # what the target sends on connect


@pytest.fixture
def greeting_target():
    """A TCP target that sends GREETING, then reads until EOF; yields its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    received = []
    conns = []

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conns.append(conn)
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    def handle(conn):
        try:
            conn.sendall(GREETING)
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                received.append(data)
        except OSError:
            pass
        finally:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    listener.close()
    for conn in conns:
        try:
            conn.close()
        except OSError:
            pass


def settle(proc, port):
    """A plain GET after the sessions: the worker logs its 405 after what it
    logs about the sessions that ended before, so once the 405 line is there
    no late line about them can still come."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /settle HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 405 ")
    proc.wait_log(r"\"GET /settle HTTP/1\.1\" 405 ")


def session_lines(text):
    return [line for line in text.splitlines() if ": closed (" in line]


def echo_session(port, payload=b"hello traffic", path="/"):
    ws = RawWebSocket(port, path=path)
    try:
        assert ws.status == 101
        ws.send_binary(payload)
        assert ws.recv_data(len(payload)) == payload
        ws.send(0x8, b"\x03\xe8")
        assert ws.expect_close() == (1000, "")
    finally:
        ws.close()


# -- the session line ------------------------------------------------------------

def test_one_line_per_session(websockify, greeting_target):
    proc, port = websockify("--workers", "1", "127.0.0.1:{port}",
                            "127.0.0.1:%d" % greeting_target)
    ws = RawWebSocket(port, path="/websockify?token=abc")
    try:
        assert ws.status == 101
        client_port = ws.sock.getsockname()[1]
        assert ws.recv_data(len(GREETING)) == GREETING
        for size in FROM_CLIENT:
            ws.send_binary(b"c" * size)
        time.sleep(0.6)                   # the session's duration is logged
        ws.send(0x8, b"\x03\xe8")
        assert ws.expect_close() == (1000, "")
    finally:
        ws.close()
    proc.wait_log(r": closed \(")
    settle(proc, port)
    lines = session_lines(proc.log())
    assert len(lines) == 1, proc.log()
    line = lines[0]
    assert "127.0.0.1:%d" % client_port in line
    assert "/websockify?token=<redacted>" in line   # tokens are credentials
    assert "127.0.0.1:%d" % greeting_target in line
    assert "(1000)" in line
    assert re.search(r"\b%d bytes from client\b" % sum(FROM_CLIENT), line), line
    assert re.search(r"\b%d bytes to client\b" % len(GREETING), line), line
    duration = float(re.search(r"after (\d+(?:\.\d+)?)s", line).group(1))
    assert 0.5 <= duration < 10, line
    # Without -v there is no debug line.
    assert "session opened" not in proc.log()
    assert "DEBUG" not in proc.log()


def test_session_line_per_session_counts(websockify, echo_target):
    proc, port = websockify("--workers", "1", "127.0.0.1:{port}",
                            "127.0.0.1:%d" % echo_target)
    echo_session(port, b"a" * 10, path="/first")
    echo_session(port, b"b" * 2000, path="/second")
    wait_for(lambda: len(session_lines(proc.log())) >= 2, what="two session lines")
    settle(proc, port)
    lines = session_lines(proc.log())
    assert len(lines) == 2, proc.log()
    first = [line for line in lines if "/first" in line]
    second = [line for line in lines if "/second" in line]
    assert len(first) == 1 and len(second) == 1
    assert "10 bytes from client, 10 bytes to client" in first[0]
    assert "2000 bytes from client, 2000 bytes to client" in second[0]


def test_verbose_logs_session_opened(websockify, echo_target):
    proc, port = websockify("-v", "--workers", "1", "127.0.0.1:{port}",
                            "127.0.0.1:%d" % echo_target)
    echo_session(port, path="/verbose-path")
    proc.wait_log(r": closed \(")
    opened = [line for line in proc.log().splitlines() if "session opened" in line]
    assert len(opened) == 1, proc.log()
    assert "DEBUG" in opened[0]
    assert "/verbose-path" in opened[0]
    assert "127.0.0.1:%d" % echo_target in opened[0]
    # The session-opened line comes before the session's closing line.
    log = proc.log()
    assert log.index("session opened") < log.index(": closed (")


# -- --traffic ------------------------------------------------------------------

def start_with_log_file(websockify, tmp_path, *args):
    log_file = tmp_path / "ws-file.log"
    proc, port = websockify("--log-file", str(log_file), "--workers", "1", *args, wait=False)
    wait_for(lambda: port_open(port) or proc.proc.poll() is not None,
             what="websockify on port %d" % port)
    assert proc.proc.poll() is None, proc.log()
    wait_for(lambda: log_file.exists() and "proxying from" in log_file.read_text(),
             what="banner in the log file")
    return proc, port, log_file


def run_traffic_session(websockify, tmp_path, echo_target, *extra):
    proc, port, log_file = start_with_log_file(
        websockify, tmp_path, *extra, "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    echo_session(port, b"x" * 100)
    # The relay prints as data moves, all of it before the session's line.
    wait_for(lambda: ": closed (" in log_file.read_text(), what="session line in the log file")
    # With --log-file, the process's own output is stdout (the traffic) only.
    return proc.log()


def test_traffic_prints_legend_characters(websockify, tmp_path, echo_target):
    output = run_traffic_session(websockify, tmp_path, echo_target, "--traffic")
    assert "}" in output, repr(output)    # client receive
    assert ">" in output, repr(output)    # target send
    assert "{" in output, repr(output)    # target receive
    assert "closed" not in output and "proxying" not in output


def test_traffic_marks_client_send(websockify, tmp_path, echo_target):
    # websockify 0.13 (and log.py's legend) print "<" for a frame sent to the client.
    output = run_traffic_session(websockify, tmp_path, echo_target, "--traffic")
    assert "<" in output, repr(output)


def test_no_traffic_without_option(websockify, tmp_path, echo_target):
    output = run_traffic_session(websockify, tmp_path, echo_target)
    for char in "{}<>":
        assert char not in output, repr(output)


# -- --log-file -----------------------------------------------------------------

def test_log_file(websockify, tmp_path, echo_target):
    proc, port, log_file = start_with_log_file(
        websockify, tmp_path, "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    echo_session(port, b"y" * 42, path="/in-the-file")
    wait_for(lambda: ": closed (" in log_file.read_text(), what="session line in the log file")
    text = log_file.read_text()
    lines = session_lines(text)
    assert len(lines) == 1, text
    assert "/in-the-file" in lines[0]
    assert "42 bytes from client, 42 bytes to client" in lines[0]
    assert "WebSocket server settings" in text
    # Nothing of it on stderr (which the process log captures).
    output = proc.log()
    assert "closed" not in output, output
    assert "proxying from" not in output, output
    assert "INFO" not in output and "WARNING" not in output, output


# -- --heartbeat ----------------------------------------------------------------

def test_heartbeat_sends_pings(websockify, echo_target):
    proc, port = websockify("--heartbeat", "1", "--workers", "1", "127.0.0.1:{port}",
                            "127.0.0.1:%d" % echo_target)
    ws = RawWebSocket(port)
    try:
        assert ws.status == 101
        ws.sock.settimeout(3.0)
        started = time.time()
        fin, opcode, payload = ws.recv_frame()
        assert opcode == 0x9, (opcode, payload)
        assert fin
        assert len(payload) <= 125
        first = time.time() - started
        assert first < 3.0
        ws.send(0xA, payload)                 # answer like a browser
        fin, opcode, _ = ws.recv_frame()      # and the next one comes too
        assert opcode == 0x9
        # The session still carries data.
        ws.send_binary(b"still here")
        data = b""
        while len(data) < 10:
            fin, opcode, payload = ws.recv_frame()
            if opcode == 0x9:
                continue
            assert opcode == 0x2
            data += payload
        assert data == b"still here"
    finally:
        ws.close()


def test_no_pings_without_heartbeat(websockify, echo_target):
    proc, port = websockify("--workers", "1", "127.0.0.1:{port}",
                            "127.0.0.1:%d" % echo_target)
    ws = RawWebSocket(port)
    try:
        assert ws.status == 101
        ws.sock.settimeout(2.5)
        with pytest.raises(socket.timeout):
            frame = ws.recv_frame()
            pytest.fail("unexpected frame %r" % (frame,))
        ws.sock.settimeout(5)
        ws.send_binary(b"ok")
        assert ws.recv_data(2) == b"ok"
    finally:
        ws.close()


def test_tokens_are_redacted_from_log_lines(websockify, echo_target, tmp_path):
    """Tokens are credentials: neither refusal lines nor session lines show them."""
    from tests.helpers import RawWebSocket
    from websockify.protocol.handshake import redact_uri

    assert redact_uri("GET /w?token=s3cret&x=1 HTTP/1.1") == "GET /w?token=<redacted>&x=1 HTTP/1.1"
    assert redact_uri("/v?path=websockify%3Ftoken%3Ds3cret%26a%3D1") == \
        "/v?path=websockify%3Ftoken%3D<redacted>%26a%3D1"
    assert redact_uri("/v?mytoken=keep") == "/v?mytoken=keep"

    proc, port = websockify("127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    ws = RawWebSocket(port, path="/websockify?token=s3cretvalue")
    assert ws.status == 101
    ws.send(0x8, b"\x03\xe8")
    ws.expect_close()
    ws.close()
    proc.wait_log(r"token=<redacted>.*closed \(1000\)")
    import socket
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /x?token=s3cretvalue HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.recv(4096)
    proc.wait_log(r"POST /x\?token=<redacted>")
    assert "s3cretvalue" not in proc.log()
