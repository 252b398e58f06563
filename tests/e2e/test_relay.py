"""The pumps: exact bytes both ways, and bounded memory under back-pressure."""

import hashlib
import os
import socket
import threading
import time

import pytest

from tests.helpers import RawWebSocket, children_of, mask_frame, rss_kib, wait_for


_PERIOD = 1000003                  # prime: no chunk or frame size divides it
_BASE = os.urandom(_PERIOD)
_DOUBLE = _BASE + _BASE


def pattern(offset: int, size: int) -> bytes:
    """Deterministic position-dependent bytes, so loss or reordering shows."""
    out = []
    while size > 0:
        start = offset % _PERIOD
        take = min(size, _PERIOD)
        out.append(_DOUBLE[start:start + take])
        offset += take
        size -= take
    return b"".join(out)


class SourceTarget:
    """A TCP target that streams pattern bytes as fast as the bridge takes them."""

    def __init__(self, total: int):
        self.total = total
        self.sent = 0
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        conn, _ = self.listener.accept()
        with conn:
            while self.sent < self.total:
                size = min(65536, self.total - self.sent)
                conn.sendall(pattern(self.sent, size))
                self.sent += size
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)

    def close(self):
        self.listener.close()


class SinkTarget:
    """A TCP target that reads only when told to, hashing what it gets."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.reading = threading.Event()
        self.received = 0
        self.digest = hashlib.sha256()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        conn, _ = self.listener.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        with conn:
            self.reading.wait()
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                self.received += len(data)
                self.digest.update(data)

    def close(self):
        self.listener.close()


def worker_pids(proc):
    return wait_for(lambda: children_of(proc.pid), what="worker processes")


def stalled_at(counter, still_for=1.0, timeout=30.0) -> int:
    """The value of ``counter()`` once it has not changed for ``still_for``
    seconds in a row (the flow has stopped); fails if it keeps moving."""
    deadline = time.monotonic() + timeout
    value, since = counter(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now_value = counter()
        if now_value != value:
            value, since = now_value, time.monotonic()
        elif time.monotonic() - since >= still_for:
            return value
    raise AssertionError("still moving after %g s: %d" % (timeout, value))


def test_slow_client_stops_target_reads_and_memory_stays_bounded(websockify):
    """A client that stops reading makes the bridge stop reading the target."""
    total = 96 * 1024 * 1024
    target = SourceTarget(total)
    try:
        proc, port = websockify("--workers", "1", "127.0.0.1:{port}", "127.0.0.1:%d" % target.port)
        worker = worker_pids(proc)[0]
        ws = RawWebSocket(port)
        ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        assert ws.status == 101
        rss_before = rss_kib(worker)
        # The client reads nothing: the target must come to a stop, with
        # only socket buffers' worth sent.
        stalled = stalled_at(lambda: target.sent)
        assert stalled < 32 * 1024 * 1024, stalled
        assert rss_kib(worker) - rss_before < 16 * 1024
        assert target.sent == stalled
        # Now read everything and check every byte arrived in order.
        got = 0
        while got < total:
            fin, opcode, payload = ws.recv_frame()
            assert opcode == 0x2, "opcode %d after %d bytes" % (opcode, got)
            assert payload == pattern(got, len(payload)), "corrupted at offset %d" % got
            got += len(payload)
        assert got == total
        assert ws.expect_close() == (1000, "Target closed")
        ws.close()
    finally:
        target.close()


def test_slow_target_stops_client_reads_and_memory_stays_bounded(websockify):
    """A target that stops reading makes the bridge stop reading the client."""
    target = SinkTarget()
    try:
        proc, port = websockify("--workers", "1", "127.0.0.1:{port}", "127.0.0.1:%d" % target.port)
        worker = worker_pids(proc)[0]
        ws = RawWebSocket(port)
        assert ws.status == 101
        rss_before = rss_kib(worker)
        frame = mask_frame(0x2, os.urandom(65536))
        payload_sent = 0
        ws.sock.settimeout(2.0)
        blocked = False
        for _ in range(2000):                  # up to 128 MiB
            try:
                ws.sock.sendall(frame)
            except socket.timeout:
                blocked = True
                break
            payload_sent += 65536
        assert blocked, "the bridge kept reading although the target did not"
        assert payload_sent < 64 * 1024 * 1024
        assert rss_kib(worker) - rss_before < 16 * 1024
        # Once the target reads again, everything the client sent arrives.
        target.reading.set()
        wait_for(lambda: target.received >= payload_sent, timeout=20,
                 what="the target to receive %d bytes" % payload_sent)
        ws.close()
    finally:
        target.close()


@pytest.mark.parametrize("sizes", [
    [1, 2, 3, 125, 126, 127, 65535, 65536, 65537],
    [300000, 7, 1024 * 1024 + 3],
])
def test_exact_bytes_both_ways(websockify, echo_target, sizes):
    """Frames of awkward sizes, fragmented or not, come back byte for byte."""
    proc, port = websockify("127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    ws = RawWebSocket(port)
    sent = bytearray()
    for index, size in enumerate(sizes):
        data = os.urandom(size)
        if index % 2:
            # fragmented: binary start + continuation(s)
            cut = size // 2
            ws.send(0x2, data[:cut], fin=False)
            ws.send(0x0, data[cut:], fin=True)
        else:
            ws.send_binary(data)
        sent += data
    assert ws.recv_data(len(sent)) == bytes(sent)
    ws.send(0x8, b"\x03\xe8")
    assert ws.expect_close() == (1000, "")
    ws.close()


def test_client_close_shuts_the_target(websockify):
    """After the client's close frame the target sees EOF (after the data)."""
    target = SinkTarget()
    target.reading.set()
    try:
        proc, port = websockify("127.0.0.1:{port}", "127.0.0.1:%d" % target.port)
        ws = RawWebSocket(port)
        ws.send_binary(b"last words")
        ws.send(0x8, b"\x03\xe8")
        assert ws.expect_close() == (1000, "")
        target.thread.join(10)
        assert not target.thread.is_alive(), "target never saw EOF"
        assert target.received == len(b"last words")
        ws.close()
    finally:
        target.close()


def test_internal_error_closes_with_1011_and_only_that_session():
    """An unexpected exception in a pump ends its session with 1011."""
    import gevent
    from websockify.server import relay as relay_module

    loop = gevent.get_hub().loop
    finished = []

    def make_pair():
        a, b = socket.socketpair()
        a.setblocking(False)
        return a, b

    client_srv, client = make_pair()
    target_srv, target = make_pair()
    healthy_srv, healthy = make_pair()
    healthy_target_srv, healthy_target = make_pair()

    class Broken(relay_module.Relay):
        __slots__ = ()

        def _client_data(self, chunk, opcode):
            raise RuntimeError("boom")

    broken = Broken(loop, client_srv, target_srv, label="broken", on_finish=finished.append,
                    max_frame_size=1 << 20)
    ok = relay_module.Relay(loop, healthy_srv, healthy_target_srv, label="ok",
                            on_finish=finished.append, max_frame_size=1 << 20)
    broken.start()
    ok.start()
    client.sendall(mask_frame(0x2, b"hello"))
    healthy.sendall(mask_frame(0x2, b"still fine"))
    client.settimeout(5)
    healthy_target.settimeout(5)
    deadline = time.time() + 5
    data = b""
    while b"\x88" not in data[:1] and time.time() < deadline:
        gevent.sleep(0.01)
        try:
            client.setblocking(False)
            data += client.recv(1024)
        except BlockingIOError:
            pass
    assert data[:1] == b"\x88", data
    assert int.from_bytes(data[2:4], "big") == 1011
    gevent.sleep(0.05)
    healthy_target.setblocking(True)
    assert healthy_target.recv(1024) == b"still fine"
    assert not ok.finished
    ok.shutdown()
    for sock in (client, target, healthy, healthy_target):
        sock.close()
