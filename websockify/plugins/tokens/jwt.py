"""JWTTokenApi: the target in the claims of a signed (or encrypted) JWT."""

import base64
import binascii
import json
import logging
import os
import time
from typing import Optional

from websockify.plugins.tokens.base import (BackendUnavailable, ResolvingPlugin, SourceError,
                                            TokenRefused, need_source)
from websockify.plugins.tokens.watch import FileWatch, stamp_of

log = logging.getLogger("websockify")


_JWS_ALGS = ["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384",
             "PS512", "ES256", "ES384", "ES512", "EdDSA"]
_JWE_ALGS = ["RSA-OAEP", "RSA-OAEP-256", "A128KW", "A192KW", "A256KW", "dir",
             "ECDH-ES", "ECDH-ES+A128KW", "ECDH-ES+A192KW", "ECDH-ES+A256KW",
             "A128GCMKW", "A192GCMKW", "A256GCMKW",
             "A128CBC-HS256", "A192CBC-HS384", "A256CBC-HS512", "A128GCM", "A192GCM", "A256GCM"]


def _jose_header(token: str) -> dict:
    head = token.split(".", 1)[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, binascii.Error):
        header = None
    if not isinstance(header, dict):
        raise TokenRefused("token is not a JWT")
    return header


def _load_key(data: bytes, path: str):
    """The JWK in a key file's bytes: a PEM key, else the base64url text of a secret."""
    try:
        from jwcrypto import jwk
    except ImportError:
        raise SourceError("JWTTokenApi needs the jwcrypto package "
                          "(pip install 'websockify[jwt]')") from None
    if not data.strip():
        raise SourceError("key file is empty", path)
    try:
        return jwk.JWK.from_pem(data)
    except Exception:  # jwcrypto's and cryptography's errors: not PEM, try a secret (0.13)
        pass
    if b"-----BEGIN" in data:
        raise SourceError("cannot parse the PEM key", path)
    try:
        # 0.13 imports the text as the k of an oct JWK: the HMAC key is the
        # decoded value.  Whitespace around it (a final newline) is dropped:
        # jwcrypto refuses it, and where it does not the key is the same.
        return jwk.JWK(kty="oct", k=data.decode("utf-8").strip())
    except Exception:  # jwcrypto's InvalidJWKValue, UnicodeDecodeError
        raise SourceError("neither a PEM key nor the base64url text of a shared secret",
                          path) from None


class JWTTokenApi(ResolvingPlugin):
    """Signed (JWS) or encrypted (JWE, holding a signed JWT) tokens with ``host``, ``port``.

    The source is a key file, in websockify 0.13's format: a PEM key (RSA
    or EC, private or public), or else the base64url text of a shared
    secret (the ``k`` of a JWK ``oct`` key: the HMAC key is its decoded
    bytes).  The file is read again when it changes (0.13 read it at every
    lookup); if it breaks, the last good key stays.  ``nbf`` and ``exp`` are
    checked; ``alg: none`` is refused.  ``lookup()`` gives the ``host`` and
    ``port`` claims as they are, or None.  Needs jwcrypto (``pip install
    websockify[jwt]``).
    """

    def __init__(self, src):
        super().__init__(src)
        self._key = None
        self._key_error: Optional[SourceError] = None
        self._failed: Optional[str] = None
        self._watch = FileWatch()

    def check(self) -> None:
        if self._current_key() is None:
            raise self._key_error

    def _current_key(self):
        """The key, read again if its file changed; None if no good key was ever read."""
        try:
            path = os.path.abspath(need_source(self, self.source))
            try:
                stamp = stamp_of([path])
                if self._watch.unchanged(stamp):
                    return self._key
                with open(path, "rb") as handle:
                    data = handle.read()
            except OSError as exc:
                raise SourceError("cannot read key file: %s" % (exc.strerror or exc),
                                  path) from None
            if self._watch.same_content(stamp, [(path, data)]):
                return self._key
            key = _load_key(data, path)
        except SourceError as exc:
            if self._key is None:
                self._key_error = exc
            elif self._failed != str(exc):
                self._failed = str(exc)
                log.error("%s; keeping the last good key", exc)
            return self._key
        if self._key is not None:
            log.info("JWT key file %s read again", path)
        self._key, self._failed = key, None
        return key

    def _open(self, token: str, algs):
        from jwcrypto import jwt
        try:
            return jwt.JWT(key=self._key, jwt=token, algs=algs, check_claims=False)
        except Exception as exc:
            raise TokenRefused("JWT rejected: %s" % (str(exc) or type(exc).__name__)) from None

    def resolve(self, token: str):
        if self._current_key() is None:
            raise BackendUnavailable("JWT key unusable: %s" % self._key_error)
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
        # 0.13's comparisons: valid from nbf, and still at exp itself.
        now = time.time()
        if "nbf" in claims and now < _number(claims["nbf"]):
            raise TokenRefused("JWT not valid yet (nbf)")
        if "exp" in claims and now > _number(claims["exp"]):
            raise TokenRefused("JWT expired")
        if "host" not in claims or "port" not in claims:
            raise TokenRefused("JWT lacks the host and port claims")
        return claims["host"], claims["port"]


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TokenRefused("JWT time claim %r is not a number" % (value,))
    return float(value)
