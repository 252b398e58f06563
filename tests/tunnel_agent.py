"""A small tunnel agent for the server's tests: a real client over a real socket.

It speaks ``websockify-tunnel.v1`` with the pure pieces (protocol/mux.py's
``Connection(role="agent")`` and masked frames), in threads, and can
misbehave on purpose: refuse or time out opens, ignore them, stop answering
pings, send raw bytes.  The real ``websockify-agent`` is tested elsewhere;
this one lets the server's tests choose every answer.
"""

import base64
import hashlib
import hmac
import json
import os
import socket
import struct
import threading
import time

from websockify.protocol.frames import FrameParser
from websockify.protocol.mux import (SUBPROTOCOL, Connection, DataReceived, PongReceived,
                                     ResetCode, SendWindowOpened, StreamClosed, StreamEnded,
                                     StreamOpened, StreamReset)

from tests.helpers import mask_frame, read_http_response


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def hs256_token(claims: dict, secret: bytes, alg: str = "HS256") -> str:
    """A JWT signed here, independently of websockify's own signer."""
    header = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    signing = ("%s.%s" % (header, body)).encode("ascii")
    signature = _b64(hmac.new(secret, signing, hashlib.sha256).digest())
    return "%s.%s.%s" % (header, body, signature)


def agent_token(agent_id: str, secret: bytes, lifetime: float = 3600.0, **extra) -> str:
    now = time.time()
    claims = {"tid": agent_id, "nbf": int(now) - 5, "exp": int(now + lifetime)}
    claims.update(extra)
    return hs256_token(claims, secret)


def upgrade(port: int, path: str, token=None, protocol=SUBPROTOCOL, extra=(),
            ssl_context=None, timeout=10.0):
    """Open a connection and send an agent's upgrade; (sock, status, headers, rest)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if ssl_context is not None:
        sock = ssl_context.wrap_socket(sock, server_hostname="127.0.0.1")
    key = base64.b64encode(os.urandom(16)).decode()
    lines = ["GET %s HTTP/1.1" % path, "Host: 127.0.0.1:%d" % port, "Upgrade: websocket",
             "Connection: Upgrade", "Sec-WebSocket-Key: %s" % key,
             "Sec-WebSocket-Version: 13"]
    if protocol:
        lines.append("Sec-WebSocket-Protocol: %s" % protocol)
    if token:
        lines.append("Authorization: Bearer %s" % token)
    lines += list(extra)
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    status, headers, rest = read_http_response(sock)
    return sock, status, headers, rest


class ScriptedAgent:
    """An agent connected to the server; ``on_open`` says what to do with new streams.

    ``on_open``: "accept" (connect to ``service`` and carry the bytes),
    "refuse" (RESET REFUSED), "timeout" (RESET TIMEOUT), "ignore" (no
    answer) or "hold" (no answer until ``release``).  ``respond`` False: never send anything back (a dead peer).
    """

    def __init__(self, port, agent_id, token=None, service=None, on_open="accept",
                 path="/tunnel/", ssl_context=None, extra=(), respond=True,
                 window=None, max_message=None):
        self.agent_id = agent_id
        self.service = service
        self.on_open = on_open
        self.respond = respond
        self.sock, self.status, self.headers, rest = upgrade(
            port, path + agent_id, token, extra=extra, ssl_context=ssl_context)
        self.body = rest if self.status != 101 else b""
        options = {}
        if window is not None:
            options["window"] = window
        if max_message is not None:         # the size of the messages it sends
            options["max_message"] = max_message
        self.conn = Connection(role="agent", **options)
        self.lock = threading.RLock()
        self.window_changed = threading.Condition(self.lock)
        self.services = {}
        self.opened = []          # (stream id, meta) in order
        self.held = []            # "hold": opens not answered yet
        self.resets = []          # (stream id, code, reason)
        self.pongs = []           # the payloads of the server's mux PONGs
        self.close_code = None
        self.close_reason = None
        self.closed = threading.Event()
        self._message = bytearray()
        self.parser = FrameParser(self._on_data, self._on_control, expect_masked=False,
                                  on_message_end=self._on_message_end)
        if self.status == 101:
            self.sock.settimeout(None)
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()
            if rest:
                with self.lock:
                    self.parser.feed(rest)

    # -- wire -------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        with self.lock:
            self.sock.sendall(data)

    def send_message(self, payload: bytes) -> None:
        self.send_raw(mask_frame(0x2, payload))

    def _flush(self) -> None:
        if not self.respond:
            self.conn.data_to_send()
            return
        for payload in self.conn.data_to_send():
            try:
                self.sock.sendall(mask_frame(0x2, payload))
            except OSError:
                return

    def _run(self) -> None:
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                with self.lock:
                    self.parser.feed(data)
                    self._flush()
        except OSError:
            pass
        finally:
            self.closed.set()
            with self.lock:
                for sock in list(self.services.values()):
                    try:
                        sock.close()
                    except OSError:
                        pass
                self.window_changed.notify_all()

    def _on_data(self, chunk, opcode) -> None:
        self._message += chunk

    def _on_message_end(self, opcode) -> None:
        payload, self._message = bytes(self._message), bytearray()
        for event in self.conn.receive_message(payload):
            self._event(event)

    def _on_control(self, opcode, payload) -> None:
        if opcode == 0x8:
            if len(payload) >= 2:
                self.close_code = struct.unpack("!H", payload[:2])[0]
                self.close_reason = payload[2:].decode("utf-8", "replace")
            if self.respond:
                try:
                    self.sock.sendall(mask_frame(0x8, payload[:2]))
                except OSError:
                    pass
            self.closed.set()
        elif opcode == 0x9 and self.respond:
            self.sock.sendall(mask_frame(0xA, payload))

    # -- streams ------------------------------------------------------------

    def ping(self, payload: bytes) -> None:
        """A mux PING: its PONG (in ``pongs``) says the server has handled all sent before."""
        with self.lock:
            self.conn.ping(payload)
            self._flush()

    def release(self) -> None:
        """"hold": accept the held opens, and every later one at once."""
        with self.lock:
            self.on_open = "accept"
            held, self.held = self.held, []
            for stream_id in held:
                self._accept(stream_id)
            self._flush()

    def _accept(self, stream_id) -> None:
        try:
            service = socket.create_connection(("127.0.0.1", self.service), timeout=5)
        except OSError:
            self.conn.reset_stream(stream_id, ResetCode.REFUSED, "refused")
            return
        service.settimeout(None)
        self.services[stream_id] = service
        self.conn.accept_stream(stream_id)
        threading.Thread(target=self._pump, args=(stream_id, service), daemon=True).start()

    def _event(self, event) -> None:
        kind = type(event)
        if kind is StreamOpened:
            self.opened.append((event.stream_id, event.meta))
            if self.on_open == "refuse":
                self.conn.reset_stream(event.stream_id, ResetCode.REFUSED, "connection refused")
            elif self.on_open == "timeout":
                self.conn.reset_stream(event.stream_id, ResetCode.TIMEOUT, "service timed out")
            elif self.on_open == "accept":
                self._accept(event.stream_id)
            elif self.on_open == "hold":
                self.held.append(event.stream_id)
        elif kind is DataReceived:
            service = self.services.get(event.stream_id)
            if service is not None:
                try:
                    service.sendall(event.data)
                except OSError:
                    pass
            self.conn.consumed(event.stream_id, len(event.data))
        elif kind is SendWindowOpened:
            self.window_changed.notify_all()
        elif kind is PongReceived:
            self.pongs.append(event.payload)
        elif kind is StreamEnded:
            service = self.services.get(event.stream_id)
            if service is not None:
                try:
                    service.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        elif kind in (StreamReset, StreamClosed):
            if kind is StreamReset:
                self.resets.append((event.stream_id, event.code, event.reason))
            service = self.services.pop(event.stream_id, None)
            if service is not None:
                try:
                    service.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.window_changed.notify_all()

    def _pump(self, stream_id, service) -> None:
        """Service -> stream, within the send window."""
        while True:
            with self.lock:
                while (self.conn.is_open(stream_id) and not self.closed.is_set()
                       and self.conn.send_window(stream_id) <= 0):
                    self.window_changed.wait(1.0)
                if not self.conn.is_open(stream_id) or self.closed.is_set():
                    return
                want = self.conn.send_window(stream_id)
            try:
                data = service.recv(min(want, 65536))
            except OSError:
                data = b""
            with self.lock:
                if not self.conn.is_open(stream_id):
                    return
                if not data:
                    self.conn.end_stream(stream_id)
                    self._flush()
                    return
                self.conn.send_data(stream_id, data)
                self._flush()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        self.closed.set()


class Service:
    """A TCP service in this process: each connection is served by ``handler(conn)``."""

    def __init__(self, handler=None):
        from websockify.demo.echo import echo_connection
        self.handler = handler or echo_connection
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self.handler, args=(conn,), daemon=True).start()

    def close(self):
        self.sock.close()


def agent_process(processes, directory, port: int, agent_id: str, service_port: int,
                  secret: bytes, *extra):
    """The real websockify-agent for ``agent_id`` (a token signed with ``secret``
    in ``directory``), serving 127.0.0.1:``service_port`` through ws://127.0.0.1:``port``."""
    from tests.helpers import PYTHON
    token_file = directory / ("%s.token" % agent_id)
    token_file.write_text(agent_token(agent_id, secret) + "\n")
    return processes([PYTHON, "-m", "websockify.agent", "--service",
                      "127.0.0.1:%d" % service_port, "--server",
                      "ws://127.0.0.1:%d/tunnel/%s" % (port, agent_id),
                      "--token-file", str(token_file), "--max-retry-delay", "1"] + list(extra),
                     name="agent-%s" % agent_id)
