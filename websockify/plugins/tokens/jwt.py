"""JWTTokenApi: the target in the claims of a signed (or encrypted) JWT."""

import base64
import binascii
import json
import os
import time

from websockify.addr import parse_host, parse_port
from websockify.plugins.tokens.base import BasePlugin, SourceError, TokenRefused, need_source


_JWS_ALGS = ["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384",
             "PS512", "ES256", "ES384", "ES512", "EdDSA"]
_JWE_ALGS = ["RSA-OAEP", "RSA-OAEP-256", "A128KW", "A192KW", "A256KW", "dir",
             "ECDH-ES", "ECDH-ES+A128KW", "ECDH-ES+A192KW", "ECDH-ES+A256KW",
             "A128GCMKW", "A192GCMKW", "A256GCMKW",
             "A128CBC-HS256", "A192CBC-HS384", "A256CBC-HS512", "A128GCM", "A192GCM", "A256GCM"]


def _jose_header(token: str) -> dict:
    head = token.split(".", 1)[0]
    try:
        return json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, binascii.Error):
        raise TokenRefused("token is not a JWT") from None


class JWTTokenApi(BasePlugin):
    """Signed (JWS) or encrypted (JWE, holding a signed JWT) tokens with ``host``, ``port``.

    The source is a key file: a PEM key (RSA or EC, private or public), or
    else its raw bytes as a shared secret, the format of websockify 0.13.
    ``nbf`` and ``exp`` are checked; ``alg: none`` is refused.  Needs
    jwcrypto (``pip install websockify[jwt]``).
    """

    def __init__(self, src):
        super().__init__(src)
        path = os.path.abspath(need_source(self, src))
        try:
            from jwcrypto import jwk
        except ImportError:
            raise SourceError("JWTTokenApi needs the jwcrypto package "
                              "(pip install 'websockify[jwt]')") from None
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise SourceError("cannot read key file: %s" % (exc.strerror or exc), path) from None
        if not data:
            raise SourceError("key file is empty", path)
        try:
            self._key = jwk.JWK.from_pem(data)
        except Exception:
            if data.lstrip().startswith(b"-----BEGIN"):
                raise SourceError("cannot parse the PEM key", path) from None
            self._key = jwk.JWK(kty="oct", k=base64.urlsafe_b64encode(data).rstrip(b"=").decode())

    def _open(self, token: str, algs):
        from jwcrypto import jwt
        try:
            return jwt.JWT(key=self._key, jwt=token, algs=algs, check_claims=False)
        except Exception as exc:
            raise TokenRefused("JWT rejected: %s" % (str(exc) or type(exc).__name__)) from None

    def lookup(self, token):
        header = _jose_header(token)
        if str(header.get("alg", "none")).lower() == "none":
            raise TokenRefused("JWT with alg none")
        if "enc" in header:
            outer = self._open(token, _JWE_ALGS)
            token = outer.claims
            inner = _jose_header(token)
            if "enc" in inner or str(inner.get("alg", "none")).lower() == "none":
                raise TokenRefused("encrypted JWT must hold a signed JWT")
        parsed = self._open(token, _JWS_ALGS)
        try:
            claims = json.loads(parsed.claims)
        except ValueError:
            raise TokenRefused("JWT claims are not JSON") from None
        if not isinstance(claims, dict):
            raise TokenRefused("JWT claims are not an object")
        now = time.time()
        if "nbf" in claims and not now >= _number(claims["nbf"]):
            raise TokenRefused("JWT not valid yet (nbf)")
        if "exp" in claims and not now < _number(claims["exp"]):
            raise TokenRefused("JWT expired")
        if "host" not in claims or "port" not in claims:
            raise TokenRefused("JWT lacks the host and port claims")
        try:
            return parse_host(claims["host"]), parse_port(claims["port"])
        except ValueError as exc:
            raise TokenRefused("JWT target: %s" % exc) from None


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TokenRefused("JWT time claim %r is not a number" % (value,))
    return float(value)
