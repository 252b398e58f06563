"""One session: pick the target, connect to it before the 101, start the relay.

The service is created once per worker; the handshake handler calls
``open_target`` (which refuses with 502/504) and then ``start_session``.
"""

import errno
import logging
import os
import socket
import time
import _socket
from typing import Callable, Optional

import gevent
from gevent import socket as gsocket
from gevent.socket import wait_write

from websockify.addr import format_host_port
from websockify.metrics import counters as metrics
from websockify.errors import BadGateway, GatewayTimeout, HTTPError
from websockify.plugins.tokens import UNIX, BackendUnavailable
from websockify.protocol.codec import Codec
from websockify.protocol.handshake import redact_uri
from websockify.record import Recorder
from websockify.server.relay import Relay
from websockify.net.sockets import tune_stream
from websockify.net.tls import TLSStream, describe_error

log = logging.getLogger("websockify")


class Target:
    """Where one session goes, and the connected socket once it is open."""

    __slots__ = ("host", "port", "unix_path", "sock")

    def __init__(self, host: Optional[str] = None, port: Optional[int] = None,
                 unix_path: Optional[str] = None):
        self.host = host
        self.port = port
        self.unix_path = unix_path
        self.sock = None

    def __str__(self) -> str:
        if self.unix_path:
            return "unix:%s" % self.unix_path
        return format_host_port(self.host or "", self.port)

    def abandon(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _literal_family(host: str) -> Optional[int]:
    """AF_INET/AF_INET6 for an address literal, None for a name to resolve."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return family
        except (OSError, ValueError):
            pass
    return None


def _connect_address(family: int, address, deadline: float) -> _socket.socket:
    """Non-blocking connect waited for on the event loop; a plain socket back."""
    # The C-level socket type: the relay drives it from loop callbacks, where
    # gevent's cooperative wrapper (what monkey patching makes socket.socket)
    # would only add overhead.
    sock = _socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        err = sock.connect_ex(address)
        if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
            # A target on this host or LAN has often answered already: asking
            # again is cheaper than a trip through the event loop.
            err = sock.connect_ex(address)
            if err == errno.EISCONN:
                err = 0
            elif err in (errno.EALREADY, errno.EINPROGRESS, errno.EAGAIN):
                wait_write(sock.fileno(), timeout=max(0.0, deadline - time.monotonic()),
                           timeout_exc=socket.timeout("connect timed out"))
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return sock


def _connect(target: Target, timeout: float) -> _socket.socket:
    deadline = time.monotonic() + timeout
    if target.unix_path:
        return _connect_address(socket.AF_UNIX, target.unix_path, deadline)
    family = _literal_family(target.host)
    if family is not None:
        # An address literal needs no resolver round trip.
        return _connect_address(family, (target.host, target.port), deadline)
    error: Optional[OSError] = None
    for family, _, _, _, address in gsocket.getaddrinfo(target.host, target.port, 0,
                                                         socket.SOCK_STREAM):
        try:
            return _connect_address(family, address, deadline)
        except socket.timeout:
            raise
        except OSError as exc:
            error = exc
    raise error or OSError(errno.EHOSTUNREACH, "no address for %s" % target.host)


class ProxyService:
    """Per-worker session factory and registry of live relays."""

    session_class = Relay

    def __init__(self, config, runtime, loop, *, on_session_start: Callable[[], None],
                 on_session_end: Callable[[], None],
                 traffic: Optional[Callable[[str], None]] = None):
        self.config = config
        self.runtime = runtime
        self.loop = loop
        # The worker's: the server counts connections, the scoreboard sessions.
        self.on_session_start = on_session_start
        self.on_session_end = on_session_end
        self.traffic = traffic
        self.relays = set()
        self.sessions_done = 0
        self.recorder = Recorder(config.record) if config.record else None

    # -- before the 101 ----------------------------------------------------

    def pick_target(self, handler) -> Target:
        config = self.config
        if self.runtime.tokens is not None:
            return self._token_target(handler)
        if config.unix_target:
            return Target(unix_path=config.unix_target)
        if config.tunnel_config and config.target_port is None:
            # --tunnel-config alone: a WebSocket has nowhere to go but a tunnel.
            raise HTTPError(404, "no target: this server carries reverse tunnels only")
        return Target(config.target_host, config.target_port)

    def _token_target(self, handler) -> Target:
        """Ask the token plugin; refusals are HTTPErrors (400/403/404/502/503)."""
        # Plugins block cooperatively (gevent is patched in workers); a lookup
        # that hangs must not hold the handshake for longer than a connect.
        timeout = self.config.connect_timeout
        with gevent.Timeout(timeout, BackendUnavailable(
                "token lookup took longer than %g s" % timeout)):
            host, port = self.runtime.tokens.resolve(handler.environ)
        if host == UNIX:
            return Target(unix_path=port)
        return Target(host, port)

    def authenticate(self, handler, target: Target) -> None:
        """--auth-plugin's verdict on the request, after the token lookup (as websockify)."""
        auth = self.runtime.auth
        if auth is not None:
            # A unix-socket target is (None, path), as websockify passes it.
            auth.check(handler.headers, target.host, target.unix_path or target.port)

    def open_target(self, handler) -> Target:
        """Authenticate, then connect to the session's target or raise 502/504."""
        target = self.pick_target(handler)
        self.authenticate(handler, target)
        self.connect(target, self.runtime.target_tls)
        return target

    def connect(self, target: Target, target_tls=None) -> None:
        """Connect ``target.sock`` (TLS with ``target_tls``' contexts) or raise 502/504."""
        timeout = self.config.connect_timeout
        try:
            target.sock = _connect(target, timeout)
        except socket.timeout:
            raise GatewayTimeout("target %s did not accept the connection within %g s"
                                 % (target, timeout)) from None
        except socket.gaierror as exc:
            raise BadGateway("cannot resolve target %s: %s" % (target, exc.strerror)) from None
        except OSError as exc:
            if exc.errno == errno.ETIMEDOUT:
                raise GatewayTimeout("connecting to target %s timed out" % target) from None
            raise BadGateway("cannot connect to target %s: %s"
                             % (target, exc.strerror or exc)) from None
        tune_stream(target.sock)
        if target_tls is not None:
            self._start_target_tls(target, timeout, target_tls)

    def _start_target_tls(self, target: Target, timeout: float, target_tls) -> None:
        """--ssl-target: the TLS handshake with the target, its certificate checked."""
        host = target.host            # None for a unix-socket target
        context = target_tls.context_for(host)
        stream = TLSStream(target.sock, context, server_side=False, server_hostname=host)
        target.sock = stream
        try:
            stream.handshake(time.monotonic() + timeout)
        except socket.timeout:
            target.abandon()
            raise GatewayTimeout("TLS handshake with target %s not completed within %g s"
                                 % (target, timeout)) from None
        except OSError as exc:
            target.abandon()
            raise BadGateway("TLS to target %s failed: %s"
                             % (target, describe_error(exc))) from None

    # -- after the 101 -------------------------------------------------------

    @property
    def legacy_clients(self) -> bool:
        """Whether base64 and Hixie clients can be served (their framing is the codec's)."""
        return self.session_class.codec_framing

    def start_session(self, target: Target, client: socket.socket, early: bytes,
                      handler, codec: Codec) -> Relay:
        label = "%s %s -> %s" % (handler.peer, redact_uri(handler.environ.get("RAW_URI", "/")),
                                 self.describe_target(target))
        log.debug("%s: session opened (protocol %s, %s framing)", label,
                  handler.environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", "-"), codec.name)
        recording = self.recorder.open(label) if self.recorder is not None else None
        relay = self.session_class(self.loop, client, target.sock, label=label,
                      on_finish=self._finished,
                      max_frame_size=self.config.max_frame_size,
                      heartbeat=self.config.heartbeat,
                      heartbeat_timeout=self.config.heartbeat_timeout,
                      traffic=self.traffic, codec=codec, recorder=recording)
        target.sock = None
        self.relays.add(relay)
        metrics.session_opened()
        self.on_session_start()
        relay.start(early)
        return relay

    def describe_target(self, target: Target) -> str:
        return str(target)

    def forget(self, session, recording) -> None:
        """A session (a relay, or a hooked one) is over: uncount it, close its recording."""
        self.relays.discard(session)
        self.sessions_done += 1
        if recording is not None:
            recording.close()

    def _finished(self, relay: Relay) -> None:
        self.forget(relay, relay.recorder)
        stats = relay.stats
        code = relay.session.close_code
        lasted = time.time() - stats.started
        metrics.session_closed(code, lasted)
        reason = (" %s" % relay.session.close_reason) if relay.session.close_reason else ""
        log.info("%s: closed (%s%s) after %.1fs, %d bytes from client, %d bytes to client",
                 relay.label, code if code is not None else "-", reason,
                 lasted, stats.from_client, stats.to_client)
        self.on_session_end()

    def shutdown_all(self, code: int = 1001, reason: str = "Server shutting down") -> None:
        for relay in list(self.relays):
            relay.shutdown(code, reason)

    def finish_recordings(self, timeout: float = 10.0) -> None:
        """Before the worker exits: let the writer thread put recordings on disk."""
        if self.recorder is not None:
            self.recorder.wait_written(timeout)

    def wait_empty(self, timeout: Optional[float]) -> bool:
        """Wait until no relay is left; False if the timeout passed first."""
        deadline = None if timeout is None else time.time() + timeout
        while self.relays:
            if deadline is not None and time.time() >= deadline:
                return False
            gevent.sleep(0.05)
        return True
