"""The worker's gevent server: accepts while it has room for another connection.

A pywsgi server whose capacity counts connections, not greenlets: a
session keeps its place after the handshake greenlet has handed it to the
event-driven relay, so one worker never holds more sockets than its
descriptor limit allows and the other workers take the rest.
"""

import logging

from gevent.pywsgi import WSGIServer

from websockify.metrics import counters as metrics
from websockify.server.http import Handler

log = logging.getLogger("websockify")


class BridgeServer(WSGIServer):
    handler_class = Handler
    # Several workers share the listener; taking a few connections per
    # wake-up spreads them instead of letting one worker grab a burst.
    max_accept = 8

    def __init__(self, listener, application, service, *, max_connections: int,
                 run_once: bool = False, tls_context=None, ssl_only: bool = False,
                 handshake_timeout: float = 10.0, web_auth=None, web_auth_target=(None, None),
                 trusted_proxy=None, tunnels=None):
        super().__init__(listener, application, log=None, error_log=log)
        self.service = service
        self.max_connections = max_connections
        self.connections = 0
        self.run_once = run_once
        #: ssl.SSLContext for clients that open with a TLS hello (None: plain only).
        self.tls_context = tls_context
        self.ssl_only = ssl_only
        self.handshake_timeout = handshake_timeout
        #: --web-auth: the auth plugin asked for static files too, with this target.
        self.web_auth = web_auth
        self.web_auth_target = web_auth_target
        #: --trusted-proxy: whose X-Forwarded-For names the client in log lines.
        self.trusted_proxy = trusted_proxy
        #: The worker's tunnel/hub.py TunnelHub (None without --tunnel-config).
        self.tunnels = tunnels
        self.handshakes = set()
        self._accepting_for_good = True

    def full(self) -> bool:
        return self.connections >= self.max_connections or not self._accepting_for_good

    def do_handle(self, *args):
        # Count at accept time: _do_read checks full() before each accept.
        self.connections += 1
        try:
            super().do_handle(*args)
        except BaseException:
            self.connections -= 1
            raise

    def close_listener(self) -> None:
        try:
            self.socket.close()
        except Exception:
            pass

    def handle(self, sock, address):
        import gevent
        current = gevent.getcurrent()
        self.handshakes.add(current)
        handler = None
        metrics.connection_accepted()
        try:
            handler = self.handler_class(sock, address, self)
            handler.handle()
        finally:
            self.handshakes.discard(current)
            if handler is None or not handler.detached:
                self.release()

    def session_started(self) -> None:
        """A WebSocket session began; with --run-once, no other may start."""
        if self.run_once:
            self.stop_accepting_for_good()

    def release(self) -> None:
        """A connection ended (handshake refused, static request done or relay finished)."""
        self.connections -= 1
        if self._accepting_for_good and self.connections < self.max_connections and self.started:
            self.start_accepting()

    def stop_accepting_for_good(self) -> None:
        self._accepting_for_good = False
        self.stop_accepting()        # gevent's: a no-op when not accepting

    def kill_handshakes(self) -> None:
        for greenlet in list(self.handshakes):
            greenlet.kill(block=False)

    def close(self) -> None:
        # Closing our copy of the listener leaves the other workers serving.
        try:
            super().close()
        except Exception:  # pragma: no cover - defensive on shutdown
            log.debug("error closing the server", exc_info=True)
