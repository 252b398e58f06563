"""websockify 0.13's token plugin module, for plugins written against it.

``--token-plugin TokenFile`` means ``websockify.token_plugins.TokenFile``,
and third-party plugins do ``from websockify.token_plugins import
BasePlugin`` (or subclass ``TokenFile``): both keep working.  The
implementations live in ``websockify.plugins.tokens``.
"""

from websockify.plugins.tokens import (  # noqa: F401
    BackendUnavailable,
    BadTarget,
    BasePlugin,
    BaseTokenAPI,
    JSONTokenApi,
    JWTTokenApi,
    ReadOnlyTokenFile,
    SignedTarget,
    SourceError,
    TokenFile,
    TokenFileName,
    TokenNotFound,
    TokenRedis,
    TokenRefused,
    UnixDomainSocketDirectory,
    parse_source_args,
)

__all__ = [
    "BasePlugin", "ReadOnlyTokenFile", "TokenFile", "TokenFileName", "BaseTokenAPI",
    "JSONTokenApi", "JWTTokenApi", "TokenRedis", "UnixDomainSocketDirectory",
    "SignedTarget", "parse_source_args", "SourceError", "TokenNotFound", "TokenRefused",
    "BackendUnavailable", "BadTarget",
]
