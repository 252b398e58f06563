"""websockify 0.13's token plugin module, for plugins written against it.

``--token-plugin TokenFile`` means ``websockify.token_plugins.TokenFile``,
and third-party plugins do ``from websockify.token_plugins import
BasePlugin`` (or subclass ``TokenFile``): both keep working.  The plugins
are those of ``websockify.plugins.tokens.PLUGINS``; the implementations
live in ``websockify.plugins.tokens``.
"""

from websockify.plugins.tokens import (  # noqa: F401
    PLUGINS,
    BackendUnavailable,
    BadTarget,
    BasePlugin,
    SourceError,
    TokenNotFound,
    TokenRefused,
    parse_source_args,
)

# The plugins by name: the registry is the one list of them.
globals().update(PLUGINS)

__all__ = ["BasePlugin", *PLUGINS, "parse_source_args", "SourceError", "TokenNotFound",
           "TokenRefused", "BackendUnavailable", "BadTarget"]
# The module holds 0.13's names only (a bare --token-plugin is looked up here).
del PLUGINS
