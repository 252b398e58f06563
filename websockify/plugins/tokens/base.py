"""The plugin contract: websockify 0.13's BasePlugin, our plugins' two answers, the errors.

0.13's contract is ``cls(src)`` and ``lookup(token)``, which returns a
target (values as the store holds them) or None.  Our plugins
(``ResolvingPlugin``) keep that ``lookup()`` for subclasses and embedders,
and give the server a richer ``resolve(token)``, whose refusals are
``HTTPError``s answered before any upgrade: an unknown token is 404, a
refused token (expired, altered, outside the allow-list, a path escape)
403, a backend that is down 503, a store entry that is not a target 502.
A source that cannot be used is a ``SourceError`` (a ConfigError), raised
by ``check()``, which the master calls at start.
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
    """The token store (Redis, an HTTP API) cannot be asked right now.

    ``error`` is the store client's own exception, which ``lookup()`` lets
    through as 0.13 does; without one, ``lookup()`` answers None.
    """
    status_code = 503

    def __init__(self, text: str, error: Optional[BaseException] = None):
        super().__init__(text)
        self.error = error


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

    def lookup(self, token: str):
        return None


class ResolvingPlugin(BasePlugin):
    """A plugin with 0.13's ``lookup()`` and our ``resolve()`` and ``check()``.

    ``resolve(token)`` returns the target as the store holds it, None for an
    unknown token, or raises a TokenError.  ``lookup(token)`` is 0.13's
    answer built on it: the target or None, never a refusal; only a store
    client's own error (Redis or the HTTP API unreachable) goes through.
    """

    def resolve(self, token: str):
        return None

    def check(self) -> None:
        """Raise SourceError if the source cannot be used (the master calls this at start)."""

    def lookup(self, token: str):
        try:
            return self.resolve(token)
        except BackendUnavailable as exc:
            if exc.error is not None:
                raise exc.error from None
            return None
        except TokenError:
            return None


def answers_by_resolve(plugin: object) -> bool:
    """True if ``resolve()`` is the plugin's answer: ours, its ``lookup()`` not overridden.

    A subclass that overrides ``lookup()`` (``super().lookup(t)`` and its own
    twist) is asked through that ``lookup()``, as 0.13 would.
    """
    return (isinstance(plugin, ResolvingPlugin)
            and type(plugin).lookup is ResolvingPlugin.lookup)


def need_source(plugin: object, src: Optional[str]) -> str:
    """The source string, or a SourceError naming the plugin that needs one."""
    if src is None or not str(src).strip():
        raise SourceError("%s needs --token-source" % type(plugin).__name__)
    return str(src)
