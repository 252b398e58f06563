"""The HTTP side of a connection: TLS sniffing, reading the head, answering.

A subclass of gevent-websocket's handler (itself a gevent pywsgi handler)
that tells TLS from plain by the first byte, reads the request head under a
byte budget and a deadline, has protocol.handshake judge it (gevent-websocket
would crash on a key that is not base64 and has no header limit), maps every
``HTTPError`` to a response with one log line, and hands an accepted
WebSocket to the proxy service.  Plain requests go to the WSGI application:
static files or 405.
"""

import logging
import socket
import time
import _socket
from typing import Optional

import gevent
from gevent.pywsgi import WSGIHandler
from geventwebsocket.handler import WebSocketHandler

from websockify.errors import BadRequest, HeaderTooLarge, HTTPError
from websockify.metrics import counters as metrics
from websockify.net.tls import TLSStream, describe_error, looks_like_tls
from websockify.protocol import forwarded
from websockify.protocol.handshake import (HEADER_LIMIT, Accept, RequestHeaders, UpgradeRequest,
                                           head_end, is_request_line, is_upgrade_request,
                                           negotiate, redact_uri, refusal_bytes)

log = logging.getLogger("websockify")

_READ_SIZE = 4096


class ClientGone(Exception):
    """The client closed or reset the connection before its request was complete."""


class HeadReader:
    """Reads the request head under a byte budget and keeps what follows it.

    Stands in for pywsgi's ``rfile``: the bytes after the head (a request
    body, or WebSocket frames a client sends before seeing the 101) stay in
    ``buffer`` for whoever reads next.
    """

    def __init__(self, sock, limit: int = HEADER_LIMIT):
        self.sock = sock
        self.limit = limit
        self.buffer = b""
        self.closed = False
        self.request_line: Optional[str] = None

    def read_head(self) -> Optional[bytes]:
        """The head up to and without the blank line; None if the client sent nothing.

        The request line is judged as soon as it is complete, so garbage is
        refused at once instead of after the handshake deadline.
        """
        data = self.buffer
        searched = 0
        while True:
            if self.request_line is None:
                if data and looks_like_tls(data[0]):
                    raise BadRequest("TLS handshake received, but this server has no "
                                     "certificate (see --cert): use ws://, not wss://")
                newline = data.find(b"\n")
                if newline >= 0:
                    line = data[:newline + 1]
                    self.request_line = line.rstrip(b"\r\n").decode("latin-1")
                    if not is_request_line(line):
                        raise BadRequest("not an HTTP request line (expected METHOD /path HTTP/1.1)")
            end, size = head_end(data, searched)
            if end >= 0:
                if end + size > self.limit:
                    raise HeaderTooLarge(self.limit)
                self.buffer = data[end + size:]
                return data[:end]
            if len(data) > self.limit:
                raise HeaderTooLarge(self.limit)
            searched = len(data)
            try:
                chunk = self.sock.recv(_READ_SIZE)
            except OSError as exc:
                raise ClientGone(exc.strerror or str(exc)) from None
            if not chunk:
                if not data:
                    return None
                raise ClientGone("connection closed after %d bytes of request head" % len(data))
            data += chunk

    def take_buffer(self) -> bytes:
        data, self.buffer = self.buffer, b""
        return data

    def read(self, size: int = -1) -> bytes:
        if self.buffer:
            if size < 0 or size >= len(self.buffer):
                return self.take_buffer()
            data, self.buffer = self.buffer[:size], self.buffer[size:]
            return data
        if size == 0:
            return b""
        return self.sock.recv(size if size > 0 else 65536)

    def readline(self, size: int = -1) -> bytes:
        line = b""
        while not line.endswith(b"\n") and (size < 0 or len(line) < size):
            want = -1 if size < 0 else size - len(line)
            if not self.buffer:
                chunk = self.sock.recv(_READ_SIZE)
                if not chunk:
                    break
                self.buffer = chunk
            cut = self.buffer.find(b"\n")
            cut = len(self.buffer) if cut < 0 else cut + 1
            if want >= 0:
                cut = min(cut, want)
            line += self.buffer[:cut]
            self.buffer = self.buffer[cut:]
        return line

    def close(self) -> None:
        self.closed = True


def _key3_timeout(timeout: float) -> HTTPError:
    return HTTPError(408, "the 8 bytes after a Hixie-76 request head not received within %g s"
                     % timeout)


class Handler(WebSocketHandler):
    """One client connection until it is upgraded, refused or done."""

    def __init__(self, sock, address, server):  # pylint: disable=super-init-not-called
        # pywsgi would wrap the socket in a buffered file; ours keeps the budget.
        self.socket = sock
        self.client_address = address
        self.server = server
        self.rfile = HeadReader(sock)
        #: The TLS stream when the client opened with a TLS hello.
        self.tls: Optional[TLSStream] = None
        self.detached = False
        #: What another worker said about a connection it handed over
        #: (tunnel/handoff.py): its TLS and client certificate stayed there.
        self.handoff: Optional[dict] = None
        self._header_block = b""
        self._logged_refusal = False
        self._deadline = 0.0
        self._accepted_at = time.monotonic()

    @property
    def peer(self) -> str:
        # The TCP peer, or the client a --trusted-proxy forwarded for.
        return forwarded.peer_label(self.client_address, self.headers,
                                    self.server.trusted_proxy)

    # -- reading the request ---------------------------------------------

    def handle_one_request(self):
        if self.rfile.closed:
            return None
        timeout = self.server.handshake_timeout
        if self._deadline:
            # The first request shares its deadline with the TLS handshake.
            timeout = max(0.001, self._deadline - time.monotonic())
        else:
            self._deadline = time.monotonic() + timeout
        try:
            with gevent.Timeout(timeout, HTTPError(
                    408, "request head not received within %g s" % self.server.handshake_timeout)):
                head = self.rfile.read_head()
        except HTTPError as exc:
            return self._refusal(exc, self.rfile.request_line or "")
        except ClientGone as exc:
            log.info("%s: client disconnected during the handshake: %s", self.peer, exc)
            return None
        if head is None:
            return None
        line, _, self._header_block = head.partition(b"\n")
        self.requestline = line.rstrip(b"\r").decode("latin-1")
        self.response_length = 0
        try:
            self.read_request(self.requestline)
        except HTTPError as exc:
            return self._refusal(exc, self.requestline)
        except Exception as exc:  # pywsgi raises ValueError subclasses for bad input
            message = getattr(exc, "formatted_message", None) or str(exc) or type(exc).__name__
            return self._refusal(BadRequest("malformed HTTP request: %s" % message),
                                 self.requestline)
        self.environ = self.get_environ()
        self.application = self.server.application
        self.handle_one_response()
        self._deadline = 0.0
        if self.close_connection or self.detached:
            return None
        return True

    def read_request(self, raw_requestline):
        """Parse the request line and headers into what pywsgi's environ needs.

        pywsgi would parse the headers with the email package, which costs
        more than the rest of the handshake; this parser is strict instead
        (a line without a colon, a folded line or a bad name is a 400).
        """
        if not raw_requestline.isprintable():
            raise BadRequest("request line is not printable text")
        words = raw_requestline.split()
        if len(words) != 3:
            raise BadRequest("request line must be METHOD TARGET HTTP-VERSION")
        self.command, self.path, self.request_version = words
        if not self._check_http_version():
            raise BadRequest("unsupported HTTP version %r" % self.request_version)
        self.headers = headers = RequestHeaders.parse(self._header_block)
        # SSL_* headers are the server's word about the client certificate.
        dropped = headers.remove_prefix("SSL_")
        if dropped:
            log.info("%s: dropped client-supplied header(s) %s", self.peer, ", ".join(dropped))
        common_name = None
        if self.tls is not None:
            common_name = self.tls.peer_common_name()
        elif self.handoff is not None:
            common_name = self.handoff.get("cn")
        if common_name is not None:
            headers["SSL_CLIENT_S_DN_CN"] = common_name
        if headers.get("transfer-encoding", "").lower() == "chunked":
            headers.remove("content-length")
        content_length = headers.get("content-length")
        if content_length is not None:
            if not content_length.isdigit():
                raise BadRequest("invalid Content-Length %r" % content_length)
            content_length = int(content_length)
            if content_length and self.command == "HEAD":
                raise BadRequest("unexpected Content-Length on HEAD")
        self.content_length = content_length
        connection = headers.get("connection", "").lower()
        if self.request_version == "HTTP/1.1":
            self.close_connection = connection == "close"
        else:
            self.close_connection = connection != "keep-alive"
        return True

    def get_environ(self):
        environ = WSGIHandler.get_environ(self)
        environ["RAW_URI"] = self.path
        if self.tls is not None or (self.handoff is not None and self.handoff.get("tls")):
            environ["wsgi.url_scheme"] = "https"
            environ["HTTPS"] = "on"
        return environ

    def _refusal(self, exc: HTTPError, what: str):
        log.info("%s: refused %r: %d %s", self.peer, redact_uri(what[:200]), exc.status,
                 exc.log_text)
        self._logged_refusal = True
        self.close_connection = True
        metrics.refused(exc.status)
        return exc.status_line, refusal_bytes(exc.status_line, exc.text, exc.headers)

    def handle(self):
        try:
            if not self._open_connection():
                return
            while self.socket is not None:
                result = self.handle_one_request()
                if result is None:
                    break
                if result is True:
                    continue
                self.status, body = result
                self._send_and_close(body)
                break
        finally:
            if self.socket is not None:
                try:
                    self.socket.close()
                except OSError:
                    pass
                self.socket = None
            self.rfile = None

    def _open_connection(self) -> bool:
        """Tell TLS from plain by the first byte and do the TLS handshake.

        False when the connection is over (refused or failed, logged here).
        Without a certificate nothing is peeked (--ssl-only needs one): the
        request reader itself recognises a TLS hello.
        """
        server = self.server
        self._deadline = time.monotonic() + server.handshake_timeout
        if self.handoff is not None:
            return True           # the worker that accepted it did the TLS
        context = server.tls_context
        if context is None and not server.ssl_only:
            return True
        first = None
        try:
            with gevent.Timeout(server.handshake_timeout, False):
                first = self.socket.recv(1, socket.MSG_PEEK)
        except OSError as exc:
            log.info("%s: client disconnected during the handshake: %s",
                     self.peer, exc.strerror or exc)
            return False
        if first == b"":
            return False          # connected and closed: nothing to say
        if first is None:
            return True           # nothing in time: the request reader answers 408
        if not looks_like_tls(first[0]):
            if server.ssl_only:
                self._refuse_plain()
                return False
            return True
        stream = TLSStream(self._raw_socket(), context, server_side=True)
        self.socket = self.tls = stream
        self.rfile = HeadReader(stream)
        try:
            stream.handshake(self._deadline)
        except socket.timeout:
            metrics.tls_handshake(ok=False)
            log.info("%s: TLS handshake not completed within %g s", self.peer,
                     server.handshake_timeout)
            return False
        except OSError as exc:        # ssl.SSLError is an OSError
            metrics.tls_handshake(ok=False)
            log.info("%s: TLS handshake failed: %s", self.peer, describe_error(exc))
            return False
        metrics.tls_handshake(ok=True)
        log.debug("%s: TLS %s established", self.peer, stream.version())
        return True

    def _refuse_plain(self) -> None:
        self.requestline = ""
        self.status, body = self._refusal(
            HTTPError(403, "this port requires TLS: use wss:// or https://"),
            "plain connection")
        self._send_and_close(body)

    def _send_and_close(self, body: bytes) -> None:
        """Send a refusal, then let the client read it before the socket closes.

        Closing with unread request bytes would make the kernel send a reset
        that can destroy the response in flight, so read them out briefly.
        """
        sock = self.socket
        if sock is None:
            return
        self.socket = None
        self.headers_sent = True
        self.close_connection = True
        try:
            sock.sendall(body)
            sock.shutdown(socket.SHUT_WR)
            with gevent.Timeout(1.0, False):
                drained = 0
                while drained < 256 * 1024:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    drained += len(chunk)
        except OSError:
            pass
        finally:
            sock.close()

    # -- answering ---------------------------------------------------------

    def run_application(self):
        server = self.server
        tunnels = server.tunnels
        try:
            upgrade = is_upgrade_request(self.command, self.headers)
            if tunnels is not None:
                if upgrade and tunnels.is_agent_request(self):
                    tunnels.accept_agent(self)
                    return
                if not upgrade and tunnels.is_status_request(self):
                    self.status = "200 OK"
                    self._send_and_close(tunnels.status(self))
                    self._log_status()
                    return
                # A viewer's request (a WebSocket upgrade too) for an agent's HTTP service.
                agent_id = tunnels.http_face_agent(self)
                if agent_id is not None:
                    tunnels.serve_http(self, agent_id)
                    return
            if upgrade:
                self._upgrade()
                return
            if server.web_auth is not None:
                server.web_auth.check(self.headers, *server.web_auth_target)
        except HTTPError as exc:
            self.status, body = self._refusal(exc, self.requestline)
            self._send_and_close(body)
            return
        WSGIHandler.run_application(self)

    def _log_status(self) -> None:
        log.info("%s: \"%s\" 200 (tunnel status)", self.peer, redact_uri(self.requestline))
        self._logged_refusal = True

    def _upgrade(self) -> None:
        service = self.server.service
        tunnels = self.server.tunnels
        agent_id = tunnels.bridge_agent(self) if tunnels is not None else None
        accept = negotiate(UpgradeRequest(self.request_version, self.path, self.headers,
                                          secure=self.tls is not None),
                           legacy_clients=service.legacy_clients)
        key3 = b""
        if accept.needs_key3:
            key3 = self._read_key3()
            if key3 is None:
                return
            # Read past the head: a hand-off to another worker sends it along.
            self.rfile.buffer = key3 + self.rfile.buffer
        if agent_id is not None:
            session = tunnels.bridge_target(self, agent_id)   # may raise 502/503/504
            if session is tunnels.handed_off:
                return
        else:
            session = service.open_target(self)          # may raise 502/504
        self._accept(session, accept, accept.response(key3))

    def _read_key3(self) -> Optional[bytes]:
        """The 8 bytes after a draft-76 head, under the handshake deadline.

        They are often in the same packet as the head (then in the reader's
        buffer already).  None when the client left (logged here).
        """
        rfile = self.rfile
        remaining = self._deadline - time.monotonic()
        try:
            with gevent.Timeout(max(remaining, 0.001),
                                _key3_timeout(self.server.handshake_timeout)):
                while len(rfile.buffer) < 8:
                    chunk = self.socket.recv(_READ_SIZE)
                    if not chunk:
                        raise ClientGone("connection closed before the 8 bytes after the head")
                    rfile.buffer += chunk
        except OSError as exc:
            log.info("%s: client disconnected during the handshake: %s",
                     self.peer, exc.strerror or exc)
            self.close_connection = True
            return None
        except ClientGone as exc:
            log.info("%s: client disconnected during the handshake: %s", self.peer, exc)
            self.close_connection = True
            return None
        key3, rfile.buffer = rfile.buffer[:8], rfile.buffer[8:]
        return key3

    def _accept(self, session, accept: Accept, response: bytes) -> None:
        """Send the 101 (the target is connected) and start the session."""
        try:
            self.socket.sendall(response)
        except OSError as exc:
            session.abandon()
            log.info("%s: client disconnected during the handshake: %s",
                     self.peer, exc.strerror or exc)
            self.close_connection = True
            return
        self.status = accept.status
        self.headers_sent = True
        self.close_connection = True
        metrics.handshake_done(time.monotonic() - self._accepted_at)
        early = self.rfile.take_buffer()
        if accept.needs_key3:
            early = early[8:]       # key3, answered in the 101
        client = self._detach()
        self.server.service.start_session(session, client, early, self, accept.codec)

    def _detach(self):
        """Hand the client connection to the relay: a plain socket or the TLS stream."""
        if self.tls is not None:
            stream = self.tls
            self.socket = None
        else:
            stream = self._raw_socket()
        self.detached = True
        return stream

    def _raw_socket(self) -> _socket.socket:
        """Take the client socket away from gevent, as a non-blocking plain socket."""
        gsock = self.socket
        family = gsock.family
        fd = gsock.detach()
        self.socket = None
        sock = _socket.socket(family, socket.SOCK_STREAM, 0, fd)
        sock.setblocking(False)
        return sock

    def log_request(self):
        if self.detached or self.status is None:
            return
        status = self._orig_status or self.status
        if isinstance(status, bytes):
            status = status.decode("latin-1")
        if status.startswith("101"):
            return
        if self._logged_refusal:
            return
        code = status.split(" ", 1)[0]
        if code[:1] in ("4", "5") and code.isdigit():
            metrics.refused(int(code))     # the web server's own errors (405, 404 ...)
        length = self.response_length or "-"
        log.info("%s: \"%s\" %s %s", self.peer, redact_uri(self.requestline), code, length)
