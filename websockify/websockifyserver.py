"""websockify 0.13's handler and server base classes, for library callers.

``WebSockifyRequestHandler`` is what 0.13's hooks run on: the request
(``path``, ``headers``, ``client_address``), ``self.request`` (the
WebSocket once upgraded), ``send_frames``/``recv_frames``/``send_close``/
``send_ping``, ``msg``/``vmsg``/``warn``/``log_message``, ``CClose``.  It
runs two ways:

- in our workers (websockify.server.hooks): the engine has read and
  negotiated the request and builds the handler with a ``PreparedRequest``,
  so nothing is read again here;
- in ``LibProxyServer``, a threaded ``http.server`` server: the handler is
  an ``http.server`` handler that reads the request itself, upgrades it
  with protocol/handshake.py and serves static files from ``web``.

``WebSockifyServer`` holds 0.13's static helpers (``socket``, ``get_logger``)
and exceptions (``EClose``, ``Terminate``); websockify.websocketproxy's
``WebSocketProxy`` is the server that runs.
"""

import http.server
import logging
import os
import select
import socket
import ssl
import sys
import time
from typing import Optional, Tuple

from websockify.errors import HTTPError
from websockify.websocket import WebSocket, WebSocketWantReadError, WebSocketWantWriteError

log = logging.getLogger("websockify")

#: How long a session waits for the client's close reply after its own close.
CLOSE_REPLY_TIMEOUT = 2.0


class PreparedRequest:
    """A request the engine has read and judged; the handler adopts it as it is."""

    __slots__ = ("sock", "path", "headers", "command", "request_version", "requestline")

    def __init__(self, sock, path: str, headers, command: str = "GET",
                 request_version: str = "HTTP/1.1", requestline: str = ""):
        self.sock = sock
        self.path = path
        self.headers = headers
        self.command = command
        self.request_version = request_version
        self.requestline = requestline


def hook_refusal(exc: BaseException, what: str) -> HTTPError:
    """What a pre-upgrade hook's exception answers (our statuses, 0.13's exceptions).

    An HTTPError (our plugins' refusals) is its own answer; an auth plugin's
    AuthenticationError gives its status; 0.13's EClose and CClose say the
    request is refused (403, the reason logged); anything else is the hook
    failing: 500, logged with its traceback.
    """
    from websockify.auth_plugins import AuthenticationError
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, AuthenticationError):
        from websockify.plugins.auth import refusal_of
        return refusal_of(exc)
    if isinstance(exc, (WebSockifyServer.EClose, WebSockifyRequestHandler.CClose)):
        refusal = HTTPError(403, "connection refused")
        refusal.log_text = "%s refused the connection: %s" % (what, _args_text(exc))
        return refusal
    log.error("%s failed", what, exc_info=(type(exc), exc, exc.__traceback__))
    refusal = HTTPError(500, "request handler failed")
    refusal.log_text = "%s failed: %s: %s" % (what, type(exc).__name__, str(exc)[:200])
    return refusal


def _args_text(exc: BaseException) -> str:
    return " ".join(str(arg) for arg in exc.args) or type(exc).__name__


def _close_args(exc: BaseException) -> Tuple[Optional[int], str]:
    """0.13's ``CClose(code, reason)``, either possibly left out."""
    args = list(exc.args)
    code = args[0] if args and isinstance(args[0], int) else 1000
    reason = str(args[1]) if len(args) > 1 and args[1] is not None else ""
    return code, reason


class WebSockifyRequestHandler(http.server.SimpleHTTPRequestHandler):
    """0.13's WebSocket request handler; subclasses define ``new_websocket_client``."""

    server_version = "WebSockify"
    protocol_version = "HTTP/1.1"
    SocketClass = WebSocket

    class CClose(Exception):
        """Close the WebSocket: ``CClose(code, reason)``."""

    def __init__(self, req, addr, server):
        self.only_upgrade = getattr(server, "only_upgrade", False)
        self.verbose = getattr(server, "verbose", False)
        self.daemon = getattr(server, "daemon", False)
        self.record = getattr(server, "record", False)
        self.run_once = getattr(server, "run_once", False)
        self.handler_id = getattr(server, "handler_id", False)
        self.file_only = getattr(server, "file_only", False)
        self.traffic = getattr(server, "traffic", False)
        self.web_auth = getattr(server, "web_auth", False)
        self.host_token = getattr(server, "host_token", False)
        self.logger = getattr(server, "logger", None) or WebSockifyServer.get_logger()
        self.rec = None
        self.send_parts: list = []
        self.start_time = int(time.time() * 1000)
        self._recording = None
        if isinstance(req, PreparedRequest):
            # The engine has read the request: adopt it, serve nothing here.
            self.request = self.connection = req.sock
            self.client_address = addr
            self.server = server
            self.path = req.path
            self.headers = req.headers
            self.command = req.command
            self.request_version = req.request_version
            self.requestline = req.requestline
            self.close_connection = True
            return
        web = getattr(server, "web", None)
        super().__init__(req, addr, server, directory=web or None)

    # -- logging -------------------------------------------------------------

    def log_message(self, format, *args) -> None:
        peer = self.client_address[0] if self.client_address else ""
        self.logger.info("%s: %s", peer, (format % args) if args else format)

    def log_request(self, code="-", size="-") -> None:
        if self.verbose:
            super().log_request(code, size)

    def print_traffic(self, token: str = ".") -> None:
        """--traffic: the legend's characters on standard output."""
        if self.traffic:
            sys.stdout.write(token)
            sys.stdout.flush()

    def msg(self, msg, *args, **kwargs) -> None:
        self.logger.log(logging.INFO, "% 3d: %s" % (self.handler_id or 0, msg), *args, **kwargs)

    def vmsg(self, msg, *args, **kwargs) -> None:
        self.logger.log(logging.DEBUG, "% 3d: %s" % (self.handler_id or 0, msg), *args, **kwargs)

    def warn(self, msg, *args, **kwargs) -> None:
        self.logger.log(logging.WARNING, "% 3d: %s" % (self.handler_id or 0, msg), *args,
                        **kwargs)

    # -- the WebSocket -------------------------------------------------------

    def send_frames(self, bufs=None) -> bool:
        """Queue ``bufs`` as messages and send what is queued; True if some is left."""
        for buf in bufs or ():
            if self._recording is not None:
                self._recording.to_client(buf)
            self.send_parts.append(buf)
        while self.send_parts:
            try:
                self.request.sendmsg(self.send_parts[0])
            except WebSocketWantWriteError:
                self.print_traffic("<.")
                return True
            self.send_parts.pop(0)
            self.print_traffic("<")
        return False

    def recv_frames(self):
        """``(messages, closed)``: what has arrived, and ``{'code', 'reason'}`` once closed."""
        bufs = []
        while True:
            try:
                buf = self.request.recvmsg()
            except WebSocketWantReadError:
                self.print_traffic("}.")
                break
            if buf is None:
                return bufs, {"code": self.request.close_code,
                              "reason": self.request.close_reason}
            self.print_traffic("}")
            if self._recording is not None:
                self._recording.from_client(buf)
            bufs.append(buf)
            if not self.request.pending():
                break
        return bufs, False

    def send_close(self, code: Optional[int] = 1000, reason: str = "") -> None:
        self.request.shutdown(socket.SHUT_RDWR, code, reason)

    def send_pong(self, data: bytes = b"") -> None:
        self.request.pong(data)

    def send_ping(self, data: bytes = b"") -> None:
        self.request.ping(data)

    def _websocket_session(self, websocket: WebSocket, recording=None) -> None:
        """After the 101: run ``new_websocket_client`` and close as it ends.

        ``CClose`` closes with its code; any other exception is the handler
        failing (logged with its traceback; the client gets 1011); either
        way the client's close reply is awaited briefly.
        """
        self.request = websocket
        self.server.ws_connection = True
        self.send_parts = []
        self.start_time = int(time.time() * 1000)
        self._recording = recording
        # 0.13's client_address is (host, port, is_ssl) for TCP clients.
        secure = len(self.client_address or ()) > 2 and bool(self.client_address[2])
        self.log_message("%s WebSocket connection%s",
                         "SSL/TLS (wss://)" if secure else "Plain non-SSL (ws://)",
                         "" if self.path == "/" else ", path %r" % _redacted(self.path))
        try:
            self.new_websocket_client()
        except self.CClose as exc:
            self._close_quietly(*_close_args(exc))
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            if isinstance(exc, OSError):
                self.log_message("session ended: %s", exc.strerror or exc)
            else:
                self.logger.error("%s: %s.new_websocket_client failed", self.client_address[0]
                                  if self.client_address else "", type(self).__name__,
                                  exc_info=True)
            self._close_quietly(1011, "Internal error")
        self._await_close_reply(CLOSE_REPLY_TIMEOUT)

    def _close_quietly(self, code: Optional[int], reason: str) -> None:
        try:
            self.send_close(code, reason)
        except (WebSocketWantWriteError, OSError):
            pass

    def _await_close_reply(self, timeout: float) -> None:
        """Read (and drop) what the client still sends until its close frame or ``timeout``."""
        websocket = self.request
        deadline = time.monotonic() + timeout
        while websocket.socket is not None and not websocket._received_close:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                if not websocket.pending():
                    ready, _, _ = select.select([websocket], [], [], left)
                    if not ready:
                        break
                while websocket.recvmsg() is not None:
                    pass
            except WebSocketWantReadError:
                continue
            except (OSError, ValueError):
                break
        websocket.close()

    # -- 0.13's hooks -----------------------------------------------------------

    def new_websocket_client(self) -> None:
        """Serve the WebSocket client (a subclass must define it)."""
        raise NotImplementedError("%s must define new_websocket_client()" % type(self).__name__)

    def validate_connection(self) -> None:
        """Before the upgrade: check the request (a token) and pick the target."""

    def auth_connection(self) -> None:
        """Before the upgrade: check that the request is allowed."""

    # -- LibProxyServer: http.server reads and answers the request ------------

    def do_GET(self) -> None:
        from websockify.protocol.handshake import is_upgrade_request
        if is_upgrade_request(self.command, self.headers):
            self.handle_upgrade()
            return
        self._static(super().do_GET)

    def do_HEAD(self) -> None:
        self._static(super().do_HEAD)

    def _static(self, serve) -> None:
        """A plain request: --web-auth's verdict, then the file (405 without ``web``)."""
        if not self._web_allowed():
            return
        if self.only_upgrade:
            self.send_error(405)
        else:
            serve()

    def _web_allowed(self) -> bool:
        if not self.web_auth:
            return True
        try:
            self.auth_connection()
        except BaseException as exc:     # noqa: B902 - every failure is an answer
            if isinstance(exc, KeyboardInterrupt) and not _in_thread():
                raise
            self._refuse(hook_refusal(exc, "%s.auth_connection" % type(self).__name__))
            return False
        return True

    def list_directory(self, path):
        if self.file_only:
            self.send_error(404)
            return None
        return super().list_directory(path)

    def handle_upgrade(self) -> None:
        """Hooks, negotiation and the 101 on a blocking socket, then the session."""
        from websockify.protocol.handshake import UpgradeRequest, negotiate
        self._drop_client_ssl_headers()
        try:
            self.validate_connection()
            self.auth_connection()
            accept = negotiate(UpgradeRequest(self.request_version, self.path, self.headers),
                               legacy_clients=True)
            key3 = self.rfile.read(8) if accept.needs_key3 else b""
            early = self._read_ahead()
            response = accept.response(key3)
        except BaseException as exc:     # noqa: B902 - every failure is an answer
            if isinstance(exc, KeyboardInterrupt) and not _in_thread():
                raise
            self._refuse(hook_refusal(exc, "%s before the upgrade" % type(self).__name__))
            return
        self.close_connection = True
        self.connection.sendall(response)
        websocket = self.SocketClass()._attach(self.connection, accept.codec, early)
        recorder = getattr(self.server, "recorder", None)
        recording = recorder.open("%s %s" % (self.client_address[0], _redacted(self.path))) \
            if recorder is not None else None
        try:
            self._websocket_session(websocket, recording)
        finally:
            if recording is not None:
                recording.close()

    def _drop_client_ssl_headers(self) -> None:
        # SSL_* headers are the server's word about a client certificate.
        for name in [name for name in self.headers.keys() if name.upper().startswith("SSL_")]:
            del self.headers[name]

    def _read_ahead(self) -> bytes:
        """What the client sent after its head and http.server's reader already holds."""
        timeout = self.connection.gettimeout()
        self.connection.setblocking(False)
        try:
            data = self.rfile.peek(1 << 16)
        except (BlockingIOError, ssl.SSLWantReadError, OSError, ValueError):
            data = b""
        finally:
            self.connection.settimeout(timeout)
        return self.rfile.read(len(data)) if data else b""

    def _refuse(self, refusal: HTTPError) -> None:
        from websockify.protocol.handshake import refusal_bytes
        self.logger.info("%s: refused %r: %d %s", self.client_address[0],
                         _redacted(self.requestline), refusal.status, refusal.log_text)
        self.close_connection = True
        try:
            self.wfile.write(refusal_bytes(refusal.status_line, refusal.text, refusal.headers))
        except OSError:
            pass


def _redacted(text: str) -> str:
    from websockify.protocol.handshake import redact_uri
    return redact_uri(text or "")


def _in_thread() -> bool:
    import threading
    return threading.current_thread() is not threading.main_thread()


class WebSockifyServer:
    """0.13's server base: its static helpers and exceptions."""

    log_prefix = "websockify"

    class EClose(Exception):
        """Refuse a connection before the upgrade (the reason is logged)."""

    class Terminate(Exception):
        """Stop the server."""

    @staticmethod
    def get_logger() -> logging.Logger:
        """The logger sessions write to (``self.logger``); subclasses may return their own."""
        return logging.getLogger("websockify")

    @staticmethod
    def socket(host, port=None, connect: bool = False, prefer_ipv6: bool = False,
               unix_socket: Optional[str] = None, unix_socket_mode: Optional[int] = None,
               unix_socket_listen: bool = False, use_ssl: bool = False,
               tcp_keepalive: bool = True, tcp_keepcnt: Optional[int] = None,
               tcp_keepidle: Optional[int] = None,
               tcp_keepintvl: Optional[int] = None) -> socket.socket:
        """A connected (``connect``) or listening socket for ``host``:``port`` or a Unix path.

        As in 0.13: TCP addresses are tried IPv4 first (IPv6 first with
        ``prefer_ipv6``), keepalive is set as asked, ``use_ssl`` wraps a
        connected socket in TLS verified with the system CAs.  Inside a
        worker, sockets are gevent's: blocking here is cooperative.
        """
        if unix_socket:
            return _unix_socket(unix_socket, connect, unix_socket_listen, unix_socket_mode)
        if connect and not port:
            raise ValueError("connecting needs a port")
        if use_ssl and not connect:
            raise ValueError("TLS is only for connected sockets")
        if isinstance(host, bytes):
            host = host.decode("utf-8")
        host = host or None
        flags = 0 if connect else socket.AI_PASSIVE
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP,
                                   flags)
        if not infos:
            raise OSError("cannot resolve %r" % host)
        infos.sort(key=lambda info: info[0] != (socket.AF_INET6 if prefer_ipv6
                                                else socket.AF_INET))
        error: Optional[OSError] = None
        for family, kind, proto, _, address in infos if connect else infos[:1]:
            sock = socket.socket(family, kind, proto)
            try:
                _keepalive(sock, tcp_keepalive, tcp_keepcnt, tcp_keepidle, tcp_keepintvl)
                if not connect:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind(address)
                    sock.listen(100)
                    return sock
                sock.connect(address)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            if use_ssl:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            return sock
        raise error or OSError("no address for %r" % host)

    # 0.13's logging helpers on the server.
    def msg(self, *args, **kwargs) -> None:
        self.get_logger().log(logging.INFO, *args, **kwargs)

    def vmsg(self, *args, **kwargs) -> None:
        self.get_logger().log(logging.DEBUG, *args, **kwargs)

    def warn(self, *args, **kwargs) -> None:
        self.get_logger().log(logging.WARNING, *args, **kwargs)

    def started(self) -> None:
        """Called by 0.13 after the start; ours logs its own banner instead."""

    def poll(self) -> None:
        """Called periodically by 0.13's loop; the workers have no such loop here."""


def _keepalive(sock: socket.socket, enabled: bool, count: Optional[int],
               idle: Optional[int], interval: Optional[int]) -> None:
    if not enabled:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPCNT", count), ("TCP_KEEPIDLE", idle),
                          ("TCP_KEEPINTVL", interval)):
        if value and hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), int(value))


def _unix_socket(path: str, connect: bool, listen: bool, mode: Optional[int]) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if listen:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            old_umask = os.umask(0o777 & ~(0o600 if mode is None else mode))
            try:
                sock.bind(path)
            finally:
                os.umask(old_umask)
            sock.listen(100)
        else:
            sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock

