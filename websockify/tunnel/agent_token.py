"""Agent tokens: HS256 JSON Web Tokens signed and verified with hmac, hashlib, base64 and json.

HS256 is an HMAC-SHA256 over ``base64url(header) "." base64url(claims)``:
a few lines of the standard library, so tunnels need no JWT package
(jwcrypto stays an optional extra, for the JWTTokenApi token plugin; the
tests check that tokens made by either verify with the other).

The rules are websocktunnel's, so its tokens work here:

* the header's ``alg`` must be ``HS256`` (never ``none``, never RSA);
* the signature must verify under one of the secrets (two: rotation);
* ``exp`` and ``nbf`` are required numbers, ``nbf <= now < exp`` give or
  take ``leeway`` seconds of clock skew (``iat`` is not checked, as there);
* ``exp - nbf`` is at most 31 days;
* ``tid`` equals the agent's ID.

Two differences, both stricter: with an ``audience`` configured the token
*must* carry it (``aud`` a string, or a list holding it), where
websocktunnel lets a token without ``aud`` through; without an audience
``aud`` is not looked at.

Nothing here reads a clock, a file or a socket: the caller passes ``now``
and the secrets.  Every refusal is an AgentTokenError: HTTP 401 with the
reason, which the agent logs.
"""

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
from typing import Any, Dict, Optional, Sequence

from websockify.errors import HTTPError

ALGORITHM = "HS256"
#: The longest validity a token may have (exp - nbf), as websocktunnel.
MAX_LIFETIME = 31 * 86400
#: Clock skew allowed on nbf and exp, in seconds.
DEFAULT_LEEWAY = 30.0

_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


class AgentTokenError(HTTPError):
    """A refused agent token: answered with 401 and the reason, before any upgrade."""

    def __init__(self, reason: str, status: int = 401):
        super().__init__(status, reason, headers=[
            ("WWW-Authenticate", 'Bearer realm="websockify-tunnel", error="invalid_token"')])


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str, part: str) -> bytes:
    # Unpadded base64url only: urlsafe_b64decode would skip stray characters.
    if not _BASE64URL.fullmatch(text) or len(text) % 4 == 1:
        raise AgentTokenError("malformed token: %s is not base64url" % part)
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):  # pragma: no cover - the pattern rules it out
        raise AgentTokenError("malformed token: %s is not base64url" % part) from None


def _json_object(data: bytes, part: str) -> Dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        # ValueError covers bad UTF-8, bad JSON and integers too long to read.
        raise AgentTokenError("malformed token: %s is not JSON" % part) from None
    if not isinstance(value, dict):
        raise AgentTokenError("malformed token: %s is not a JSON object" % part)
    return value


def _number(claims: Dict[str, Any], name: str, required: bool = True) -> Optional[float]:
    if name not in claims:
        if required:
            raise AgentTokenError("token has no %s claim" % name)
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AgentTokenError("token claim %s is not a number" % name)
    return float(value)


def _show(value: Any) -> str:
    """A claim or header value for a reason text: strings quoted and cut short, others by type."""
    if isinstance(value, str):
        return json.dumps(value if len(value) <= 64 else value[:64] + "...")
    if value is None:
        return "null"
    if isinstance(value, list) and all(isinstance(item, str) for item in value) and len(value) <= 8:
        return "[%s]" % ", ".join(_show(item) for item in value)
    return "a JSON %s" % {bool: "boolean", int: "number", float: "number", list: "array",
                          dict: "object"}.get(type(value), "value")


def _signature(secret: bytes, signing_input: bytes) -> bytes:
    return hmac.new(secret, signing_input, hashlib.sha256).digest()


def make_agent_token(agent_id: str, secret: bytes, lifetime: float, now: float,
                     audience: Optional[str] = None) -> str:
    """A token for ``agent_id``, valid from ``now`` for ``lifetime`` seconds (at most 31 days)."""
    if not secret:
        raise ValueError("the secret is empty")
    if not 0 < lifetime <= MAX_LIFETIME:
        raise ValueError("lifetime must be more than 0 and at most 31 days")
    start = int(now)
    claims: Dict[str, Any] = {"tid": agent_id, "iat": start, "nbf": start,
                              "exp": int(now + lifetime)}
    if audience is not None:
        claims["aud"] = audience
    header = _b64encode(json.dumps({"alg": ALGORITHM, "typ": "JWT"},
                                   separators=(",", ":")).encode("utf-8"))
    payload = _b64encode(json.dumps(claims, separators=(",", ":")).encode("utf-8"))
    signing_input = "%s.%s" % (header, payload)
    return "%s.%s" % (signing_input,
                      _b64encode(_signature(secret, signing_input.encode("ascii"))))


def verify_agent_token(token: str, agent_id: str, secrets: Sequence[bytes],
                       audience: Optional[str], now: float,
                       leeway: float = DEFAULT_LEEWAY) -> Dict[str, Any]:
    """The claims of ``token`` once it is valid for ``agent_id`` at ``now``; else AgentTokenError."""
    if not isinstance(token, str):
        raise AgentTokenError("malformed token: not text")
    parts = token.split(".")
    if len(parts) != 3:
        raise AgentTokenError("malformed token: not three dot-separated parts")
    header = _json_object(_b64decode(parts[0], "header"), "header")
    signature = _b64decode(parts[2], "signature")
    claims = _json_object(_b64decode(parts[1], "claims"), "claims")
    algorithm = header.get("alg")
    if algorithm != ALGORITHM:
        raise AgentTokenError("token algorithm must be %s, not %s"
                              % (ALGORITHM, _show(algorithm)))
    if not secrets:
        raise AgentTokenError("no tunnel secrets are configured: tokens cannot be verified")
    signing_input = ("%s.%s" % (parts[0], parts[1])).encode("ascii")
    # Every secret is tried, so the time taken says nothing about which one matched.
    matched = False
    for secret in secrets:
        matched |= hmac.compare_digest(_signature(secret, signing_input), signature)
    if not matched:
        raise AgentTokenError("bad token signature")
    expires = _number(claims, "exp")
    not_before = _number(claims, "nbf")
    _number(claims, "iat", required=False)
    if now >= expires + leeway:
        raise AgentTokenError("token expired")
    if now < not_before - leeway:
        raise AgentTokenError("token not valid yet")
    if expires - not_before > MAX_LIFETIME:
        raise AgentTokenError("token valid for more than 31 days")
    if "tid" not in claims:
        raise AgentTokenError("token has no tid claim")
    if claims["tid"] != agent_id:
        raise AgentTokenError("token is for agent %s, not %s"
                              % (_show(claims["tid"]), _show(agent_id)))
    if audience is not None:
        _check_audience(claims, audience)
    return claims


def _check_audience(claims: Dict[str, Any], audience: str) -> None:
    if "aud" not in claims:
        raise AgentTokenError("token has no aud claim (audience %s required)"
                              % _show(audience))
    aud = claims["aud"]
    if aud == audience or (isinstance(aud, list) and audience in aud):
        return
    raise AgentTokenError("token audience %s does not include %s"
                          % (_show(aud), _show(audience)))


def bearer_token(authorization: Optional[str]) -> str:
    """The token of an ``Authorization: Bearer <token>`` header value; AgentTokenError if none."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AgentTokenError("an Authorization: Bearer <token> header is required")
    return token.strip()
