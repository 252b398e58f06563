"""websockify 0.13's proxy API: ProxyRequestHandler, WebSocketProxy, LibProxyServer, websockify_init.

Embedders subclass ``ProxyRequestHandler`` and override its hooks, build a
``WebSocketProxy`` (exactly 0.13's keyword arguments) and call
``start_server()``, or call ``websockify_init()`` to run ``sys.argv``.
``start_server()`` runs our master and forked gevent workers
(websockify.library); a handler that overrides a hook (``HOOKS``) has its
sessions run those hooks in the workers (websockify.server.hooks), one
greenlet per session, in 0.13's order:

    validate_connection() -> get_target(plugin)      before the 101
    auth_connection()                                before the 101
    new_websocket_client() -> do_proxy(target)       after the 101

A handler that overrides none is served by the relay as the command line
is.  ``LibProxyServer`` is a threaded ``http.server`` server running the
same handler in its own threads, for callers that want ``serve_forever()``.
"""

import collections
import logging
import select
import socket
import ssl
import time
from socketserver import ThreadingMixIn
from http.server import HTTPServer
from typing import Any, Dict, List, Optional

from websockify import auth_plugins as auth  # noqa: F401 - 0.13's module attribute
from websockify import library, websockifyserver
from websockify.log import TRAFFIC_LEGEND
from websockify.websocket import WebSocketWantWriteError
from websockify.websockifyserver import WebSockifyRequestHandler, WebSockifyServer

__all__ = ["ProxyRequestHandler", "WebSocketProxy", "LibProxyServer", "websockify_init",
           "select_ssl_version", "SSL_OPTIONS"]

log = logging.getLogger("websockify")

#: The methods whose overriding makes sessions run the handler's code.
HOOKS = ("validate_connection", "auth_connection", "get_target", "new_websocket_client",
         "do_proxy")

#: 0.13's ``ssl_options`` for each minimum TLS version (select_ssl_version).
SSL_OPTIONS: Dict[str, int] = {
    "default": ssl.OP_ALL,
    "tlsv1_1": ssl.OP_ALL | ssl.OP_NO_SSLv2 | ssl.OP_NO_SSLv3 | ssl.OP_NO_TLSv1,
    "tlsv1_2": (ssl.OP_ALL | ssl.OP_NO_SSLv2 | ssl.OP_NO_SSLv3 | ssl.OP_NO_TLSv1
                | ssl.OP_NO_TLSv1_1),
    "tlsv1_3": (ssl.OP_ALL | ssl.OP_NO_SSLv2 | ssl.OP_NO_SSLv3 | ssl.OP_NO_TLSv1
                | ssl.OP_NO_TLSv1_1 | ssl.OP_NO_TLSv1_2),
}


def select_ssl_version(version: str) -> int:
    """``ssl_options`` for a minimum TLS version name; an unknown name gets the strictest."""
    if version in SSL_OPTIONS:
        return SSL_OPTIONS[version]
    strictest = sorted(SSL_OPTIONS)[-1]
    log.warning("TLS version %s unsupported; falling back to %s", version, strictest)
    return SSL_OPTIONS[strictest]


def _buffered(obj: Any) -> bool:
    """Whether ``obj`` holds bytes a select() on its descriptor would not report."""
    pending = getattr(obj, "pending", None)
    if not callable(pending):
        return False
    try:
        return bool(pending())
    except (OSError, ValueError):
        return False


def _recv_ready(target: Any, size: int) -> Optional[bytes]:
    """What a target reported readable has; None if that was not application data.

    A TLS socket is readable for records that carry none (a TLS 1.3 session
    ticket after the handshake): a blocking recv() would then wait for the
    target while the client's bytes wait for us, so such a socket is read
    without blocking.
    """
    if not isinstance(target, ssl.SSLSocket):
        return target.recv(size)
    timeout = target.gettimeout()
    target.settimeout(0.0)
    try:
        return target.recv(size)
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
        return None
    finally:
        target.settimeout(timeout)


def _close_target(target: Any) -> None:
    for step in (lambda: target.shutdown(socket.SHUT_RDWR), target.close):
        try:
            step()
        except (OSError, AttributeError):
            pass


class ProxyRequestHandler(WebSockifyRequestHandler):
    """0.13's proxy handler: pick the target from a token, check auth, relay."""

    buffer_size = 65536
    traffic_legend = TRAFFIC_LEGEND
    #: A target the engine connected before the 101 (see websockify.server.hooks).
    _engine_target: Any = None

    def socket(self, *args, **kwargs):
        """``WebSockifyServer.socket`` (connect with ``connect=True``)."""
        return WebSockifyServer.socket(*args, **kwargs)

    def send_auth_error(self, ex) -> None:
        """0.13's answer to an AuthenticationError (LibProxyServer)."""
        self.send_response(ex.code, ex.msg)
        self.send_header("Content-Type", "text/html")
        for name, value in (ex.headers or {}).items():
            self.send_header(name, value)
        self.end_headers()

    # -- before the 101 --------------------------------------------------------

    def validate_connection(self) -> None:
        """With a token plugin: the target of the request's token, on ``self.server``."""
        plugin = self.server.token_plugin
        if not plugin:
            return
        host, port = self.get_target(plugin)
        if host == "unix_socket":
            self.server.unix_target = port
        else:
            self.server.target_host, self.server.target_port = host, port

    def get_target(self, target_plugin) -> tuple:
        """``(host, port)`` for the request's token (query, cookie or, with host_token, Host).

        Refusals are HTTP answers: 400 without a token, 404 unknown, 403
        refused, 502 not a target, 500 the plugin failed.
        """
        from websockify.plugins.tokens import TokenResolver
        resolver = TokenResolver(target_plugin, type(target_plugin).__name__, None,
                                 bool(self.host_token))
        return resolver.resolve(self._token_environ())

    def _token_environ(self) -> dict:
        path = self.path or "/"
        return {"RAW_URI": path, "QUERY_STRING": path.partition("?")[2].partition("#")[0],
                "HTTP_HOST": self.headers.get("Host") or "",
                "HTTP_COOKIE": self.headers.get("Cookie") or ""}

    def auth_connection(self) -> None:
        """With an auth plugin: its verdict (AuthenticationError refuses)."""
        plugin = self.server.auth_plugin
        if not plugin:
            return
        plugin.authenticate(headers=self.headers, target_host=self.server.target_host,
                            target_port=self.server.target_port)

    # -- after the 101 ---------------------------------------------------------

    def new_websocket_client(self) -> None:
        """Connect the target (``self.server``'s) and relay until either side ends."""
        target = self._engine_target
        if target is None:
            server = self.server
            if server.unix_target:
                where = "unix socket %s" % server.unix_target
            else:
                where = "%s:%s" % (server.target_host, server.target_port)
            self.log_message("connecting to %s%s", where,
                             " (using SSL)" if server.ssl_target else "")
            try:
                # Looked up now: callers and tests patch WebSockifyServer.socket.
                target = websockifyserver.WebSockifyServer.socket(
                    server.target_host, server.target_port, connect=True,
                    use_ssl=bool(server.ssl_target), unix_socket=server.unix_target)
            except Exception as exc:
                self.log_message("failed to connect to %s: %s", where, exc)
                raise self.CClose(1011, "Failed to connect to downstream server") from None
        self.print_traffic(self.traffic_legend)
        try:
            self.do_proxy(target)
        finally:
            _close_target(target)

    def do_proxy(self, target) -> None:
        """Relay between the client and ``target`` (anything with recv, send, fileno).

        Each side is read only while the other has nothing queued, so one
        chunk per direction is held at most.  Ends with ``CClose``: the
        client's code when it closed, 1000 when the target did.
        """
        client = self.request
        to_target: collections.deque = collections.deque()
        client_blocked = False
        interval = float(getattr(self.server, "heartbeat", 0) or 0)
        next_ping = time.monotonic() + interval if interval > 0 else None
        while True:
            now = time.monotonic()
            if next_ping is not None and now >= next_ping:
                next_ping = now + interval
                try:
                    self.send_ping()
                except WebSocketWantWriteError:
                    pass            # queued: it leaves with the next send
            readers: List[Any] = []
            ready: List[Any] = []
            if not to_target:
                (ready if _buffered(client) else readers).append(client)
            if not client_blocked:
                (ready if _buffered(target) else readers).append(target)
            writers = ([target] if to_target else []) + ([client] if client_blocked else [])
            timeout = 0.0 if ready else 1.0
            if next_ping is not None and not ready:
                timeout = max(0.0, min(timeout, next_ping - now))
            readable, writable, _ = select.select(readers, writers, [], timeout)
            readable = list(readable) + ready
            if client_blocked and client in writable:
                client_blocked = self.send_frames()
            if to_target and target in writable:
                self._send_to_target(target, to_target)
            if client in readable:
                bufs, closed = self.recv_frames()
                to_target.extend(buf for buf in bufs if buf)
                if closed:
                    while to_target:
                        self._send_to_target(target, to_target)
                    if self.verbose:
                        self.log_message("%s:%s: client closed the connection",
                                         self.server.target_host, self.server.target_port)
                    raise self.CClose(closed["code"], closed["reason"])
            if target in readable:
                data = _recv_ready(target, self.buffer_size)
                if data is None:
                    continue
                if not data:
                    while self.send_frames():
                        select.select([], [client], [], 1.0)
                    if self.verbose:
                        self.log_message("%s:%s: target closed the connection",
                                         self.server.target_host, self.server.target_port)
                    raise self.CClose(1000, "Target closed")
                self.print_traffic("{")
                client_blocked = self.send_frames([data])

    def _send_to_target(self, target, queue: collections.deque) -> None:
        chunk = queue[0]
        sent = target.send(chunk)
        if sent < len(chunk):
            queue[0] = chunk[sent:]
            self.print_traffic(".>")
        else:
            queue.popleft()
            self.print_traffic(">")


# The hooks as defined here: a class (or a monkeypatch) that replaces one differs.
_DEFAULT_HOOKS = {name: getattr(ProxyRequestHandler, name) for name in HOOKS}


def overridden_hooks(handler_class: type) -> List[str]:
    """The hooks ``handler_class`` (or a monkeypatch of ProxyRequestHandler) redefines."""
    return [name for name in HOOKS if getattr(handler_class, name) is not _DEFAULT_HOOKS[name]]


class WebSocketProxy(WebSockifyServer):
    """0.13's proxy server: ``WebSocketProxy(**kwargs).start_server()``.

    Takes exactly 0.13's keyword arguments (and ``token_source`` /
    ``auth_source`` for plugins given by name); binds nothing until
    ``start_server()``, which runs the master and its forked workers in
    this process until SIGTERM/SIGINT (or ``terminate()``) and returns the
    exit status.
    """

    buffer_size = 65536

    def __init__(self, RequestHandlerClass=ProxyRequestHandler, *args, **kwargs):
        library.check_handler_class(RequestHandlerClass)
        values = library.bind_keywords(type(self).__name__, args, kwargs)
        library.configure(self, RequestHandlerClass, values)

    def start_server(self) -> int:
        """Serve until stopped; the exit status (0 after a normal stop)."""
        return library.serve(self)

    def __getstate__(self) -> dict:
        # multiprocessing's spawn and forkserver pickle the server for
        # Process(target=wsp.start_server); start_server() rebuilds the Config
        # from the attributes, so the unpicklable parts stay behind.
        state = dict(self.__dict__)
        state["_master"] = None
        if state.get("_from_keywords"):
            state["_config"] = None
        return state

    def terminate(self) -> None:
        """Stop a running ``start_server()`` gracefully (callable from any thread)."""
        library.terminate(self)


class LibProxyServer(ThreadingMixIn, HTTPServer):
    """0.13's threaded ``http.server`` proxy: binds in ``__init__``; ``serve_forever()``.

    A thread per connection runs the handler (hooks included) on blocking
    sockets.  Plugins given as objects or names are used (0.13 drops them);
    TLS, daemonizing, wrapping and the timeouts are the engine's: they are
    ignored here with a warning.
    """

    daemon_threads = True
    allow_reuse_address = True
    _IGNORED = ("listen_fd", "cert", "key", "key_password", "ssl_only", "verify_client",
                "cafile", "daemon", "timeout", "idle_timeout", "wrap_cmd", "unix_listen",
                "ssl_ciphers", "ssl_options")

    def __init__(self, RequestHandlerClass=ProxyRequestHandler, **kwargs):
        library.check_handler_class(RequestHandlerClass)
        values = library.bind_keywords(type(self).__name__, (), kwargs)
        for name in self._IGNORED:
            if values[name] and name in kwargs:
                log.warning("LibProxyServer: option %s ignored (use WebSocketProxy for it)",
                            name)
            values[name] = library.KEYWORDS[name]
        library.configure(self, RequestHandlerClass, values)
        self.token_plugin = self._plugin(self.token_plugin, self._config.token_source,
                                         "websockify.token_plugins", "token plugin")
        self.auth_plugin = self._plugin(self.auth_plugin, self._config.auth_source,
                                        "websockify.auth_plugins", "auth plugin")
        from websockify.record import Recorder
        self.recorder = Recorder(self._config.record) if self._config.record else None
        self.handler_id = 0
        host = self.listen_host or ""
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host.strip("[]"), self.listen_port), RequestHandlerClass)

    @staticmethod
    def _plugin(plugin: Any, source: Optional[str], module: str, what: str) -> Any:
        if not isinstance(plugin, str) or not plugin:
            return plugin or None
        from websockify.plugins.loader import instantiate
        return instantiate(plugin, source, module, what)

    def finish_request(self, request, client_address) -> None:
        import copy
        self.handler_id += 1
        # Each session writes its target on its own copy, as 0.13's processes did.
        view = copy.copy(self)
        self.RequestHandlerClass(request, client_address, view)

    EClose = WebSockifyServer.EClose
    Terminate = WebSockifyServer.Terminate

    def get_logger(self) -> logging.Logger:
        return WebSockifyServer.get_logger()

    msg = WebSockifyServer.msg
    vmsg = WebSockifyServer.vmsg
    warn = WebSockifyServer.warn


def websockify_init() -> None:
    """Run ``sys.argv`` as the websockify command line (with ProxyRequestHandler's hooks).

    Methods monkeypatched onto ProxyRequestHandler before the call are its
    hooks; a usage error or a failed start exits with the CLI's status.
    """
    status = library.run_command_line(ProxyRequestHandler)
    if status:
        raise SystemExit(status)
