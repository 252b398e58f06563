"""The master's --metrics listener: GET /metrics and /healthz, served from the master's loop.

The master is not a gevent process and must never block, so this is a
small non-blocking server driven by the master's select(): at most
``MAX_CLIENTS`` connections, a request head of at most 8 KiB within
``CLIENT_TIMEOUT`` seconds, one answer per connection (then it is closed).
Because it lives in the master it answers while workers die and are
replaced, and it reads every worker's counters from shared memory.

``answer()`` is the pure part: a request head in, the response out.
"""

import logging
import socket
import time
from typing import Callable, Dict, List, Optional, Tuple

from websockify.addr import format_host_port
from websockify.metrics.exposition import CONTENT_TYPE
from websockify.net.sockets import ListenError, tcp_listener

log = logging.getLogger("websockify")

MAX_CLIENTS = 64
CLIENT_TIMEOUT = 10.0
HEAD_LIMIT = 8192

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}


def response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
             head_only: bool = False) -> bytes:
    head = ("HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
            % (status, _REASONS[status], content_type, len(body))).encode("latin-1")
    return head if head_only else head + body


def answer(head: bytes, healthy: Callable[[], bool],
           metrics: Callable[[], bytes]) -> Tuple[int, bytes]:
    """(status, response bytes) for one request head (without its final blank line)."""
    lines = head.decode("latin-1").split("\r\n")
    words = lines[0].split(" ")
    if len(words) != 3 or not words[2].startswith("HTTP/1."):
        return 400, response(400, b"malformed request line\n")
    method, target, _ = words
    path = target.split("?", 1)[0]
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            return 400, response(400, b"malformed header line\n")
        headers[name.strip().lower()] = value.strip().lower()
    if "upgrade" in headers or path not in ("/metrics", "/healthz"):
        # Nothing here is a WebSocket, and no other path exists.
        return 404, response(404, b"not found: this port serves /metrics and /healthz\n")
    if method not in ("GET", "HEAD"):
        return 405, response(405, b"only GET and HEAD\n")
    head_only = method == "HEAD"
    if path == "/healthz":
        if healthy():
            return 200, response(200, b"ok\n", head_only=head_only)
        return 503, response(503, b"no worker is serving\n", head_only=head_only)
    return 200, response(200, metrics(), CONTENT_TYPE, head_only=head_only)


class _Client:
    __slots__ = ("sock", "peer", "received", "reply", "deadline")

    def __init__(self, sock: socket.socket, peer: str, deadline: float):
        self.sock = sock
        self.peer = peer
        self.received = b""
        self.reply: Optional[memoryview] = None
        self.deadline = deadline


class MetricsEndpoint:
    """The listener and its clients; the master's loop calls ``poll_fds`` and ``service``."""

    def __init__(self, host: str, port: int, healthy: Callable[[], bool],
                 metrics: Callable[[], bytes]):
        try:
            self.listener = tcp_listener(host, port)
        except ListenError as exc:
            raise ListenError("--metrics: %s" % exc) from None
        self.address = format_host_port(*self.listener.getsockname()[:2])
        self.healthy = healthy
        self.metrics = metrics
        self.clients: Dict[int, _Client] = {}

    def poll_fds(self) -> Tuple[List[int], List[int]]:
        """(descriptors to watch for reading, for writing)."""
        readers, writers = [self.listener.fileno()], []
        for fd, client in self.clients.items():
            (writers if client.reply is not None else readers).append(fd)
        return readers, writers

    def service(self, readable, writable, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        if self.listener.fileno() in readable:
            self._accept(now)
        for fd in list(self.clients):
            client = self.clients[fd]
            if fd in readable and client.reply is None:
                self._read(client)
            elif fd in writable and client.reply is not None:
                self._write(client)
            if fd in self.clients and now > client.deadline:
                log.info("metrics %s: no complete request within %g s; closed",
                         client.peer, CLIENT_TIMEOUT)
                self._close(client)

    def _accept(self, now: float) -> None:
        for _ in range(MAX_CLIENTS):
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.info("metrics: accept failed: %s", exc.strerror or exc)
                return
            if len(self.clients) >= MAX_CLIENTS:
                sock.close()         # a scraper never needs this many at once
                continue
            sock.setblocking(False)
            peer = format_host_port(*address[:2]) if isinstance(address, tuple) else "unix"
            self.clients[sock.fileno()] = _Client(sock, peer, now + CLIENT_TIMEOUT)

    def _read(self, client: _Client) -> None:
        try:
            chunk = client.sock.recv(HEAD_LIMIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close(client)
            return
        client.received += chunk
        head, blank, _ = client.received.partition(b"\r\n\r\n")
        if len(head) > HEAD_LIMIT:
            self._reply(client, 431, response(431, b"request head over 8 KiB\n"))
            return
        if not blank:
            return
        status, reply = answer(head, self.healthy, self.metrics)
        self._reply(client, status, reply, head.split(b"\r\n", 1)[0])

    def _reply(self, client: _Client, status: int, reply: bytes, line: bytes = b"") -> None:
        request = line[:200].decode("latin-1", "replace")
        if status in (200, 503):
            log.debug("metrics %s: \"%s\" %d", client.peer, request, status)
        else:
            log.info("metrics %s: \"%s\" %d", client.peer, request, status)
        client.reply = memoryview(reply)
        self._write(client)

    def _write(self, client: _Client) -> None:
        try:
            sent = client.sock.send(client.reply)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(client)
            return
        client.reply = client.reply[sent:]
        if not client.reply:
            try:
                client.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._close(client)

    def _close(self, client: _Client) -> None:
        self.clients.pop(client.sock.fileno(), None)
        try:
            client.sock.close()
        except OSError:
            pass

    def close(self) -> None:
        """In the master at exit, and in each forked worker (the listener is the master's)."""
        for client in list(self.clients.values()):
            self._close(client)
        try:
            self.listener.close()
        except OSError:
            pass
