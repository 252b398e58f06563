"""Agent tokens (websockify.tunnel.agent_token): HS256 by hand, checked against jwcrypto, fuzzed."""

import base64
import hashlib
import hmac
import json

import pytest
from hypothesis import given, settings, strategies as st

from tests.helpers import require_module
from websockify.tunnel.agent_token import (MAX_LIFETIME, AgentTokenError, bearer_token,
                                           make_agent_token, verify_agent_token)

SECRET_A = b"first secret, 32 bytes long ...."
SECRET_B = b"second secret, for rotation, 32+ bytes"
NOW = 1_700_000_000.0
ID = "LKLAFA151NA774655"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def forge(claims, header=None, secret=SECRET_A, signature=None) -> str:
    """A token with exactly these header and claims (a JSON text is taken as it is)."""
    header = {"alg": "HS256", "typ": "JWT"} if header is None else header
    parts = [b64(h.encode() if isinstance(h, str) else json.dumps(h).encode())
             for h in (header, claims)]
    signing_input = ".".join(parts).encode("ascii")
    if signature is None:
        signature = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return "%s.%s" % (signing_input.decode("ascii"), b64(signature))


def claims(**changes):
    base = {"tid": ID, "nbf": NOW - 60, "exp": NOW + 3600, "iat": NOW - 60}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}


def verify(token, audience=None, now=NOW, secrets=(SECRET_A, SECRET_B), agent_id=ID, **kw):
    return verify_agent_token(token, agent_id, secrets, audience, now, **kw)


def refusal(token, **kw) -> str:
    with pytest.raises(AgentTokenError) as info:
        verify(token, **kw)
    assert info.value.status == 401
    assert info.value.status_line == "401 Unauthorized"
    assert ("WWW-Authenticate", 'Bearer realm="websockify-tunnel", error="invalid_token"') \
        in info.value.headers
    return info.value.text


# -- good tokens ------------------------------------------------------------------

def test_a_made_token_verifies_and_carries_the_claims():
    token = make_agent_token(ID, SECRET_A, 86400, NOW)
    assert verify(token) == {"tid": ID, "iat": int(NOW), "nbf": int(NOW),
                             "exp": int(NOW) + 86400}
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "HS256", "typ": "JWT"}


def test_a_made_token_with_an_audience():
    token = make_agent_token(ID, SECRET_A, 60, NOW, audience="websockify")
    assert verify(token, audience="websockify")["aud"] == "websockify"


def test_rotation_a_token_signed_with_the_second_secret_verifies():
    token = make_agent_token(ID, SECRET_B, 60, NOW)
    assert verify(token, secrets=(SECRET_A, SECRET_B))["tid"] == ID
    assert refusal(token, secrets=(SECRET_A,)) == "bad token signature"


def test_audience_may_be_a_list_holding_it():
    assert verify(forge(claims(aud=["other", "websockify"])), audience="websockify")


def test_aud_is_ignored_without_an_audience():
    assert verify(forge(claims(aud="anything")))["aud"] == "anything"


def test_the_leeway_allows_30_seconds_of_skew_each_way():
    token = forge(claims(nbf=NOW + 29, exp=NOW + 100))
    assert verify(token)
    assert verify(forge(claims(exp=NOW - 29)))
    assert refusal(forge(claims(exp=NOW - 30))) == "token expired"
    assert refusal(forge(claims(nbf=NOW + 31))) == "token not valid yet"
    assert refusal(forge(claims(exp=NOW)), leeway=0) == "token expired"
    assert verify(forge(claims(nbf=NOW, exp=NOW + 1)), leeway=0)


def test_exactly_31_days_is_allowed():
    assert verify(forge(claims(nbf=NOW - 10, exp=NOW - 10 + MAX_LIFETIME)))
    assert make_agent_token(ID, SECRET_A, MAX_LIFETIME, NOW)


def test_float_claims_are_numbers():
    assert verify(forge(claims(nbf=NOW - 0.5, exp=NOW + 0.5)))


# -- every refusal --------------------------------------------------------------

GOOD_HEADER = b64(b'{"alg":"HS256","typ":"JWT"}')
GOOD_CLAIMS = b64(json.dumps(claims()).encode())


@pytest.mark.parametrize("token, reason", [
    ("", "malformed token: not three dot-separated parts"),
    ("a.b", "malformed token: not three dot-separated parts"),
    ("a.b.c.d", "malformed token: not three dot-separated parts"),
    ("%s.%s.%s.x" % (GOOD_HEADER, GOOD_CLAIMS, "x"), "malformed token: not three dot-separated parts"),
    ("!!.%s.sig" % GOOD_CLAIMS, "malformed token: header is not base64url"),
    ("%s=.%s.sig" % (GOOD_HEADER, GOOD_CLAIMS), "malformed token: header is not base64url"),
    ("%s.%s+.sig" % (GOOD_HEADER, GOOD_CLAIMS), "malformed token: claims is not base64url"),
    ("%s.%s.a/b" % (GOOD_HEADER, GOOD_CLAIMS), "malformed token: signature is not base64url"),
    ("%s.%s.abcde" % (GOOD_HEADER, GOOD_CLAIMS), "malformed token: signature is not base64url"),
    ("%s.%s.sig" % (b64(b"{not json"), GOOD_CLAIMS), "malformed token: header is not JSON"),
    ("%s.%s.sig" % (b64(b"\xff\xfe"), GOOD_CLAIMS), "malformed token: header is not JSON"),
    ("%s.%s.sig" % (b64(b"[1]"), GOOD_CLAIMS), "malformed token: header is not a JSON object"),
    ("%s.%s.sig" % (GOOD_HEADER, b64(b"nope")), "malformed token: claims is not JSON"),
    ("%s.%s.sig" % (GOOD_HEADER, b64(b'"tid"')), "malformed token: claims is not a JSON object"),
    ("%s.%s.sig" % (GOOD_HEADER, b64(b"[" * 100000)), "malformed token: claims is not JSON"),
    ("%s.%s.sig" % (GOOD_HEADER, b64(b'{"exp": %s}' % (b"9" * 5000))),
     "malformed token: claims is not JSON"),
])
def test_malformed(token, reason):
    assert refusal(token) == reason


def test_not_text():
    assert refusal(b"a.b.c") == "malformed token: not text"


@pytest.mark.parametrize("header, reason", [
    ({"alg": "none", "typ": "JWT"}, 'token algorithm must be HS256, not "none"'),
    ({"alg": "HS512"}, 'token algorithm must be HS256, not "HS512"'),
    ({"alg": "RS256"}, 'token algorithm must be HS256, not "RS256"'),
    ({"alg": "hs256"}, 'token algorithm must be HS256, not "hs256"'),
    ({"typ": "JWT"}, "token algorithm must be HS256, not null"),
    ({"alg": ["HS256"]}, 'token algorithm must be HS256, not ["HS256"]'),
    ({"alg": 256}, "token algorithm must be HS256, not a JSON number"),
])
def test_algorithm_other_than_hs256(header, reason):
    assert refusal(forge(claims(), header=header)) == reason


def test_alg_none_with_an_empty_signature_is_refused():
    token = "%s.%s." % (b64(b'{"alg":"none"}'), GOOD_CLAIMS)
    assert refusal(token) == 'token algorithm must be HS256, not "none"'


def test_bad_signature_under_every_secret():
    assert refusal(forge(claims(), secret=b"someone else's")) == "bad token signature"
    assert refusal(forge(claims(), signature=b"")) == "bad token signature"
    good = forge(claims())
    head, body, sig = good.split(".")
    tampered = "%s.%s.%s" % (head, b64(json.dumps(claims(tid="OTHER")).encode()), sig)
    assert refusal(tampered) == "bad token signature"


def test_no_secrets_configured():
    assert refusal(forge(claims()), secrets=()) == (
        "no tunnel secrets are configured: tokens cannot be verified")


@pytest.mark.parametrize("changes, reason", [
    ({"exp": ...}, "token has no exp claim"),
    ({"nbf": ...}, "token has no nbf claim"),
    ({"exp": "%d" % (NOW + 60)}, "token claim exp is not a number"),
    ({"nbf": True}, "token claim nbf is not a number"),
    ({"nbf": None}, "token claim nbf is not a number"),
    ({"iat": "yesterday"}, "token claim iat is not a number"),
    ({"exp": NOW - 31}, "token expired"),
    ({"exp": NOW - 3600, "nbf": NOW - 7200}, "token expired"),
    ({"nbf": NOW + 60}, "token not valid yet"),
    ({"exp": NOW + MAX_LIFETIME, "nbf": NOW - 1}, "token valid for more than 31 days"),
    ({"exp": NOW + 10, "nbf": NOW - MAX_LIFETIME}, "token valid for more than 31 days"),
    ({"tid": ...}, "token has no tid claim"),
    ({"tid": "OTHER"}, 'token is for agent "OTHER", not "LKLAFA151NA774655"'),
    ({"tid": 5}, 'token is for agent a JSON number, not "LKLAFA151NA774655"'),
    ({"tid": [ID]}, 'token is for agent ["LKLAFA151NA774655"], not "LKLAFA151NA774655"'),
])
def test_claim_refusals(changes, reason):
    assert refusal(forge(claims(**changes))) == reason


@pytest.mark.parametrize("text", ['{"tid": "X", "nbf": 0, "exp": 1e999}',
                                  '{"tid": "X", "nbf": -Infinity, "exp": 2e9}',
                                  '{"tid": "X", "nbf": NaN, "exp": 2e9}'])
def test_non_finite_numbers_are_not_numbers(text):
    assert refusal(forge(text), agent_id="X").startswith("token claim ")


@pytest.mark.parametrize("aud, reason", [
    (..., 'token has no aud claim (audience "websockify" required)'),
    ("other", 'token audience "other" does not include "websockify"'),
    (["a", "b"], 'token audience ["a", "b"] does not include "websockify"'),
    ([], 'token audience [] does not include "websockify"'),
    (7, 'token audience a JSON number does not include "websockify"'),
    ({"websockify": 1}, 'token audience a JSON object does not include "websockify"'),
])
def test_audience_refusals(aud, reason):
    assert refusal(forge(claims(aud=aud)), audience="websockify") == reason


def test_make_refuses_what_verify_would_refuse():
    for lifetime in (0, -1, MAX_LIFETIME + 1):
        with pytest.raises(ValueError):
            make_agent_token(ID, SECRET_A, lifetime, NOW)
    with pytest.raises(ValueError):
        make_agent_token(ID, b"", 60, NOW)


def test_bearer_token():
    assert bearer_token("Bearer abc.def.ghi") == "abc.def.ghi"
    assert bearer_token("  bearer   abc.def.ghi ") == "abc.def.ghi"
    for value in (None, "", "Basic dXNlcjpwYXNz", "Bearer", "Bearer   "):
        with pytest.raises(AgentTokenError) as info:
            bearer_token(value)
        assert info.value.status == 401
        assert info.value.text == "an Authorization: Bearer <token> header is required"


# -- jwcrypto, independently -------------------------------------------------------

def jwcrypto():
    jwk = require_module("jwcrypto.jwk", "pip install jwcrypto (the test extra)")
    jwt = require_module("jwcrypto.jwt", "pip install jwcrypto (the test extra)")
    return jwk, jwt


def test_a_jwcrypto_token_verifies_with_ours():
    jwk, jwt = jwcrypto()
    key = jwk.JWK(kty="oct", k=b64(SECRET_B))
    token = jwt.JWT(header={"alg": "HS256"},
                    claims={"tid": ID, "nbf": int(NOW), "exp": int(NOW) + 600,
                            "aud": ["websockify"]})
    token.make_signed_token(key)
    assert verify(token.serialize(), audience="websockify")["exp"] == int(NOW) + 600


def test_a_jwcrypto_token_with_another_algorithm_is_refused():
    jwk, jwt = jwcrypto()
    key = jwk.JWK(kty="oct", k=b64(SECRET_A + SECRET_A))    # HS384 wants 48 bytes or more
    token = jwt.JWT(header={"alg": "HS384"}, claims={"tid": ID, "nbf": NOW, "exp": NOW + 60})
    token.make_signed_token(key)
    assert refusal(token.serialize()) == 'token algorithm must be HS256, not "HS384"'


def test_our_token_verifies_with_jwcrypto():
    jwk, jwt = jwcrypto()
    import time
    # jwcrypto checks exp and nbf against its own clock.
    now = time.time()
    ours = make_agent_token(ID, SECRET_A, 3600, now, audience="websockify")
    checked = jwt.JWT(jwt=ours, key=jwk.JWK(kty="oct", k=b64(SECRET_A)), algs=["HS256"],
                      check_claims={"tid": ID, "aud": "websockify", "exp": None, "nbf": None})
    assert json.loads(checked.claims) == {"tid": ID, "iat": int(now), "nbf": int(now),
                                          "exp": int(now + 3600), "aud": "websockify"}


# -- fuzzing: nothing but AgentTokenError, ever --------------------------------------

_TOKEN_ALPHABET = st.sampled_from(list("ABCxyz019-_.=+/ \n{}\"é") + ["eyJ", "fQ"])


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=200), st.lists(_TOKEN_ALPHABET, max_size=60).map("".join)))
def test_random_strings_raise_only_agent_token_errors(token):
    try:
        verify(token)
    except AgentTokenError as exc:
        assert exc.status == 401 and exc.text
    else:  # pragma: no cover - a random string is never a signed token
        raise AssertionError("accepted %r" % token)


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                     lambda children: st.lists(children) | st.dictionaries(st.text(), children),
                     max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(header=st.dictionaries(st.sampled_from(["alg", "typ", "kid"]), _JSON),
       body=st.dictionaries(st.sampled_from(["tid", "exp", "nbf", "iat", "aud"]), _JSON),
       audience=st.sampled_from([None, "websockify"]))
def test_signed_random_claims_raise_only_agent_token_errors(header, body, audience):
    # Signed with a configured secret: every check after the signature is reached.
    text = json.dumps(body)     # NaN and Infinity as Python writes them
    try:
        result = verify(forge(text, header=header), audience=audience)
    except AgentTokenError as exc:
        assert exc.status == 401 and exc.text
        return
    assert header.get("alg") == "HS256" and result["tid"] == ID
    assert result["nbf"] - 30 <= NOW < result["exp"] + 30
