"""--auth-plugin: run the plugin before a session (or a static file) is served.

The plugin is built in the master before workers fork, so a plugin that
cannot be imported or refuses its source stops the start (exit 5).  Its
verdict becomes an HTTP answer: an ``AuthenticationError`` gives its own
status and headers; any other exception (SystemExit and KeyboardInterrupt
included) is a 500 with the error in the log, never a dead worker.
"""

import logging
from typing import Any, Optional

from websockify.auth_plugins import AuthenticationError
from websockify.errors import HTTPError
from websockify.plugins.loader import instantiate

log = logging.getLogger("websockify")

DEFAULT_MODULE = "websockify.auth_plugins"


class AuthRefused(HTTPError):
    """The plugin said no: its status and headers, a short body, the reason logged."""

    def __init__(self, status: int, log_text: str, text: Optional[str] = None, headers=()):
        super().__init__(status, text, headers)
        self.log_text = log_text


class Authenticator:
    """The loaded plugin and the way its answers become HTTP refusals."""

    def __init__(self, plugin, name: str, timeout: float):
        self.plugin = plugin
        self.name = name
        self.timeout = timeout

    def check(self, headers, target_host, target_port) -> None:
        """Return if the plugin allows the request; raise AuthRefused otherwise."""
        import gevent       # only workers check (websockify.auth_plugins stays light)
        timer = gevent.Timeout(self.timeout)
        timer.start()
        try:
            self.plugin.authenticate(headers=headers, target_host=target_host,
                                     target_port=target_port)
        except AuthenticationError as exc:
            raise refusal_of(exc) from None
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            raise AuthRefused(503, "auth plugin %s took longer than %g s"
                              % (self.name, self.timeout)) from None
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            raise AuthRefused(500, "auth plugin %s failed: %s: %s"
                              % (self.name, type(exc).__name__, str(exc)[:200]),
                              "authentication plugin failed") from None
        finally:
            timer.close()


def refusal_of(exc: AuthenticationError) -> AuthRefused:
    """A plugin's AuthenticationError as the HTTP answer it asks for (403 by default)."""
    status = exc.code if isinstance(exc.code, int) and 400 <= exc.code <= 599 else 403
    headers_out = [(str(k), str(v)) for k, v in (exc.headers or {}).items()]
    # websockify's errors read "<code> <log message>": keep the message.
    detail = str(exc)
    if detail.startswith("%s " % exc.code):
        detail = detail[len(str(exc.code)) + 1:]
    return AuthRefused(status, "authentication failed: %s" % detail, exc.msg, headers_out)


def load_authenticator(config, plugin: Any = None) -> Optional[Authenticator]:
    """The --auth-plugin instance, or None; PluginLoadError (exit 5) if unusable.

    ``plugin`` is an object a library caller built: it is used as it is.
    """
    if plugin is not None:
        return Authenticator(plugin, config.auth_plugin or type(plugin).__name__,
                             config.connect_timeout)
    if not config.auth_plugin:
        return None
    plugin = instantiate(config.auth_plugin, config.auth_source, DEFAULT_MODULE,
                         "auth plugin")
    return Authenticator(plugin, config.auth_plugin, config.connect_timeout)
