"""Sessions of a library caller's handler class that overrides 0.13's hooks (in a worker).

The worker uses ``HookedService`` instead of ProxyService only when the
configured RequestHandlerClass overrides a hook (websocketproxy.HOOKS).
Each session builds the caller's handler on a copy of the caller's server
object (so what a hook writes there stays in that session, as it did in
0.13's process per connection) and runs, in 0.13's order:

- ``validate_connection`` and ``auth_connection`` in the handshake's
  greenlet, before the 101: an exception is an HTTP answer
  (websockifyserver.hook_refusal);
- unless ``new_websocket_client`` is overridden, the target the hooks left
  on ``self.server`` is connected before the 101 as the command line does
  (502/504); if ``do_proxy`` is not overridden either, the relay carries
  the session as for any other;
- otherwise ``new_websocket_client`` (or the default one, calling the
  overridden ``do_proxy``) runs in a greenlet of its own after the 101,
  with ``self.request`` a websockify.websocket.WebSocket over a blocking
  gevent socket: blocking code in a hook waits cooperatively, and an
  exception ends that session only (1011).
"""

import copy
import http.client
import logging
import time
from typing import Any, Optional

import gevent
from gevent import socket as gsocket
from gevent.socket import wait_read, wait_write

from websockify.addr import UNIX
from websockify.errors import BadGateway
from websockify.metrics import counters as metrics
from websockify.net.tls import TargetContexts, TLSStream
from websockify.plugins.tokens.targets import target_from_result
from websockify.protocol.handshake import redact_uri
from websockify.server.proxy import ProxyService, Target
from websockify.websocket import WebSocket
from websockify.websockifyserver import PreparedRequest, hook_refusal

log = logging.getLogger("websockify")


class SessionShutdown(BaseException):
    """Raised in a session's greenlet when the worker closes its sessions."""

    def __init__(self, code: int, reason: str):
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class CooperativeTLS:
    """A TLSStream (net/tls.py) as the blocking socket hook code expects; waits on the loop."""

    def __init__(self, stream: TLSStream):
        self.stream = stream

    def fileno(self) -> int:
        return self.stream.fileno()

    def recv(self, size: int) -> bytes:
        buf = bytearray(size)
        while True:
            try:
                count = self.stream.recv_into(buf, size)
            except BlockingIOError:
                wait_read(self.stream.fileno())
                continue
            return bytes(buf[:count])

    def send(self, data) -> int:
        self.sendall(data)
        return len(data)

    def sendall(self, data) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.stream.send(view):]
            except BlockingIOError:
                wait_write(self.stream.fileno())
        while not self.stream.flush():
            wait_write(self.stream.fileno())

    def pending(self) -> bool:
        return self.stream.buffered()

    def getpeercert(self, binary_form: bool = False):
        return self.stream.tls.getpeercert(binary_form)

    def shutdown(self, how: int) -> None:
        self.stream.shutdown(how)

    def close(self) -> None:
        self.stream.close()

    def __getattr__(self, name: str):
        # setsockopt, getpeername ...: the plain socket under the TLS.
        return getattr(self.stream.sock, name)


def cooperative(sock: Any) -> Any:
    """The engine's non-blocking socket (or TLSStream) as a blocking, cooperative one."""
    if isinstance(sock, TLSStream):
        return CooperativeTLS(sock)
    if isinstance(sock, gsocket.socket):
        return sock
    return gsocket.socket(sock.family, sock.type, 0, sock.detach())


def _header_message(headers) -> http.client.HTTPMessage:
    """The request headers as 0.13's handlers see them (http.client's message)."""
    message = http.client.HTTPMessage()
    for name, value in headers.items():
        message[name] = value
    return message


class HookedSession:
    """One session of the caller's handler: its hooks before and after the 101."""

    def __init__(self, service: "HookedService", handler):
        self.service = service
        self.http = handler
        self.label = "%s %s" % (handler.peer, redact_uri(handler.environ.get("RAW_URI", "/")))
        self.handler: Any = None
        self.target: Optional[Target] = None
        self.websocket: Optional[WebSocket] = None
        self.greenlet = None
        self.recording = None
        self.started = time.time()

    def _build_handler(self) -> Any:
        service, http_handler = self.service, self.http
        hooks, runtime, config = service.hooks, service.runtime, service.config
        server = copy.copy(hooks.server)
        # The plugins as this generation loaded them (a reload may have renewed them).
        server.token_plugin = runtime.tokens.plugin if runtime.tokens is not None else None
        server.auth_plugin = runtime.auth.plugin if runtime.auth is not None else None
        if config.wrap_cmd:
            server.target_host, server.target_port = config.target_host, config.target_port
        service.handler_count += 1
        server.handler_id = service.handler_count
        secure = http_handler.tls is not None
        sock = CooperativeTLS(http_handler.tls) if secure else http_handler.socket
        address = http_handler.client_address
        if isinstance(address, tuple) and len(address) >= 2:
            address = (address[0], address[1], secure)
        else:
            address = (config.unix_listen or "",)
        request = PreparedRequest(sock, http_handler.path, _header_message(http_handler.headers),
                                  http_handler.command, http_handler.request_version,
                                  http_handler.requestline)
        return hooks.handler_class(request, address, server)

    def before_upgrade(self) -> None:
        """The hooks before the 101 (and the target's connect, unless the handler does it)."""
        name = self.service.hooks.handler_class.__name__
        try:
            self.handler = handler = self._build_handler()
            handler.validate_connection()
            handler.auth_connection()
            if not self.service.connects_itself:
                self.target = self.service.connect_hooked(handler.server)
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            raise hook_refusal(exc, "%s before the upgrade" % name) from None

    def abandon(self) -> None:
        """The 101 could not be sent: nothing more happens."""
        if self.target is not None:
            self.target.abandon()

    def start(self, client, early: bytes, codec) -> None:
        """After the 101: the handler's session in a greenlet of its own."""
        service = self.service
        socket_class = getattr(self.handler, "SocketClass", WebSocket)
        if not (isinstance(socket_class, type) and issubclass(socket_class, WebSocket)):
            socket_class = WebSocket
        self.websocket = socket_class()._attach(cooperative(client), codec, early,
                                                service.config.max_frame_size)
        if self.target is not None:
            self.handler._engine_target = cooperative(self.target.sock)
            self.target.sock = None
        if service.recorder is not None:
            self.recording = service.recorder.open(self.label)
        self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        try:
            self.handler._websocket_session(self.websocket, self.recording)
        except SessionShutdown as stop:
            self._close(stop.code, stop.reason)
        except gevent.GreenletExit:
            self._close(1001, "Server shutting down")
        except BaseException:       # noqa: B902 - a session never takes the worker down
            log.exception("%s: session failed", self.label)
            self._close(1011, "Internal error")
        finally:
            target = self.handler._engine_target
            if target is not None:
                try:
                    target.close()
                except OSError:
                    pass
            self.service.hooked_session_ended(self)

    def _close(self, code: int, reason: str) -> None:
        try:
            self.websocket.close(code, reason)
        except Exception:
            pass

    def shutdown(self, code: int = 1001, reason: str = "Server shutting down") -> None:
        """Close the session from the server side (the worker stops)."""
        if self.greenlet is not None and not self.greenlet.dead:
            self.greenlet.kill(SessionShutdown(code, reason), block=False)


class HookedService(ProxyService):
    """ProxyService for a handler class with hooks: sessions run the caller's code."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hooks = self.runtime.hooks
        overridden = set(self.hooks.overridden)
        #: The handler connects its own target (after the 101).
        self.connects_itself = "new_websocket_client" in overridden
        #: The handler's code runs after the 101 (else the relay carries the session).
        self.after_upgrade = bool(overridden & {"new_websocket_client", "do_proxy"})
        self.handler_count = 0
        self._target_tls: Optional[TargetContexts] = None

    @property
    def legacy_clients(self) -> bool:
        # The relay and the WebSocket object both frame through the session's codec.
        return True

    def open_target(self, handler) -> HookedSession:
        session = HookedSession(self, handler)
        session.before_upgrade()
        return session

    def connect_hooked(self, server) -> Target:
        """The target the hooks left on ``server`` (0.13's attributes), connected (502/504)."""
        if server.unix_target:
            path = server.unix_target
            target = Target(unix_path=path.decode() if isinstance(path, bytes) else str(path))
        else:
            where = "%s:%s" % (server.target_host, server.target_port)
            if server.target_host is None or server.target_port is None:
                raise BadGateway("no target for this session (target_host:target_port is %s)"
                                 % where)
            try:
                host, port = target_from_result((server.target_host, server.target_port))
            except (ValueError, TypeError) as exc:
                raise BadGateway("unusable target %s: %s" % (where, exc)) from None
            target = Target(unix_path=port) if host == UNIX else Target(host, port)
        tls = None
        if server.ssl_target:
            tls = self.runtime.target_tls
            if tls is None:
                if self._target_tls is None:
                    self._target_tls = TargetContexts(self.config)
                tls = self._target_tls
        self.connect(target, tls)
        return target

    def start_session(self, session: HookedSession, client, early: bytes, handler, codec):
        if not self.after_upgrade:
            return super().start_session(session.target, client, early, handler, codec)
        session.start(client, early, codec)     # the greenlet runs once we yield
        self.relays.add(session)
        metrics.session_opened()
        self.on_session_start()
        return session

    def hooked_session_ended(self, session: HookedSession) -> None:
        self.forget(session, session.recording)
        websocket = session.websocket
        code = websocket.close_code if websocket is not None else None
        reason = (websocket.close_reason if websocket is not None else None) or ""
        lasted = time.time() - session.started
        metrics.session_closed(code, lasted)
        log.info("%s: closed (%s%s) after %.1fs", session.label,
                 code if code is not None else "-", " " + reason if reason else "", lasted)
        self.on_session_end()
