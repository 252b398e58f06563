"""The plugin contract: websockify 0.13's BasePlugin and the errors a plugin raises.

Refusals are ``HTTPError``s, answered before any upgrade: an unknown token
is 404, a refused token (expired, altered, outside the allow-list, a path
escape) 403, a backend that is down 503, a store entry that is not a target
502.  A source that cannot be used is a ``SourceError`` (a ConfigError).
"""

from typing import Optional

from websockify.errors import ConfigError, HTTPError


class SourceError(ConfigError):
    """A token source that cannot be used: ``file:line: message``."""

    def __init__(self, message: str, path: Optional[str] = None, line: Optional[int] = None):
        where = path or ""
        if path and line:
            where = "%s:%d" % (path, line)
        super().__init__("%s: %s" % (where, message) if where else message)
        self.path = path
        self.line = line
        self.message = message


class TokenError(HTTPError):
    """A refused token, answered with ``status`` before any upgrade."""

    status_code = 403

    def __init__(self, text: str):
        super().__init__(self.status_code, text)


class TokenNotFound(TokenError):
    status_code = 404


class TokenRefused(TokenError):
    status_code = 403


class MissingToken(TokenError):
    status_code = 400


class BadTarget(TokenError):
    """The token store holds something that is not a target."""
    status_code = 502


class BackendUnavailable(TokenError):
    """The token store (Redis, an HTTP API) cannot be asked right now."""
    status_code = 503


class PluginFailed(TokenError):
    """The plugin itself broke (any exception, SystemExit included): 500.

    The client hears only that; the log line names the plugin and the error.
    """
    status_code = 500

    def __init__(self, log_text: str):
        super().__init__("token plugin failed")
        self.log_text = log_text


class BasePlugin:
    """websockify 0.13's base class: ``__init__(src)``, ``lookup(token)``."""

    def __init__(self, src):
        self.source = src

    def lookup(self, token):
        return None


def need_source(plugin: object, src: Optional[str]) -> str:
    """The source string, or a SourceError naming the plugin that needs one."""
    if src is None or not str(src).strip():
        raise SourceError("%s needs --token-source" % type(plugin).__name__)
    return str(src)
