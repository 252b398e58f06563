"""Authentication plugins with websockify 0.13's names and contract.

A plugin is a class built once as ``cls(source)`` (``--auth-source``) whose
``authenticate(headers, target_host, target_port)`` returns to allow the
session or raises ``AuthenticationError`` carrying the HTTP status and
headers of the refusal.  Plugins written for websockify import
``BasePlugin`` and ``AuthenticationError`` from this module.

``headers`` reads like the request's header message: ``headers.get(name)``
is case-insensitive; ``SSL_CLIENT_S_DN_CN`` holds the common name of a
verified client certificate (headers a client sends under ``SSL_*`` names
are dropped before plugins see them).
"""

import base64
import binascii
import types
from typing import List, Mapping, Optional


class BasePlugin:
    """A plugin that allows everything; subclasses override ``authenticate``."""

    def __init__(self, src: Optional[str] = None):
        self.source = src

    def authenticate(self, headers, target_host, target_port) -> None:
        pass


class AuthenticationError(Exception):
    """Refuse the connection with ``response_code`` (403 by default)."""

    # 0.13's default is {}: an empty mapping that cannot be changed is the same to callers.
    def __init__(self, log_msg: Optional[str] = None, response_code: int = 403,
                 response_headers: Mapping[str, str] = types.MappingProxyType({}),
                 response_msg: Optional[str] = None):
        self.code = response_code
        self.headers = dict(response_headers or {})
        self.msg = response_msg
        if log_msg is None:
            log_msg = response_msg
        super().__init__("%s %s" % (self.code, log_msg))


class InvalidOriginError(AuthenticationError):
    def __init__(self, expected, actual):
        self.expected_origin = expected
        self.actual_origin = actual
        super().__init__(response_msg="Invalid Origin",
                         log_msg="Invalid Origin Header: expected one of %s, got %r"
                         % (expected, actual))


def _words(src: Optional[str]) -> List[str]:
    return src.split() if src else []


class BasicHTTPAuth:
    """HTTP Basic authentication against one ``user:password`` (the source)."""

    realm = "Websockify"

    def __init__(self, src: Optional[str] = None):
        self.src = src

    def authenticate(self, headers, target_host, target_port) -> None:
        value = headers.get("Authorization")
        if not value:
            self.demand_auth()
        scheme, _, encoded = value.strip().partition(" ")
        if scheme.lower() != "basic":
            self.auth_error("not Basic authorization")
        try:
            text = base64.b64decode(encoded.strip(), validate=True).decode("ISO-8859-1")
        except (binascii.Error, ValueError):
            self.auth_error("Basic credentials are not base64")
        username, colon, password = text.partition(":")
        if not colon:
            self.auth_error("Basic credentials without a colon")
        if not self.validate_creds(username, password):
            self.demand_auth("wrong user name or password")

    def validate_creds(self, username: str, password: str) -> bool:
        import hmac
        expected = (self.src or "").encode("utf-8", "surrogateescape")
        given = ("%s:%s" % (username, password)).encode("utf-8", "surrogateescape")
        return bool(self.src) and hmac.compare_digest(expected, given)

    def auth_error(self, why: str = "malformed credentials") -> None:
        raise AuthenticationError(log_msg=why, response_code=403)

    def demand_auth(self, why: str = "credentials required") -> None:
        raise AuthenticationError(
            log_msg=why, response_code=401,
            response_headers={"WWW-Authenticate": 'Basic realm="%s"' % self.realm})


class ExpectOrigin:
    """Allow only the Origin values listed (space-separated) in the source."""

    def __init__(self, src: Optional[str] = None):
        self.source = _words(src)

    def authenticate(self, headers, target_host, target_port) -> None:
        origin = headers.get("Origin")
        if origin is None or origin not in self.source:
            raise InvalidOriginError(expected=self.source, actual=origin)


class ClientCertCNAuth:
    """Allow only client certificates whose common name is listed in the source."""

    def __init__(self, src: Optional[str] = None):
        self.source = _words(src)

    def authenticate(self, headers, target_host, target_port) -> None:
        common_name = headers.get("SSL_CLIENT_S_DN_CN")
        if common_name not in self.source:
            raise AuthenticationError(
                log_msg="client certificate common name %r not allowed" % common_name,
                response_code=403)
