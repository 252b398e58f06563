"""What the master loads for a configuration: plugins and TLS contexts.

Built by the master before the workers fork (so a bad plugin or certificate
stops the start, exit 5) and again on SIGHUP for the new workers; the
workers only read it.  The configuration itself (websockify.config) never
changes.
"""

from typing import Any, Optional, Tuple


class Runtime:
    """The loaded token and auth plugins and the TLS contexts of one generation."""

    __slots__ = ("tokens", "auth", "tls", "target_tls")

    def __init__(self, tokens: Any = None, auth: Any = None, tls: Any = None,
                 target_tls: Any = None):
        #: plugins.tokens.TokenResolver, or None without a token plugin.
        self.tokens = tokens
        #: plugins.auth.Authenticator, or None without an auth plugin.
        self.auth = auth
        #: The listener's ssl.SSLContext (None: plain only).
        self.tls = tls
        #: net.tls.TargetContexts for --ssl-target, or None.
        self.target_tls = target_tls

    def snapshot(self) -> Tuple[Any, Any, Any, Any]:
        return self.tokens, self.auth, self.tls, self.target_tls

    def restore(self, snapshot: Optional[Tuple[Any, Any, Any, Any]]) -> None:
        if snapshot is not None:
            self.tokens, self.auth, self.tls, self.target_tls = snapshot
