"""The server side of a tunnel, for agent tests: a real listener speaking the
rendezvous' half of the handshake and of the mux with the pure protocol pieces.

``PeerListener(tls_context=None, host="127.0.0.1")`` listens on loopback; ``accept()`` returns a
``PeerConnection`` once a client's request head is read (its path and
headers are there to check); the test then answers ``refuse(status, text)``
or ``upgrade()``, after which ``open_stream``, ``send``, ``end`` and
``pump_until`` drive a ``mux.Connection(role="server")`` over the socket.
Everything blocks with a deadline; nothing here runs in the background.
"""

import socket
import ssl
import time
from typing import Callable, List, Optional

from websockify.protocol import mux
from websockify.protocol.frames import (OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, FrameParser,
                                        close_payload, encode_frame, parse_close_payload)
from websockify.protocol.handshake import RequestHeaders, accept_key, head_end, refusal_bytes


class PeerListener:
    def __init__(self, tls_context: Optional[ssl.SSLContext] = None, host: str = "127.0.0.1"):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                  socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.tls = tls_context
        self.accepted = 0

    def accept(self, timeout: float = 10.0) -> "PeerConnection":
        """The next client whose request head arrived (TLS failures raise ssl.SSLError)."""
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        self.accepted += 1
        conn.settimeout(timeout)
        if self.tls is not None:
            conn = self.tls.wrap_socket(conn, server_side=True)
        return PeerConnection(conn, timeout)

    def close(self) -> None:
        self.sock.close()


class PeerConnection:
    def __init__(self, sock, timeout: float):
        self.sock = sock
        self.timeout = timeout
        data = b""
        while True:
            end, size = head_end(data, 0)
            if end >= 0:
                break
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("client closed before its request head")
            data += chunk
        head, self._rest = data[:end], data[end + size:]
        request_line, _, block = head.partition(b"\n")
        self.method, self.path, self.version = request_line.decode("latin-1").strip().split(" ")
        self.headers = RequestHeaders.parse(block)
        self.conn = mux.Connection("server")
        self.events: List[object] = []
        self.pings = 0              # WebSocket pings received
        self.mux_pings = 0          # mux PINGs received (counted from the bytes)
        self.close_code: Optional[int] = None
        self.closed = False         # the client's TCP end is closed
        self._message = bytearray()
        self.parser = FrameParser(self._on_data, self._on_control,
                                  on_message_end=self._on_message_end)

    # -- the handshake ---------------------------------------------------

    def refuse(self, status: int, text: str) -> None:
        from websockify.errors import reason_phrase
        self.sock.sendall(refusal_bytes("%d %s" % (status, reason_phrase(status)), text))
        self.sock.close()

    def upgrade(self, subprotocol: str = mux.SUBPROTOCOL, extra: tuple = ()) -> None:
        """The 101, with ``extra`` header lines ("Name: value") after the usual ones."""
        key = self.headers.get("sec-websocket-key")
        lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket",
                 "Connection: Upgrade", "Sec-WebSocket-Accept: %s" % accept_key(key)]
        if subprotocol:
            lines.append("Sec-WebSocket-Protocol: %s" % subprotocol)
        lines += list(extra)
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if self._rest:
            self.parser.feed(self._rest)

    # -- the mux ------------------------------------------------------------

    def _on_data(self, chunk, opcode: int) -> None:
        assert opcode == OP_BINARY, "agent sent opcode %d" % opcode
        self._message += chunk

    def _on_message_end(self, opcode: int) -> None:
        message = bytes(self._message)
        self._message = bytearray()
        self.mux_pings += sum(1 for frame in mux.parse_frames(message)
                              if frame[0] == mux.FrameType.PING)
        self.events.extend(self.conn.receive_message(message))

    def _on_control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            self.pings += 1
            self.sock.sendall(encode_frame(OP_PONG, payload))
        elif opcode == OP_CLOSE:
            self.close_code, _ = parse_close_payload(payload)

    def flush(self) -> None:
        for message in self.conn.data_to_send():
            self.sock.sendall(encode_frame(OP_BINARY, message))

    def open_stream(self, peer: str = "127.0.0.1:1234", face: str = "tcp") -> int:
        stream_id = self.conn.open_stream({"face": face, "peer": peer})
        self.flush()
        return stream_id

    def read_once(self, timeout: float) -> bool:
        """Read what arrives within ``timeout``; False once the client closed."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(262144)
        except socket.timeout:
            return True
        except (ConnectionError, ssl.SSLError):
            data = b""
        if not data:
            self.closed = True
            return False
        self.parser.feed(data)
        return True

    def pump_until(self, predicate: Callable[[], object], timeout: float = 10.0,
                   what: str = "condition"):
        """Read, handle and answer (credit, pongs) until ``predicate()`` is true."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if self.closed:
                raise AssertionError("the agent closed the connection while waiting for %s"
                                     % what)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("timed out after %gs waiting for %s" % (timeout, what))
            self.read_once(min(left, 0.2))
            self.flush()

    def event(self, kind, stream_id: Optional[int] = None, timeout: float = 10.0):
        """Wait for (and remove) the first event of ``kind`` (for ``stream_id``)."""
        def find():
            for index, event in enumerate(self.events):
                if isinstance(event, kind) and (stream_id is None
                                                or event.stream_id == stream_id):
                    return self.events.pop(index)
            return None
        return self.pump_until(find, timeout, what=kind.__name__)

    def send(self, stream_id: int, data: bytes, timeout: float = 20.0) -> None:
        """All of ``data`` on the stream, as credit allows."""
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view:
            taken = self.conn.send_data(stream_id, view)
            view = view[taken:]
            self.flush()
            if view:
                self.pump_until(lambda: self.conn.send_window(stream_id) > 0,
                                deadline - time.monotonic(), what="credit")

    def received(self, stream_id: int, size: int, timeout: float = 20.0) -> bytes:
        """Exactly ``size`` bytes of DATA on the stream (credit returned as they come)."""
        got = bytearray()

        def collect():
            keep = []
            for event in self.events:
                if isinstance(event, mux.DataReceived) and event.stream_id == stream_id:
                    got.extend(event.data)
                    self.conn.consumed(stream_id, len(event.data))
                else:
                    keep.append(event)
            self.events[:] = keep
            return len(got) >= size
        self.pump_until(collect, timeout, what="%d bytes on stream %d" % (size, stream_id))
        return bytes(got)

    def end(self, stream_id: int) -> None:
        self.conn.end_stream(stream_id)
        self.flush()

    def close(self, code: Optional[int] = None) -> None:
        try:
            if code is not None:
                self.sock.sendall(encode_frame(OP_CLOSE, close_payload(code, "")))
            self.sock.close()
        except OSError:
            pass
