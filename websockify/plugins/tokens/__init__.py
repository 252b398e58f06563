"""Token plugins: a token from the request -> the session's target.

The contract is websockify 0.13's: a plugin class is built once with the
``--token-source`` string (``cls(src)``) and its ``lookup(token)`` returns
``(host, port)`` (a tuple or a list, the values as the store holds them),
``('unix_socket', path)``, or None for an unknown token, or raises.  Our
plugins also have ``resolve(token)``, whose refusals say why (see
``base``), and ``check()``; the server asks ``resolve()`` unless a
subclass overrides ``lookup()``.  The answer becomes a target (a port
checked, 1-65535) in ``targets``, where a bad one is 502.

The plugins are built and checked in the master before any worker is
forked, so a source that does not exist or cannot be parsed stops the
server at start (``SourceError``: one line naming the file and line).
Workers inherit the built plugin; anything that must not be shared between
processes (a Redis connection pool) is created lazily per process.

Refusals are ``HTTPError``s; ``TokenResolver`` maps anything else a plugin
raises to 500, and a lookup that times out to 503.  The plugins live in
``files``, ``http``, ``jwt``, ``redis`` and ``signed``; this package
re-exports them.
"""

import re
import socket
import urllib.parse
from typing import Dict, Optional, Tuple

from websockify.addr import UNIX, parse_host, parse_port  # noqa: F401
from websockify.errors import ConfigError, HTTPError
from websockify.metrics import counters as metrics
from websockify.plugins.tokens.base import (  # noqa: F401
    BackendUnavailable, BadTarget, BasePlugin, MissingToken, PluginFailed, ResolvingPlugin,
    SourceError, TokenError, TokenNotFound, TokenRefused, answers_by_resolve, need_source)
from websockify.plugins.tokens.files import (  # noqa: F401
    ReadOnlyTokenFile, TokenFile, TokenFileName, UnixDomainSocketDirectory)
from websockify.plugins.tokens.http import APIResponse, BaseTokenAPI, JSONTokenApi  # noqa: F401
from websockify.plugins.tokens.jwt import JWTTokenApi  # noqa: F401
from websockify.plugins.tokens.redis import TokenRedis, parse_source_args  # noqa: F401
from websockify.plugins.tokens.signed import (  # noqa: F401
    SIGNED_PREFIX, SignedTarget, read_secret, sign_target)
from websockify.plugins.tokens.targets import (  # noqa: F401
    parse_target, split_target, target_from_result)

#: The plugins a bare ``--token-plugin NAME`` names, in the man page's order.
#: websockify.token_plugins exports them and the man page test checks them
#: from here, so a new plugin is added to this list only.
PLUGINS: Dict[str, type] = {cls.__name__: cls for cls in (
    TokenFile, ReadOnlyTokenFile, TokenFileName, BaseTokenAPI, JSONTokenApi, JWTTokenApi,
    TokenRedis, UnixDomainSocketDirectory, SignedTarget)}

_TOKEN_IN_URI = re.compile(r"[?&;]token=([^&;#\s]*)")


def token_from_request(environ: dict, host_token: bool) -> Optional[str]:
    """The token of a request: Host header with --host-token, else the ``token``
    query parameter (anywhere in the path), else a ``token`` cookie."""
    if host_token:
        host = environ.get("HTTP_HOST", "").strip()
        if not host:
            return None
        if host.startswith("["):
            end = host.find("]")
            return host[1:end] if end > 0 else host
        if host.count(":") == 1:
            host = host.partition(":")[0]
        return host or None
    query = environ.get("QUERY_STRING", "")
    values = urllib.parse.parse_qs(query, keep_blank_values=True).get("token") if query else None
    if values:
        return values[0].rstrip("\n")
    match = _TOKEN_IN_URI.search(environ.get("RAW_URI", "") or "")
    if match:
        return urllib.parse.unquote(match.group(1))
    for item in environ.get("HTTP_COOKIE", "").split(";"):
        name, eq, value = item.strip().partition("=")
        if eq and name.strip() == "token":
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return urllib.parse.unquote(value)
    return None


class TokenResolver:
    """The loaded plugin and how the sessions of a worker ask it."""

    def __init__(self, plugin, name: str, source: Optional[str], host_token: bool = False):
        self.plugin = plugin
        self.name = name
        self.source = source
        self.host_token = host_token

    def describe(self) -> str:
        return "token plugin %s (%s)" % (self.name, self.source)

    def resolve(self, environ: dict) -> Tuple[str, object]:
        """``(host, port)`` or ``('unix_socket', path)`` for the request, or an HTTPError."""
        try:
            target = self._resolve(environ)
        except HTTPError as exc:
            metrics.token_lookup(lookup_result(exc))
            raise
        metrics.token_lookup("found")
        return target

    def _resolve(self, environ: dict) -> Tuple[str, object]:
        token = token_from_request(environ, self.host_token)
        if token is None:
            raise MissingToken("no token (Host header)" if self.host_token else
                               "no token (token query parameter or cookie)")
        if not token or len(token) > 4096:
            raise TokenNotFound("empty or oversized token")
        ask = self.plugin.resolve if answers_by_resolve(self.plugin) else self.plugin.lookup
        try:
            result = ask(token)
        except HTTPError:
            raise
        except socket.timeout:
            raise BackendUnavailable("token lookup timed out") from None
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            # Not even sys.exit() in a plugin may end the worker: it is this
            # session's 500 (gevent would pass SystemExit to the main greenlet).
            raise PluginFailed("token plugin %s failed: %s: %s" % (
                self.name, type(exc).__name__, str(exc)[:200])) from None
        if result is None:
            raise TokenNotFound("unknown token")
        try:
            return target_from_result(result)
        except ValueError as exc:
            raise BadTarget("token plugin %s gave an unusable target: %s" % (self.name, exc)) from None


def lookup_result(refusal: HTTPError) -> str:
    """The --metrics result a refused lookup is counted under."""
    for kind, result in ((TokenNotFound, "not_found"), (MissingToken, "missing"),
                         (BadTarget, "bad_target"), (BackendUnavailable, "unavailable"),
                         (PluginFailed, "failed"), (TokenRefused, "refused")):
        if isinstance(refusal, kind):
            return result
    # A plugin's own HTTPError: by its status.
    return {404: "not_found", 503: "unavailable", 500: "failed"}.get(refusal.status, "refused")


#: Where bare names are looked up: the 0.13 module, whose plugins are PLUGINS.
DEFAULT_MODULE = "websockify.token_plugins"


def load_resolver(config) -> Optional[TokenResolver]:
    """Build the configured token plugin (in the master); None without one."""
    from websockify.plugins.loader import instantiate
    name = config.token_plugin
    source = config.token_source
    if config.target_config:
        name, source = "TokenFile", config.target_config
    if not name:
        return None
    plugin = instantiate(name, source, DEFAULT_MODULE, "token plugin")
    if not callable(getattr(plugin, "lookup", None)):
        raise ConfigError("token plugin %s has no lookup(token) method" % name)
    if isinstance(plugin, ResolvingPlugin):
        try:
            plugin.check()
        except ConfigError:
            raise
        except Exception as exc:  # a subclass's own check()
            raise ConfigError("token plugin %s: check failed: %s: %s"
                              % (name, type(exc).__name__, exc)) from None
    return TokenResolver(plugin, name, source, bool(config.host_token))
