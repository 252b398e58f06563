"""--echo and --heartbeat-timeout against the real server."""

import fcntl
import socket
import struct
import subprocess
import termios
import time

import pytest
import websocket

from tests.helpers import PYTHON, ROOT, RawWebSocket, wait_for


def test_echo_answers_each_message_with_its_type(websockify):
    proc, port = websockify("--echo", "127.0.0.1:{port}")
    ws = websocket.create_connection("ws://127.0.0.1:%d/" % port)
    ws.send("h\u00e9llo")
    assert ws.recv() == "h\u00e9llo"
    ws.send_binary(b"\x00\xff" * 50000)
    assert ws.recv() == b"\x00\xff" * 50000
    ws.close()
    proc.wait_log(r"-> echo: closed \(1000\)")


def test_echo_fragmented_message_comes_back_whole(websockify):
    proc, port = websockify("--echo", "127.0.0.1:{port}")
    ws = RawWebSocket(port)
    ws.send(0x1, b"abc", fin=False)
    ws.send(0x9, b"ping!")                 # a control frame inside the message
    ws.send(0x0, b"def", fin=False)
    ws.send(0x0, b"ghi", fin=True)
    frames = []
    text = b""
    while True:
        fin, opcode, payload = ws.recv_frame()
        frames.append(opcode)
        if opcode == 0xA:
            assert payload == b"ping!"
            continue
        text += payload
        if fin:
            break
    assert text == b"abcdefghi"
    # The pong is queued when the ping arrives, the echo at the message's end.
    assert frames == [0xA, 0x1]
    ws.close()


def test_echo_client_may_send_a_big_message_before_reading(websockify):
    """Autobahn's 9.* cases send whole messages before reading the echo."""
    proc, port = websockify("--echo", "127.0.0.1:{port}")
    ws = RawWebSocket(port)
    payload = b"z" * (8 * 1024 * 1024)
    ws.sock.settimeout(20)
    ws.send(0x2, payload)
    assert ws.recv_data(len(payload)) == payload
    ws.close()


@pytest.mark.parametrize("argv,message", [
    (["--echo", "6080", "localhost:5900"], "Too many arguments"),
    (["--echo", "--unix-target", "/tmp/x.sock", "6080"], "cannot be used together"),
    (["--heartbeat-timeout", "5", "6080", "localhost:5900"], "needs --heartbeat"),
])
def test_usage_errors(argv, message):
    result = subprocess.run([PYTHON, "-m", "websockify"] + argv, capture_output=True,
                            text=True, cwd=ROOT, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr


def test_heartbeat_timeout_closes_a_silent_peer(websockify, echo_target):
    proc, port = websockify("--heartbeat", "1", "--heartbeat-timeout", "1",
                            "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    ws = RawWebSocket(port)
    ws.sock.settimeout(10)
    fin, opcode, payload = ws.recv_frame()
    assert opcode == 0x9                  # a ping we do not answer
    code, reason = ws.expect_close()
    assert (code, reason) == (1011, "Heartbeat timeout")
    assert ws.at_eof()
    proc.wait_log(r"no pong in time")
    proc.wait_log(r"closed \(1011 Heartbeat timeout\)")


def test_heartbeat_timeout_spares_a_peer_that_answers(websockify, echo_target):
    proc, port = websockify("--heartbeat", "1", "--heartbeat-timeout", "1",
                            "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    ws = RawWebSocket(port)
    ws.sock.settimeout(10)
    deadline = time.time() + 3.5
    pings = 0
    while time.time() < deadline:
        fin, opcode, payload = ws.recv_frame()
        assert opcode == 0x9, opcode
        pings += 1
        ws.send(0xA, payload)
    assert pings >= 2
    ws.send_binary(b"still here")
    while True:
        fin, opcode, payload = ws.recv_frame()
        if opcode == 0x9:
            ws.send(0xA, payload)
            continue
        assert payload == b"still here"
        break
    ws.close()


def unread_bytes(sock) -> int:
    """Bytes received on ``sock`` that nobody has read yet (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def test_client_reset_while_the_server_sends_is_no_internal_error(websockify):
    """A client that vanishes mid-transfer ends only its session, quietly."""
    proc, port = websockify("--echo", "--workers", "1", "127.0.0.1:{port}")
    ws = RawWebSocket(port)
    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for _ in range(20):
        ws.send_binary(b"q" * 65536)     # echoes pile up: the server keeps sending
    # The reset must come while the server sends: wait for its first bytes.
    wait_for(lambda: unread_bytes(ws.sock) > 0, what="the echo to start arriving")
    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ws.sock.close()                       # reset
    proc.wait_log(r"-> echo: closed")
    assert "internal error" not in proc.log()
    assert "Traceback" not in proc.log()
    ws2 = websocket.create_connection("ws://127.0.0.1:%d/" % port)
    ws2.send_binary(b"next")
    assert ws2.recv() == b"next"
    ws2.close()
