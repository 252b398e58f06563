"""websockify 0.13's ``WebSocket``: a socket-like object speaking RFC 6455 messages.

Library callers use it on either side: ``accept(sock, headers)`` answers a
client's upgrade, ``connect(uri)`` opens one; then ``recvmsg``/``sendmsg``
move whole messages, ``ping``/``pong``/``shutdown``/``close`` the rest.
On a non-blocking socket the calls raise ``WebSocketWantReadError`` or
``WebSocketWantWriteError`` (call again with the same arguments when the
socket is ready), as in 0.13; on a blocking (or gevent-cooperative) socket
they simply wait.  The frames are protocol/frames.py's (checked limits,
fast unmasking) and, for a session the engine accepted, the codec the
handshake chose (protocol/codec.py, protocol/legacy.py).
"""

import base64
import collections
import os
import socket
import ssl
from typing import Any, Iterable, Optional
from urllib.parse import urlparse

from websockify.errors import WebSocketError
from websockify.protocol.codec import HYBI, Codec
from websockify.protocol.frames import (DEFAULT_MAX_FRAME_SIZE, OP_BINARY, OP_CLOSE, OP_PING,
                                        OP_PONG, FrameParser, binary_header, close_payload,
                                        encode_frame, parse_close_payload, unmask)
from websockify.protocol.handshake import GUID, SUPPORTED_VERSIONS, accept_key

__all__ = ["WebSocket", "WebSocketWantReadError", "WebSocketWantWriteError"]


class WebSocketWantReadError(ssl.SSLWantReadError):
    """No complete message yet: call again once the socket is readable."""


class WebSocketWantWriteError(ssl.SSLWantWriteError):
    """Not all was sent: call again, with the same arguments, once it is writable."""


class WebSocketHandshakeError(Exception):
    """The other side's upgrade request or answer cannot be accepted."""


# Calls passed on to the underlying socket, as 0.13 does.
_PASSED_ON = frozenset(("fileno", "getpeername", "getsockname", "getsockopt", "setsockopt",
                        "gettimeout", "settimeout", "setblocking"))
_READ_SIZE = 64 * 1024


class WebSocket:
    """One WebSocket connection over a socket (see the module docstring)."""

    GUID = GUID
    #: Largest frame accepted from the peer; a larger one closes with 1009.
    max_frame_size = DEFAULT_MAX_FRAME_SIZE

    def __init__(self):
        self.socket: Any = None
        self.client = False
        self.protocol: Optional[str] = None
        self.close_code: Optional[int] = None
        self.close_reason: Optional[str] = None
        self._state = "new"
        self._codec: Codec = HYBI
        self._parser = None
        # Events in arrival order: ("data", bytes), ("ping"|"pong", payload),
        # ("close", code, reason), ("fail", code, reason).
        self._events: collections.deque = collections.deque()
        self._partial: list = []
        self._send_buffer = bytearray()
        self._retry: Optional[tuple] = None   # what a WantWrite asked to be sent again
        self._sent_close = False
        self._received_close = False
        self._key: Optional[str] = None
        self._head = b""                      # a client's handshake answer, as it arrives

    def __getattr__(self, name: str):
        if name in _PASSED_ON:
            sock = self.__dict__.get("socket")
            if sock is None:
                raise OSError("the WebSocket's socket is closed")
            return getattr(sock, name)
        raise AttributeError("%s object has no attribute %r" % (type(self).__name__, name))

    # -- opening -----------------------------------------------------------

    def connect(self, uri: str, origin: Optional[str] = None,
                protocols: Iterable[str] = ()) -> None:
        """Open a connection to the WebSocket server at ``uri`` (ws:// or wss://)."""
        protocols = list(protocols)
        parsed = urlparse(uri)
        if parsed.scheme in ("ws", "http"):
            port, secure = parsed.port or 80, False
        elif parsed.scheme in ("wss", "https"):
            port, secure = parsed.port or 443, True
        else:
            raise ValueError("unknown WebSocket URI scheme %r" % parsed.scheme)
        if self._state == "new":
            self.client = True
            sock = socket.create_connection((parsed.hostname, port))
            if secure:
                sock = ssl.create_default_context().wrap_socket(
                    sock, server_hostname=parsed.hostname)
            self.socket = sock
            self._key = base64.b64encode(os.urandom(16)).decode("ascii")
            target = (parsed.path or "/") + ("?" + parsed.query if parsed.query else "")
            self.send_request("GET", target)
            self.send_header("Host", parsed.hostname)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Key", self._key)
            self.send_header("Sec-WebSocket-Version", "13")
            if origin is not None:
                self.send_header("Origin", origin)
            if protocols:
                self.send_header("Sec-WebSocket-Protocol", ", ".join(protocols))
            self.end_headers()
            self._state = "request"
        if self._state == "request":
            self._flush()
            self._state = "response"
        if self._state == "response":
            while b"\r\n\r\n" not in self._head:
                data = self._read_socket()
                if not data:
                    raise WebSocketHandshakeError("connection closed during the handshake")
                self._head += data
            head, _, rest = self._head.partition(b"\r\n\r\n")
            self._head = b""
            self._check_answer(head.decode("latin-1"), protocols)
            self._start(HYBI, client=True)
            self._state = "done"
            if rest:
                self._feed(rest)
            return
        raise WebSocketHandshakeError("connect() called on a WebSocket in state %r" % self._state)

    def _check_answer(self, head: str, protocols: list) -> None:
        status, *lines = head.split("\r\n")
        words = status.split()
        if len(words) < 2 or not words[0].startswith("HTTP/"):
            raise WebSocketHandshakeError("not an HTTP answer: %r" % status[:100])
        if words[1] != "101":
            raise WebSocketHandshakeError("WebSocket request denied: %s" % " ".join(words[1:]))
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("upgrade", "").lower() != "websocket":
            raise WebSocketHandshakeError("missing or wrong Upgrade header in the answer")
        if headers.get("sec-websocket-accept") != accept_key(self._key or ""):
            raise WebSocketHandshakeError("wrong or missing Sec-WebSocket-Accept")
        self._key = None
        self.protocol = headers.get("sec-websocket-protocol")
        if self.protocol is not None and self.protocol not in protocols:
            raise WebSocketHandshakeError("the server chose a subprotocol not offered: %r"
                                          % self.protocol)

    def accept(self, socket, headers) -> None:
        """Answer the upgrade request whose ``headers`` (a mapping with ``get``) came on ``socket``."""
        if self._state == "new":
            self.client = False
            if (headers.get("upgrade") or "").strip().lower() != "websocket":
                raise WebSocketHandshakeError("missing or wrong Upgrade header")
            version = (headers.get("Sec-WebSocket-Version") or "").strip()
            if version not in SUPPORTED_VERSIONS:
                raise WebSocketHandshakeError("unsupported WebSocket version %r" % version)
            key = (headers.get("Sec-WebSocket-Key") or "").strip()
            if not key:
                raise WebSocketHandshakeError("missing Sec-WebSocket-Key")
            offered = [item.strip() for item in
                       (headers.get("Sec-WebSocket-Protocol") or "").split(",") if item.strip()]
            self.protocol = self.select_subprotocol(offered) if offered else ""
            if self.protocol and self.protocol not in offered:
                raise WebSocketHandshakeError("select_subprotocol() chose %r, not offered"
                                              % self.protocol)
            self.socket = socket
            self.send_response(101, "Switching Protocols")
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", accept_key(key))
            if self.protocol:
                self.send_header("Sec-WebSocket-Protocol", self.protocol)
            self.end_headers()
            self._start(HYBI, client=False)
            self._state = "flush"
        if self._state == "flush":
            self._flush()
            self._state = "done"
            return
        raise WebSocketHandshakeError("accept() called on a WebSocket in state %r" % self._state)

    def select_subprotocol(self, protocols: list) -> str:
        """The subprotocol to answer with, one of ``protocols`` (default: none)."""
        return ""

    # What the handshakes write; 0.13's HTTP glue overrides these.
    def send_response(self, code: int, message: str) -> None:
        self._send_buffer += ("HTTP/1.1 %d %s\r\n" % (code, message)).encode("latin-1")

    def send_header(self, keyword: str, value) -> None:
        self._send_buffer += ("%s: %s\r\n" % (keyword, value)).encode("latin-1")

    def end_headers(self) -> None:
        self._send_buffer += b"\r\n"

    def send_request(self, method: str, path: str) -> None:
        self._send_buffer += ("%s %s HTTP/1.1\r\n" % (method.upper(), path)).encode("latin-1")

    def _attach(self, sock, codec: Codec = HYBI, early: bytes = b"",
                max_frame_size: Optional[int] = None) -> "WebSocket":
        """A session whose handshake was done elsewhere (the engine, LibProxyServer)."""
        self.socket = sock
        self.client = False
        if max_frame_size:
            self.max_frame_size = max_frame_size
        self._start(codec, client=False)
        self._state = "done"
        if early:
            self._feed(early)
        return self

    def _start(self, codec: Codec, client: bool) -> None:
        self._codec = codec
        if client:
            # Server frames are not masked: the client's parser does not ask for it.
            self._parser = FrameParser(self._on_data, self._on_control, self.max_frame_size,
                                       require_mask=False, on_message_end=self._on_message_end)
        else:
            self._parser = codec.parser(self._on_data, self._on_control, self._on_message_end,
                                        self.max_frame_size)

    # -- receiving -----------------------------------------------------------

    def recv(self) -> Optional[bytes]:
        """Data of one message (0.13 allows more); None once the connection is closed."""
        return self.recvmsg()

    def recvmsg(self) -> Optional[bytes]:
        """The next whole message, or None once closed (see close_code, close_reason)."""
        got = self._take()
        if got is not _NOTHING:
            return got
        if self._received_close or self.socket is None:
            self._flush_quietly()
            return None
        data = self._read_socket()
        if not data:
            if self.close_code is None:
                self.close_code, self.close_reason = 1006, "Connection closed abnormally"
            self._sent_close = self._received_close = True
            self._close_socket()
            return None
        self._feed(data)
        got = self._take()
        if got is not _NOTHING:
            return got
        raise WebSocketWantReadError("no complete WebSocket message yet")

    def pending(self) -> bool:
        """Whether a recvmsg() can make progress without the socket becoming readable."""
        if self._events:
            return True
        pending = getattr(self.socket, "pending", None)
        return bool(pending()) if callable(pending) else False

    def handle_ping(self, data: bytes) -> None:
        """A ping arrived (while receiving); the default answers it."""
        self.pong(data)

    def handle_pong(self, data: bytes) -> None:
        """A pong arrived (while receiving); the default ignores it."""

    def _read_socket(self) -> bytes:
        try:
            return self.socket.recv(_READ_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError):
            raise WebSocketWantReadError("socket not readable") from None
        except InterruptedError:
            raise WebSocketWantReadError("interrupted") from None

    def _feed(self, data: bytes) -> None:
        if self._parser is None:
            return
        try:
            self._parser.feed(data)
        except WebSocketError as exc:
            self._parser = None          # nothing after a protocol error can be trusted
            self._events.append(("fail", exc.close_code, exc.reason))

    def _on_data(self, chunk, opcode: int) -> None:
        self._partial.append(bytes(chunk))

    def _on_message_end(self, opcode: int) -> None:
        self._events.append(("data", b"".join(self._partial)))
        self._partial = []

    def _on_control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            self._events.append(("ping", bytes(payload)))
        elif opcode == OP_PONG:
            self._events.append(("pong", bytes(payload)))
        elif opcode == OP_CLOSE:
            try:
                code, reason = parse_close_payload(payload)
            except WebSocketError as exc:
                self._events.append(("fail", exc.close_code, exc.reason))
            else:
                self._events.append(("close", code, reason))
            self._parser = None          # nothing follows a close frame

    def _take(self):
        """Handle queued events up to the next message; _NOTHING if none is there."""
        while self._events:
            event = self._events.popleft()
            kind = event[0]
            if kind == "data":
                return event[1]
            if kind == "ping":
                if not self._sent_close:
                    self.handle_ping(event[1])
            elif kind == "pong":
                self.handle_pong(event[1])
            elif kind == "close":
                self._peer_closed(event[1], event[2])
                return None
            elif kind == "fail":
                self._fail(event[1], event[2])
                return None
        return _NOTHING

    def _peer_closed(self, code: Optional[int], reason: str) -> None:
        self._events.clear()
        self._received_close = True
        if code is None:
            self.close_code, self.close_reason = 1005, "No close status code specified by peer"
        elif not self._sent_close:
            self.close_code, self.close_reason = code, reason
        if not self._sent_close:
            self._sent_close = True
            self._queue_close(code, "")
        self._flush_quietly()

    def _fail(self, code: int, reason: str) -> None:
        self._events.clear()
        self.close_code, self.close_reason = code, reason
        self._received_close = True
        if not self._sent_close:
            self._sent_close = True
            self._queue_close(code, reason)
        self._flush_quietly()

    # -- sending -------------------------------------------------------------

    def send(self, data: bytes) -> int:
        """Send ``data`` (0.13 may split or join it); returns its length."""
        if not data:
            return 0
        return self.sendmsg(data)

    def sendmsg(self, msg: bytes) -> int:
        """Send ``msg`` as one binary message; returns its length (0 once closing)."""
        if not isinstance(msg, (bytes, bytearray)):
            raise TypeError("a WebSocket message is bytes, not %s" % type(msg).__name__)
        if self._sent_close:
            return 0
        self._send_once(OP_BINARY, bytes(msg))
        return len(msg)

    def ping(self, data: bytes = b"") -> None:
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("a ping payload is bytes")
        self._send_once(OP_PING, bytes(data))

    def pong(self, data: bytes = b"") -> None:
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("a pong payload is bytes")
        self._send_once(OP_PONG, bytes(data))

    def shutdown(self, how, code: Optional[int] = 1000, reason: Optional[str] = None) -> None:
        """Start the close handshake (``how`` is ignored, as in 0.13); keep receiving for the reply."""
        if self._sent_close:
            self._flush()
            return
        if not self._received_close:
            self.close_code, self.close_reason = 1000, "Locally initiated close"
        self._sent_close = True
        self._queue_close(code, reason or "")
        self._flush()
        if self._received_close and not self._send_buffer:
            self._close_socket()

    def close(self, code: Optional[int] = 1000, reason: Optional[str] = None) -> None:
        """Send a close frame and drop the connection at once."""
        try:
            if self.socket is not None:
                self.shutdown(socket.SHUT_RDWR, code, reason)
        except (WebSocketWantWriteError, OSError):
            pass
        self._close_socket()

    def _send_once(self, opcode: int, payload: bytes) -> None:
        """Queue one frame and flush; a retry after WantWrite only flushes."""
        if self._retry is not None:
            if self._retry != (opcode, payload):
                raise ValueError("after WebSocketWantWriteError, call again with the same data")
            self._flush()
            self._retry = None
            return
        self._queue_frame(opcode, payload)
        try:
            self._flush()
        except WebSocketWantWriteError:
            self._retry = (opcode, payload)
            raise

    def _queue_frame(self, opcode: int, payload: bytes) -> None:
        if self.client:
            self._send_buffer += _masked_frame(opcode, payload)
            return
        codec = self._codec
        if opcode == OP_BINARY:
            if codec.binary:
                self._send_buffer += binary_header(len(payload))
                self._send_buffer += payload
            else:
                self._send_buffer += codec.frame(payload)
        elif codec.pings:
            self._send_buffer += encode_frame(opcode, payload)

    def _queue_close(self, code: Optional[int], reason: str) -> None:
        if self.client:
            self._send_buffer += _masked_frame(OP_CLOSE, close_payload(code, reason))
        else:
            self._send_buffer += self._codec.close_frame(code, reason)

    def _flush(self) -> None:
        buffer = self._send_buffer
        while buffer:
            if self.socket is None:
                buffer.clear()
                return
            try:
                sent = self.socket.send(buffer)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                raise WebSocketWantWriteError("socket not writable") from None
            except InterruptedError:
                continue
            del buffer[:sent]

    def _flush_quietly(self) -> None:
        try:
            self._flush()
        except (WebSocketWantWriteError, OSError):
            return
        if self._sent_close and self._received_close:
            self._close_socket()

    def _close_socket(self) -> None:
        sock, self.socket = self.socket, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass


_NOTHING = object()


def _masked_frame(opcode: int, payload: bytes) -> bytes:
    """A client's frame: the header's mask bit, a random key, the payload XORed with it."""
    header = bytearray(binary_header(len(payload), opcode))
    header[1] |= 0x80
    key = os.urandom(4)
    return bytes(header) + key + (bytes(unmask(payload, key)) if payload else b"")
