"""What the master loads for a configuration: plugins, TLS contexts, the tunnel configuration.

Built by the master before the workers fork (so a bad plugin or certificate
stops the start, exit 5) and again on SIGHUP for the new workers; the
workers only read it.  The configuration itself (websockify.config) never
changes.  A library caller (websockify.library) may hand in plugin objects
it built itself and a request handler class with hooks: the workers are
forked, so they inherit those objects as they are.
"""

from typing import Any, Dict, Optional, Tuple


class HandlerHooks:
    """A library caller's request handler class whose hooks the workers must call."""

    __slots__ = ("handler_class", "server", "overridden")

    def __init__(self, handler_class: type, server: Any, overridden: Tuple[str, ...]):
        #: A websockify.websocketproxy.ProxyRequestHandler subclass.
        self.handler_class = handler_class
        #: The caller's WebSocketProxy: each session gets a copy as ``self.server``.
        self.server = server
        #: The names of the hooks it overrides (see websocketproxy.HOOKS).
        self.overridden = overridden


class Runtime:
    """The loaded token and auth plugins, TLS contexts and tunnel configuration of one generation."""

    __slots__ = ("tokens", "auth", "tls", "target_tls", "token_object", "auth_object", "hooks",
                 "tunnels", "tunnel_listeners", "tunnel_host")

    def __init__(self, tokens: Any = None, auth: Any = None, tls: Any = None,
                 target_tls: Any = None, token_object: Any = None, auth_object: Any = None,
                 hooks: Optional[HandlerHooks] = None, tunnels: Any = None,
                 tunnel_listeners: Optional[Dict[Tuple[str, int], Any]] = None):
        #: plugins.tokens.TokenResolver, or None without a token plugin.
        self.tokens = tokens
        #: plugins.auth.Authenticator, or None without an auth plugin.
        self.auth = auth
        #: The listener's ssl.SSLContext (None: plain only).
        self.tls = tls
        #: net.tls.TargetContexts for --ssl-target, or None.
        self.target_tls = target_tls
        #: Plugin objects a library caller built (used instead of loading by name).
        self.token_object = token_object
        self.auth_object = auth_object
        #: A handler class with hooks (server.hooks runs its sessions), or None.
        self.hooks = hooks
        #: tunnel.config.TunnelConfig from --tunnel-config, or None.
        self.tunnels = tunnels
        #: The agents' TCP faces, bound by the master: listening socket by (host, port).
        self.tunnel_listeners = tunnel_listeners if tunnel_listeners is not None else {}
        #: tunnel/host.py's TunnelHost (the agents' registry, the hand-off
        #: directory), made by the master; it lives through reloads.
        self.tunnel_host = None

    def snapshot(self) -> Tuple[Any, ...]:
        return (self.tokens, self.auth, self.tls, self.target_tls, self.tunnels,
                self.tunnel_listeners)

    def restore(self, snapshot: Optional[Tuple[Any, ...]]) -> None:
        if snapshot is not None:
            (self.tokens, self.auth, self.tls, self.target_tls, self.tunnels,
             self.tunnel_listeners) = snapshot
