"""The main job end to end: a browser-like client reaches a TCP echo target."""

import websocket

from tests.helpers import RawWebSocket


def test_echo_through_bridge(websockify, echo_target):
    proc, port = websockify("--workers", "2", "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    ws = websocket.create_connection("ws://127.0.0.1:%d/" % port, subprotocols=["binary"])
    assert ws.subprotocol == "binary"
    ws.send_binary(b"hello bridge")
    assert ws.recv() == b"hello bridge"
    ws.close()
    proc.wait_log(r"closed \(1000\).*12 bytes from client, 12 bytes to client")


def test_raw_client_close_code_echoed(websockify, echo_target):
    proc, port = websockify("127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    ws = RawWebSocket(port)
    assert ws.status == 101
    ws.send_binary(b"x" * 70000)
    assert ws.recv_data(70000) == b"x" * 70000
    ws.send(0x8, b"\x0f\xa0bye")   # 4000
    assert ws.expect_close() == (4000, "")
    assert ws.at_eof()
