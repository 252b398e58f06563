"""websockify 0.13's plugin contract, with the plugins called directly.

Subclasses, embedders and 0.13's own tests build a plugin with ``cls(src)``
and call ``lookup(token)`` themselves: what it returns (the target as the
store holds it, or None) and what it does not raise are checked here,
without a server.  The expected values are 0.13's answers, found by
reading and running its code.
"""

import base64
import inspect
import json
import string
import time

import pytest
from hypothesis import given, settings, strategies as st

from tests.helpers import parameters, require_module
from websockify.plugins import tokens as tp


# -- parse_source_args ------------------------------------------------------------------

# websockify 0.13's parse_source_args() answers, found by running it: the
# first fourteen are its own test's, the rest the odd corners of its regex.
SOURCE_ARGS_013 = [
    ('', ['']),
    (':', ['', '']),
    ('::', ['', '', '']),
    ('"', ['"']),
    ('""', ['""']),
    ('"""', ['"""']),
    ('"localhost"', ['localhost']),
    ('"localhost":', ['localhost', '']),
    ('"localhost"::', ['localhost', '', '']),
    ('"local:host"', ['local:host']),
    ('"local:host:"pass"', ['"local', 'host', 'pass']),
    ('"local":"host"', ['local', 'host']),
    ('"local":host"', ['local', 'host"']),
    ('localhost:6379:1:pass"word:"my-app-namespace:dev"',
     ['localhost', '6379', '1', 'pass"word', 'my-app-namespace:dev']),
    ('a:b:"c:d":e', ['a', 'b', 'c:d', 'e']),
    ('host:::pw', ['host', '', '', 'pw']),
    ('h::::"ns1:ns2"', ['h', '', '', '', 'ns1:ns2']),
    ('"a"\n', ['a']),
    ('"a"\n:b', ['"a"\n', 'b']),
    ('"a:b"\n', ['a:b']),
    ('"a:b"c', ['"a', 'b"c']),
    ('"a"b":c', ['"a"b"', 'c']),
    ('"":x', ['""', 'x']),
    (':"a:b"', ['', 'a:b']),
    ('a:""', ['a', '""']),
    ('"a"\n\n', ['"a"\n\n']),
    (':\n', ['', '\n']),
    ('"\n"', ['\n']),
    ('x:"y"\n', ['x', 'y']),
    ('"::1":6379', ['::1', '6379']),
    ('[::1]:6379', ['[', '', '1]', '6379']),
    ('a"b:c', ['a"b', 'c']),
    ('"a:b', ['"a', 'b']),
]


@pytest.mark.parametrize("src, expected", SOURCE_ARGS_013)
def test_parse_source_args_gives_013s_answers(src, expected):
    assert tp.parse_source_args(src) == expected


@settings(max_examples=500)
@given(st.text(alphabet=st.sampled_from('ab:" \n\r\\é'), max_size=40) | st.text(max_size=40))
def test_parse_source_args_never_raises(src):
    fields = tp.parse_source_args(src)
    assert fields and all(isinstance(field, str) for field in fields)
    # at most one field per colon, plus one
    assert len(fields) <= src.count(":") + 1


_PLAIN = st.text(alphabet=string.ascii_letters + string.digits + "-_.@ \n", max_size=8)


@given(st.lists(_PLAIN, min_size=1, max_size=6))
def test_parse_source_args_splits_plain_fields_at_colons(parts):
    assert tp.parse_source_args(":".join(parts)) == parts


@given(st.lists(_PLAIN | st.text(alphabet="ab:", min_size=1, max_size=8).filter(
    lambda part: ":" in part), min_size=1, max_size=6))
def test_parse_source_args_quoted_fields_keep_their_colons(parts):
    src = ":".join('"%s"' % part if ":" in part else part for part in parts)
    assert tp.parse_source_args(src) == parts


# -- JWTTokenApi ----------------------------------------------------------------------------

try:
    from jwcrypto import jwk, jwt
except ImportError:  # the jwt extra is not installed
    jwk = jwt = None

@pytest.fixture
def jwcrypto():
    """Skips locally, fails in CI, without the jwt extra."""
    return require_module("jwcrypto", "pip install 'websockify[jwt]'")


needs_jwcrypto = pytest.mark.usefixtures("jwcrypto")

SECRET = b"0123456789abcdef0123456789abcdef!"      # HS256 wants 32 bytes or more


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def signed(key, claims, alg="HS256", header=None):
    token = jwt.JWT(header=dict(header or {}, alg=alg), claims=claims)
    token.make_signed_token(key)
    return token.serialize()


@pytest.fixture
def shared_key(tmp_path):
    """A key file as 0.13 reads it (the secret's base64url text) and the JWK it means."""
    text = b64url(SECRET)
    path = tmp_path / "hs.key"
    path.write_text(text)
    # how a 0.13 deployment signs: the file's text is the k of an oct JWK
    return str(path), jwk.JWK(kty="oct", k=text)


@needs_jwcrypto
def test_jwt_shared_secret_is_the_base64url_k_of_013(shared_key, tmp_path):
    path, key = shared_key
    plugin = tp.JWTTokenApi(path)
    plugin.check()
    assert plugin.lookup(signed(key, {"host": "remote_host", "port": "remote_port"})) == \
        ("remote_host", "remote_port")
    # the HMAC key is the decoded secret, not the text in the file
    by_text = jwk.JWK(kty="oct", k=b64url(open(path, "rb").read()))
    assert plugin.lookup(signed(by_text, {"host": "h", "port": 1})) is None
    # padding, and a final newline (which jwcrypto itself refuses), change nothing
    for variant in (base64.urlsafe_b64encode(SECRET).decode() + "\n", b64url(SECRET) + "\r\n"):
        other = tmp_path / "variant.key"
        other.write_text(variant)
        assert tp.JWTTokenApi(str(other)).lookup(signed(key, {"host": "h", "port": 2})) == ("h", 2)


@needs_jwcrypto
def test_jwt_time_claims_and_other_keys_give_none(shared_key, monkeypatch):
    path, key = shared_key
    plugin = tp.JWTTokenApi(path)
    token = signed(key, {"host": "remote_host", "port": "remote_port", "nbf": 100, "exp": 200})
    # 0.13's own cases: time.time() patched to before, between and after
    for now, expected in ((50, None), (100, ("remote_host", "remote_port")),
                          (150, ("remote_host", "remote_port")),
                          (200, ("remote_host", "remote_port")), (250, None)):
        monkeypatch.setattr(time, "time", lambda now=now: now)
        assert plugin.lookup(token) == expected, now
    monkeypatch.undo()
    other = jwk.JWK.generate(kty="oct", size=256)
    for bad in (signed(other, {"host": "h", "port": 1}), "not.a.jwt", "", "x" * 100,
                signed(key, {"host": "h"})):
        assert plugin.lookup(bad) is None
        with pytest.raises(tp.TokenRefused):
            plugin.resolve(bad)


@needs_jwcrypto
def test_jwt_pem_keys_as_before(tmp_path):
    private = jwk.JWK.generate(kty="RSA", size=2048)
    public_pem = tmp_path / "public.pem"
    public_pem.write_bytes(private.export_to_pem())
    private_pem = tmp_path / "private.pem"
    private_pem.write_bytes(private.export_to_pem(private_key=True, password=None))
    token = signed(private, {"host": "remote_host", "port": "remote_port"}, "RS256")
    for path in (public_pem, private_pem):
        assert tp.JWTTokenApi(str(path)).lookup(token) == ("remote_host", "remote_port")
    # a PEM public key's text is never taken for a shared secret
    confused = signed(jwk.JWK(kty="oct", k=b64url(public_pem.read_bytes())),
                      {"host": "h", "port": 1})
    assert tp.JWTTokenApi(str(public_pem)).lookup(confused) is None


@needs_jwcrypto
@pytest.mark.parametrize("content, message", [
    (None, "cannot read key file"),
    (b"", "key file is empty"),
    # 13 characters: no base64 text has that length (jwcrypto's test, and 0.13's)
    (b"not base64url\n", "neither a PEM key nor the base64url text"),
    (b"\xff\xfe raw bytes", "neither a PEM key nor the base64url text"),
    (b"-----BEGIN PUBLIC KEY-----\nbroken\n-----END PUBLIC KEY-----\n", "cannot parse the PEM"),
])
def test_jwt_bad_key_file_builds_and_answers_none(tmp_path, content, message):
    path = tmp_path / "bad.key"
    if content is not None:
        path.write_bytes(content)
    plugin = tp.JWTTokenApi(str(path))          # 0.13 builds it; lookup() says None
    key = jwk.JWK(kty="oct", k=b64url(SECRET))
    assert plugin.lookup(signed(key, {"host": "h", "port": 1})) is None
    with pytest.raises(tp.SourceError) as info:
        plugin.check()                          # the start stops (exit 5)
    assert message in str(info.value)


@needs_jwcrypto
def test_jwt_key_file_read_again_when_it_changes(shared_key, tmp_path):
    path, key = shared_key
    plugin = tp.JWTTokenApi(path)
    plugin.check()
    new_secret = b"another secret, also 32 bytes long"
    new_key = jwk.JWK(kty="oct", k=b64url(new_secret))
    with open(path, "w") as handle:
        handle.write(b64url(new_secret))
    assert plugin.lookup(signed(new_key, {"host": "h", "port": 3})) == ("h", 3)
    assert plugin.lookup(signed(key, {"host": "h", "port": 3})) is None
    # a key file that breaks keeps the last good key
    with open(path, "w") as handle:
        handle.write("not base64url")
    assert plugin.lookup(signed(new_key, {"host": "h", "port": 4})) == ("h", 4)


# -- the names and signatures 0.13's users reach ---------------------------------------------

EMPTY = inspect.Parameter.empty

#: websockify 0.13's constructor signatures, read from its token_plugins.py.
TOKEN_SIGNATURES_013 = {
    "BasePlugin": [("src", EMPTY)],
    "ReadOnlyTokenFile": [("*args", EMPTY), ("**kwargs", EMPTY)],
    "TokenFile": [("*args", EMPTY), ("**kwargs", EMPTY)],
    "TokenFileName": [("src", EMPTY)],
    "BaseTokenAPI": [("src", EMPTY)],
    "JSONTokenApi": [("src", EMPTY)],
    "JWTTokenApi": [("src", EMPTY)],
    "TokenRedis": [("src", EMPTY)],
    "UnixDomainSocketDirectory": [("*args", EMPTY), ("**kwargs", EMPTY)],
}


@pytest.mark.parametrize("name, expected", sorted(TOKEN_SIGNATURES_013.items()))
def test_token_plugins_have_013s_signatures(name, expected):
    import websockify.token_plugins as module
    cls = getattr(module, name)
    assert parameters(cls) == expected
    assert parameters(cls.lookup) == [("self", EMPTY), ("token", EMPTY)]
    assert issubclass(cls, module.BasePlugin)
    if issubclass(cls, module.BaseTokenAPI):
        assert parameters(cls.process_result)[1:] == [("resp", EMPTY)]
    assert parameters(module.parse_source_args) == [("src", EMPTY)]


def test_base_plugin_as_013():
    import websockify.token_plugins as module
    plugin = module.BasePlugin("the source")
    assert plugin.source == "the source" and plugin.lookup("t") is None


# -- file plugins --------------------------------------------------------------------------

def write(path, text):
    with open(str(path), "w") as handle:
        handle.write(text)
    return str(path)


@pytest.mark.parametrize("line", ["testhost: remote_host:remote_port",
                                  "testhost:\tremote_host:remote_port",
                                  "  testhost:   remote_host:remote_port  "])
def test_token_file_lookup_gives_the_target_as_written(tmp_path, line):
    # 0.13's own cases: what the file holds, port text included, not checked
    for cls in (tp.ReadOnlyTokenFile, tp.TokenFile):
        plugin = cls(write(tmp_path / "tokens", line + "\n"))
        assert plugin.lookup("testhost") == ["remote_host", "remote_port"]
        assert plugin.lookup("other") is None
    empty = tp.ReadOnlyTokenFile(write(tmp_path / "empty", ""))
    assert empty.lookup("testhost") is None


def test_token_file_reads_changed_files_at_the_next_lookup(tmp_path):
    path = write(tmp_path / "tokens", "a: h1:1\nb: h2:2\n")
    plugin = tp.TokenFile(path)
    assert plugin.lookup("a") == ["h1", "1"]
    write(path, "a: h9:9\nb: h2:2\n")            # same size, at once: 0.13 re-read every time
    assert plugin.lookup("a") == ["h9", "9"]
    write(path, "b: h2:2\n")
    assert plugin.lookup("a") is None
    # a directory: a new file is seen at once
    d = tmp_path / "dir"
    d.mkdir()
    write(d / "one", "a: h1:1\n")
    plugin = tp.TokenFile(str(d))
    assert plugin.lookup("a") == ["h1", "1"] and plugin.lookup("c") is None
    write(d / "two", "c: h3:3\n")
    assert plugin.lookup("c") == ["h3", "3"]


def test_token_file_answers_do_not_change_the_table(tmp_path):
    class Lower(tp.TokenFile):
        """A 0.13-style subclass: super().lookup() and its own twist."""
        def lookup(self, token):
            result = super().lookup(token.lower())
            if result is not None:
                result[1] = str(int(result[1]) + 1)
            return result

    plugin = Lower(write(tmp_path / "tokens", "abc: h:5900\n"))
    assert plugin.lookup("ABC") == ["h", "5901"]
    assert plugin.lookup("ABC") == ["h", "5901"]
    assert not tp.answers_by_resolve(plugin)          # the server asks its lookup()


def test_token_file_bad_lines_are_skipped_by_lookup_and_stop_the_start(tmp_path):
    path = write(tmp_path / "tokens", "good: h:1\nnot a line\nport: h:notaport\n")
    plugin = tp.TokenFile(path)
    assert plugin.lookup("good") == ["h", "1"]
    assert plugin.lookup("port") == ["h", "notaport"]       # as 0.13 reads it
    with pytest.raises(tp.SourceError) as info:
        plugin.check()
    assert "tokens:2: syntax error" in str(info.value)


def test_token_file_on_a_missing_source_builds_and_answers_none(tmp_path):
    path = str(tmp_path / "later")
    for cls in (tp.ReadOnlyTokenFile, tp.TokenFile):
        plugin = cls(path)
        assert plugin.lookup("a") is None
        with pytest.raises(tp.SourceError, match="does not exist"):
            plugin.check()
    plugin = tp.TokenFile(path)
    assert plugin.lookup("a") is None
    write(path, "a: h:1\n")
    assert plugin.lookup("a") == ["h", "1"]
    with pytest.raises(tp.SourceError, match="needs --token-source"):
        tp.TokenFile(None).check()


def test_unix_domain_socket_directory(tmp_path):
    import socket
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "desk"))
    write(tmp_path / "file", "x")
    try:
        plugin = tp.UnixDomainSocketDirectory(str(tmp_path))
        assert plugin.lookup("desk") == ["unix_socket", str(tmp_path / "desk")]
        assert plugin.lookup("file") is None and plugin.lookup("none") is None
        assert plugin._dir_path == str(tmp_path)
    finally:
        server.close()
    missing = tp.UnixDomainSocketDirectory(str(tmp_path / "missing"))   # builds, as 0.13
    assert missing.lookup("desk") is None
    with pytest.raises(tp.SourceError, match="needs a directory"):
        missing.check()


# -- HTTP APIs -----------------------------------------------------------------------------

@pytest.fixture
def api():
    from tests.e2e.test_tokens import TokenAPI
    server = TokenAPI({"plain": "remote_host:remote_port",
                       "json": json.dumps({"host": "remote_host", "port": "remote_port"}),
                       "a/b c": "h:1",
                       "broken": "{not json"})
    yield server
    server.close()


def test_base_token_api_gives_013s_answer(api):
    plugin = tp.BaseTokenAPI("http://127.0.0.1:%d/t/%%s" % api.port)
    plugin.check()
    assert plugin.lookup("plain") == ["remote_host", b"remote_port"]   # 0.13: port as bytes
    assert plugin.lookup("a/b c") == ["h", b"1"]
    assert "/t/a%2Fb%20c" in api.paths
    assert plugin.lookup("unknown") is None                     # 404
    assert plugin.lookup("crash") is None                       # 500: not ok, as 0.13
    with pytest.raises(tp.BackendUnavailable):
        plugin.resolve("crash")
    assert tp.target_from_result(["127.0.0.1", b"5900"]) == ("127.0.0.1", 5900)


def test_json_token_api_gives_the_json_values(api):
    plugin = tp.JSONTokenApi("http://127.0.0.1:%d/t/%%s" % api.port)
    assert plugin.lookup("json") == ("remote_host", "remote_port")
    assert plugin.lookup("broken") is None
    with pytest.raises(tp.BadTarget):
        plugin.resolve("broken")

    class Mine(tp.JSONTokenApi):
        def process_result(self, resp):
            host, port = super().process_result(resp)
            return host.upper(), port

    assert Mine(plugin.source).lookup("json") == ("REMOTE_HOST", "remote_port")


def test_token_api_down_lets_the_error_through(api):
    port = api.port
    api.close()
    plugin = tp.BaseTokenAPI("http://127.0.0.1:%d/%%s" % port)
    with pytest.raises(OSError):                  # 0.13: requests' ConnectionError
        plugin.lookup("plain")
    with pytest.raises(tp.BackendUnavailable):
        plugin.resolve("plain")


@pytest.mark.parametrize("source", [None, "", "http://127.0.0.1/no-placeholder",
                                    "ftp://127.0.0.1/%s"])
def test_token_api_bad_source_builds_and_answers_none(source):
    plugin = tp.JSONTokenApi(source)
    assert plugin.lookup("t") is None
    with pytest.raises(tp.SourceError):
        plugin.check()


# -- TokenRedis's source ---------------------------------------------------------------------

# 0.13's own test: source -> (_server, _port, _db, _password, _namespace)
REDIS_SOURCES_013 = [
    ("127.0.0.1", ("127.0.0.1", 6379, 0, None, "")),
    ("127.0.0.1:1234", ("127.0.0.1", 1234, 0, None, "")),
    ("127.0.0.1:1234:2", ("127.0.0.1", 1234, 2, None, "")),
    ("127.0.0.1:1234:2:verysecret", ("127.0.0.1", 1234, 2, "verysecret", "")),
    ("127.0.0.1:1234:2:verysecret:namespace", ("127.0.0.1", 1234, 2, "verysecret", "namespace:")),
    ("127.0.0.1:::verysecret", ("127.0.0.1", 6379, 0, "verysecret", "")),
    ("127.0.0.1::::", ("127.0.0.1", 6379, 0, None, "")),
    ("127.0.0.1:::", ("127.0.0.1", 6379, 0, None, "")),
    ("127.0.0.1::", ("127.0.0.1", 6379, 0, None, "")),
    ("127.0.0.1:", ("127.0.0.1", 6379, 0, None, "")),
    ("127.0.0.1::::namespace", ("127.0.0.1", 6379, 0, None, "namespace:")),
    ('127.0.0.1::::"ns1:ns2"', ("127.0.0.1", 6379, 0, None, "ns1:ns2:")),
    ("127.0.0.1::2", ("127.0.0.1", 6379, 2, None, "")),
    ("127.0.0.1:1234::verysecret", ("127.0.0.1", 1234, 0, "verysecret", "")),
    ("127.0.0.1::2:verysecret", ("127.0.0.1", 6379, 2, "verysecret", "")),
    ("127.0.0.1::2:", ("127.0.0.1", 6379, 2, None, "")),
]


@pytest.mark.parametrize("source, expected", REDIS_SOURCES_013)
def test_token_redis_source_fields_as_013(source, expected):
    plugin = tp.TokenRedis(source)
    assert (plugin._server, plugin._port, plugin._db, plugin._password,
            plugin._namespace) == expected


@pytest.mark.parametrize("source", ["127.0.0.1:notaport", "h:1:notadb", "a:1:2:3:4:5", "", None])
def test_token_redis_bad_source_builds_and_answers_none(source):
    # 0.13 exits the process here; ours builds, check() stops the start
    plugin = tp.TokenRedis(source)
    assert plugin.lookup("t") is None
    with pytest.raises(tp.SourceError):
        plugin.check()
