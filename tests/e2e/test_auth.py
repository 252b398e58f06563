"""--auth-plugin end to end: the bundled plugins, plugins written for websockify
0.13, plugins that fail, --web-auth, client certificates and the command line.

The tests talk to ``python -m websockify`` with one worker on loopback, with
raw sockets (plain or TLS through Python's ssl module); the targets are the
bundled echo server or ``--echo``.  A server the tests only talk to is shared
by the module (each test reads its log from its own start on); a test that
needs options of its own starts its own.
"""

import base64
import inspect
import os
import re
import ssl
import socket
import subprocess
import textwrap
import time

import pytest

from tests.helpers import (ROOT, RawWebSocket, SharedProcess, children_of, free_port,
                           handshake_request, read_http_response, wait_for,
                           websockify_argv)

TIMEOUT = 10.0
CREDENTIALS = "user:s3cret"
REFUSED = re.compile(r"refused .*?: (\d{3}) ")


def basic(credentials: str) -> str:
    return "Authorization: Basic " + base64.b64encode(credentials.encode()).decode()


def refusals(proc) -> list:
    return [line for line in proc.log().splitlines() if REFUSED.search(line)]


def new_lines(proc, before: int, pattern: str = r"refused ") -> list:
    """The log lines after the first ``before`` ones, once one matches ``pattern``.

    The requests were read to the server's close (``upgrade``, ``http_get``),
    and the server logs all it logs about a request before it answers and
    closes, so no line about it can come later."""
    regex = re.compile(pattern)
    return wait_for(lambda: (lambda lines: lines if any(regex.search(line) for line in lines)
                             else None)(proc.log().splitlines()[before:]),
                    TIMEOUT, what="log line %r in:\n%s" % (pattern, proc.log()))


def worker_pids(proc) -> list:
    """The worker's pid, once forked (the port is open before the fork)."""
    return wait_for(lambda: children_of(proc.pid), what="the worker of %d" % proc.pid)


def log_size(proc) -> int:
    return len(proc.log().splitlines())


def closed_by_server(sock) -> bool:
    """Read to the end: True once the server has closed the connection."""
    sock.settimeout(TIMEOUT)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, ssl.SSLEOFError):
        pass
    except socket.timeout:
        return False
    return True


def upgrade(port, extra=(), context=None, path="/") -> tuple:
    """(status, headers, body) of an upgrade request; the connection is closed.
    A refused one is read until the server closes it (it must)."""
    ws = TLSWebSocket(port, context, extra=extra, path=path) if context \
        else RawWebSocket(port, extra=extra, path=path)
    try:
        if ws.status != 101:
            assert closed_by_server(ws.sock), "a refused connection was left open"
        return ws.status, ws.headers, ws.buffer
    finally:
        ws.close()


def assert_refused_once(proc, port, extra, status, context=None) -> dict:
    """The request is refused with ``status`` and exactly one log line naming it."""
    before = log_size(proc)
    got, headers, body = upgrade(port, extra, context)
    assert got == status, (got, headers, body, proc.log())
    lines = [line for line in new_lines(proc, before) if REFUSED.search(line)]
    assert len(lines) == 1, lines
    assert REFUSED.search(lines[0]).group(1) == str(status), lines
    return headers


def assert_echoes(ws, payload=b"hello through the bridge") -> None:
    assert ws.status == 101, (ws.status, ws.headers, ws.buffer)
    ws.send_binary(payload)
    assert ws.recv_data(len(payload)) == payload


class TLSWebSocket(RawWebSocket):
    """RawWebSocket over a TLS connection made with ``context``."""

    def __init__(self, port, context, host="127.0.0.1", path="/", extra=(), timeout=TIMEOUT):
        raw = socket.create_connection((host, port), timeout=timeout)
        self.sock = context.wrap_socket(raw, server_hostname=host)
        self.sock.sendall(handshake_request(path, host, extra=extra))
        self.status, self.headers, self.buffer = read_http_response(self.sock)


def client_context(pki, identity=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca.cert)
    if identity is not None:
        context.load_cert_chain(identity.cert, identity.key)
    return context


def http_get(port, path, extra=()) -> tuple:
    """(status, headers, body) of a plain GET, read until the server closes."""
    lines = ["GET %s HTTP/1.1" % path, "Host: 127.0.0.1", "Connection: close"] + list(extra)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        answer = read_http_response(sock)
        assert closed_by_server(sock), "Connection: close was not honoured"
        return answer


def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = ROOT
    full_env.update(env or {})
    return subprocess.run(websockify_argv(*args), capture_output=True, text=True,
                          timeout=30, cwd=ROOT, env=full_env)


def shared(server):
    """A module's shared (SharedProcess, port), its log read from now on."""
    view, port = server
    view.mark()
    return view, port


@pytest.fixture(scope="module")
def shared_basic_server(module_websockify, module_echo_target):
    proc, port = module_websockify("--workers", "1", "--auth-plugin", "BasicHTTPAuth",
                                   "--auth-source", CREDENTIALS, "127.0.0.1:{port}",
                                   "127.0.0.1:%d" % module_echo_target)
    return SharedProcess(proc), port


@pytest.fixture
def basic_server(shared_basic_server):
    return shared(shared_basic_server)


# -- BasicHTTPAuth --------------------------------------------------------------------

def test_basic_auth_good_credentials_relay_data(basic_server):
    proc, port = basic_server
    ws = RawWebSocket(port, extra=[basic(CREDENTIALS)])
    try:
        assert_echoes(ws)
    finally:
        ws.close()
    assert refusals(proc) == []


def test_basic_auth_missing_credentials_get_401_with_challenge(basic_server):
    proc, port = basic_server
    headers = assert_refused_once(proc, port, [], 401)
    assert headers["www-authenticate"] == 'Basic realm="Websockify"'


def test_basic_auth_wrong_password_gets_401(basic_server):
    proc, port = basic_server
    headers = assert_refused_once(proc, port, [basic("user:wrong")], 401)
    assert headers["www-authenticate"] == 'Basic realm="Websockify"'
    assert_refused_once(proc, port, [basic("other:s3cret")], 401)


@pytest.mark.parametrize("authorization", [
    "Authorization: Basic !!!not*base64!!!",
    basic("userwithoutcolon"),
    "Authorization: Bearer " + base64.b64encode(CREDENTIALS.encode()).decode(),
    "Authorization: Digest username=\"user\"",
], ids=["not-base64", "no-colon", "bearer-scheme", "digest-scheme"])
def test_basic_auth_malformed_credentials_get_403(basic_server, authorization):
    proc, port = basic_server
    headers = assert_refused_once(proc, port, [authorization], 403)
    assert "www-authenticate" not in headers


def test_basic_auth_refusals_leave_the_worker_alone(basic_server):
    proc, port = basic_server
    workers = worker_pids(proc)
    assert len(workers) == 1
    # No or wrong credentials: 401 and a challenge; malformed ones: 403.
    for extra, expected in (([], 401), ([basic("user:wrong")], 401),
                            (["Authorization: Basic %%%"], 403),
                            (["Authorization: Negotiate abc"], 403)):
        status, _, _ = upgrade(port, extra)
        assert status == expected, (extra, status)
    assert children_of(proc.pid) == workers
    ws = RawWebSocket(port, extra=[basic(CREDENTIALS)])
    try:
        assert_echoes(ws, b"still serving")
    finally:
        ws.close()
    assert children_of(proc.pid) == workers


def test_basic_auth_applies_to_echo_sessions(websockify):
    proc, port = websockify("--workers", "1", "--echo", "--auth-plugin", "BasicHTTPAuth",
                            "--auth-source", CREDENTIALS, "127.0.0.1:{port}")
    assert_refused_once(proc, port, [], 401)
    assert_refused_once(proc, port, [basic("user:nope")], 401)
    ws = RawWebSocket(port, extra=[basic(CREDENTIALS)])
    try:
        assert_echoes(ws, b"echo with credentials")
    finally:
        ws.close()


def hixie75_request(extra=()) -> bytes:
    lines = ["GET / HTTP/1.1", "Upgrade: WebSocket", "Connection: Upgrade",
             "Host: 127.0.0.1", "Origin: http://127.0.0.1"] + list(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def test_basic_auth_applies_to_legacy_hixie_handshakes(basic_server):
    proc, port = basic_server
    before = log_size(proc)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(hixie75_request())
        status, headers, _ = read_http_response(sock)
    assert status == 401
    assert headers["www-authenticate"] == 'Basic realm="Websockify"'
    assert len([line for line in new_lines(proc, before) if REFUSED.search(line)]) == 1
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(hixie75_request([basic(CREDENTIALS)]))
        status, _, _ = read_http_response(sock)
        assert status == 101
        sock.sendall(b"\x00" + base64.b64encode(b"legacy") + b"\xff")
        data = b""
        while not data.endswith(b"\xff"):
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
    assert data == b"\x00" + base64.b64encode(b"legacy") + b"\xff"


# -- ExpectOrigin -------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_origin_server(module_websockify, module_echo_target):
    proc, port = module_websockify("--workers", "1", "--auth-plugin", "ExpectOrigin",
                                   "--auth-source", "https://a.example https://b.example:8443",
                                   "127.0.0.1:{port}", "127.0.0.1:%d" % module_echo_target)
    return SharedProcess(proc), port


@pytest.fixture
def origin_server(shared_origin_server):
    return shared(shared_origin_server)


@pytest.mark.parametrize("origin", ["https://a.example", "https://b.example:8443"])
def test_expect_origin_listed_origin_is_let_in(origin_server, origin):
    proc, port = origin_server
    ws = RawWebSocket(port, extra=["Origin: %s" % origin])
    try:
        assert_echoes(ws)
    finally:
        ws.close()


@pytest.mark.parametrize("extra", [
    [], ["Origin: https://evil.example"], ["Origin: https://a.example:443"],
    ["Origin: http://a.example"], ["Origin: null"],
], ids=["missing", "other-host", "other-port", "other-scheme", "null"])
def test_expect_origin_other_origin_gets_403(origin_server, extra):
    proc, port = origin_server
    workers = worker_pids(proc)
    assert_refused_once(proc, port, extra, 403)
    assert children_of(proc.pid) == workers


# -- ClientCertCNAuth -----------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_cert_server(module_websockify, module_echo_target, pki):
    proc, port = module_websockify("--workers", "1", "--cert", pki.server.pem,
                                   "--verify-client", "--cafile", pki.ca.cert,
                                   "--auth-plugin", "ClientCertCNAuth",
                                   "--auth-source", "alice carol", "127.0.0.1:{port}",
                                   "127.0.0.1:%d" % module_echo_target)
    return SharedProcess(proc), port


@pytest.fixture
def cert_server(shared_cert_server):
    return shared(shared_cert_server)


def test_client_cert_listed_common_name_is_let_in(cert_server, pki):
    proc, port = cert_server
    ws = TLSWebSocket(port, client_context(pki, pki.alice))
    try:
        assert_echoes(ws, b"alice over TLS")
    finally:
        ws.close()
    assert refusals(proc) == []


def test_client_cert_other_common_name_gets_403(cert_server, pki):
    proc, port = cert_server
    workers = worker_pids(proc)
    assert_refused_once(proc, port, [], 403, client_context(pki, pki.bob))
    assert children_of(proc.pid) == workers


def test_client_cert_header_sent_by_a_tls_client_is_replaced(cert_server, pki):
    proc, port = cert_server
    before = log_size(proc)
    status, _, _ = upgrade(port, ["SSL_CLIENT_S_DN_CN: alice"], client_context(pki, pki.bob))
    assert status == 403
    lines = new_lines(proc, before)
    assert len([line for line in lines if REFUSED.search(line)]) == 1, lines
    assert any("dropped" in line and "ssl_client_s_dn_cn" in line.lower() for line in lines), lines


@pytest.mark.parametrize("header", ["SSL_CLIENT_S_DN_CN: alice", "SSL-Client-S-DN-CN: alice",
                                    "ssl_client_s_dn_cn: alice"])
def test_client_cert_header_forged_over_plain_ws_gets_403(cert_server, header):
    proc, port = cert_server
    before = log_size(proc)
    status, _, _ = upgrade(port, [header])
    assert status == 403
    lines = new_lines(proc, before)
    refused = [line for line in lines if REFUSED.search(line)]
    assert len(refused) == 1 and " 403 " in refused[0], lines
    dropped = [line for line in lines if "dropped" in line]
    assert len(dropped) == 1, lines
    assert header.split(":")[0].lower() in dropped[0].lower(), dropped


def test_client_cert_header_forged_over_tls_without_client_cert_gets_403(
        websockify, echo_target, pki):
    # Without --verify-client nobody is asked for a certificate: a TLS client
    # naming itself in a header must still be refused.
    proc, port = websockify("--workers", "1", "--cert", pki.server.pem,
                            "--auth-plugin", "ClientCertCNAuth", "--auth-source", "alice",
                            "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    before = log_size(proc)
    status, _, _ = upgrade(port, ["SSL_CLIENT_S_DN_CN: alice"], client_context(pki))
    assert status == 403
    lines = new_lines(proc, before)
    assert any("dropped" in line for line in lines), lines
    status, _, _ = upgrade(port, [], client_context(pki))
    assert status == 403


# -- plugins written for websockify 0.13 ------------------------------------------------

OLD_STYLE_PLUGIN = '''
from websockify.auth_plugins import BasePlugin, AuthenticationError


class TeapotAuth(BasePlugin):
    """Written as websockify 0.13's documentation shows."""

    def __init__(self, src):
        self.source = src

    def authenticate(self, headers, target_host, target_port):
        with open(self.source, "a") as seen:
            seen.write("%s %s\\n" % (target_host, target_port))
        if headers.get("X-Magic-Word") != "please":
            raise AuthenticationError(
                log_msg="no magic word",
                response_code=418,
                response_headers={"X-Teapot": "short and stout",
                                  "X-Target": "%s:%s" % (target_host, target_port)},
                response_msg="I only brew for the polite")


class Exploding(BasePlugin):
    def authenticate(self, headers, target_host, target_port):
        if headers.get("X-Magic-Word") != "please":
            raise ValueError("plugin bug 42")


class Slow(BasePlugin):
    def authenticate(self, headers, target_host, target_port):
        import time
        time.sleep(float(self.source))


class RefusesSource(BasePlugin):
    def __init__(self, src):
        raise RuntimeError("cannot use %r" % src)
'''


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("plugins")
    (directory / "oldauth.py").write_text(textwrap.dedent(OLD_STYLE_PLUGIN))
    return directory


def plugin_env(plugin_dir) -> dict:
    return {"PYTHONPATH": str(plugin_dir) + os.pathsep + ROOT}


@pytest.fixture(scope="module")
def shared_teapot_server(module_websockify, module_echo_target, plugin_dir):
    seen = plugin_dir / "seen.txt"
    proc, port = module_websockify("--workers", "1", "--auth-plugin", "oldauth.TeapotAuth",
                                   "--auth-source", str(seen), "127.0.0.1:{port}",
                                   "127.0.0.1:%d" % module_echo_target,
                                   env=plugin_env(plugin_dir))
    return SharedProcess(proc), port, seen


@pytest.fixture
def teapot_server(shared_teapot_server):
    """(process, port, file the plugin writes each target to) for oldauth.TeapotAuth;
    the file emptied for this test (the plugin appends to it)."""
    view, port, seen = shared_teapot_server
    view.mark()
    seen.write_text("")
    return view, port, seen


def test_old_style_plugin_refuses_with_its_status_and_headers(teapot_server,
                                                             module_echo_target):
    proc, port, seen = teapot_server
    headers = assert_refused_once(proc, port, [], 418)
    assert headers["x-teapot"] == "short and stout"
    assert headers["x-target"] == "127.0.0.1:%d" % module_echo_target
    status, _, body = upgrade(port, ["X-Magic-Word: please?"])
    assert status == 418
    assert b"I only brew for the polite" in body
    assert seen.read_text().splitlines() == ["127.0.0.1 %d" % module_echo_target] * 2


def test_old_style_plugin_lets_in_and_sees_the_target(teapot_server, module_echo_target):
    proc, port, seen = teapot_server
    ws = RawWebSocket(port, extra=["X-Magic-Word: please"])
    try:
        assert_echoes(ws, b"polite bytes")
    finally:
        ws.close()
    assert seen.read_text() == "127.0.0.1 %d\n" % module_echo_target
    assert refusals(proc) == []


def test_plugin_raising_other_errors_gives_500_and_keeps_the_worker(websockify, echo_target,
                                                                    plugin_dir):
    proc, port = websockify("--workers", "1", "--auth-plugin", "oldauth.Exploding",
                            "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target,
                            env=plugin_env(plugin_dir))
    workers = worker_pids(proc)
    before = log_size(proc)
    status, _, _ = upgrade(port)
    assert status == 500
    lines = new_lines(proc, before)
    errors = [line for line in lines if "plugin bug 42" in line]
    assert len(errors) == 1, lines
    assert "ValueError" in errors[0] and " 500 " in errors[0], errors
    assert "Traceback" not in proc.log()
    assert children_of(proc.pid) == workers
    ws = RawWebSocket(port, extra=["X-Magic-Word: please"])
    try:
        assert_echoes(ws, b"next request is served")
    finally:
        ws.close()
    assert children_of(proc.pid) == workers


@pytest.mark.parametrize("plugin, expected", [
    ("nosuchmodule.Plugin", "nosuchmodule"),
    ("oldauth.NoSuchClass", "NoSuchClass"),
    ("oldauth.RefusesSource", "cannot use"),
    ("NoSuchBundledPlugin", "NoSuchBundledPlugin"),
])
def test_unusable_plugin_stops_the_start_with_exit_5(plugin_dir, plugin, expected):
    port = free_port()
    done = run_cli("--workers", "1", "--auth-plugin", plugin, "--auth-source", "src",
                   "127.0.0.1:%d" % port, "127.0.0.1:1", env=plugin_env(plugin_dir))
    assert done.returncode == 5, (done.stdout, done.stderr)
    output = (done.stdout + done.stderr).strip().splitlines()
    assert len(output) == 1, output
    assert expected in output[0] and "Traceback" not in output[0], output


def test_plugin_sees_the_token_target_and_runs_after_the_lookup(
        websockify, echo_target, plugin_dir, tmp_path):
    seen = tmp_path / "seen.txt"
    tokens = tmp_path / "tokens"
    tokens.write_text("good: 127.0.0.1:%d\n" % echo_target)
    proc, port = websockify("--workers", "1", "--token-plugin", "TokenFile",
                            "--token-source", str(tokens), "--auth-plugin", "oldauth.TeapotAuth",
                            "--auth-source", str(seen), "127.0.0.1:{port}",
                            env=plugin_env(plugin_dir))
    status, headers, _ = upgrade(port, path="/?token=good")
    assert status == 418
    assert headers["x-target"] == "127.0.0.1:%d" % echo_target
    # An unknown token is refused by the lookup: the plugin is not asked.
    status, _, _ = upgrade(port, path="/?token=unknown")
    assert status == 404
    assert seen.read_text() == "127.0.0.1 %d\n" % echo_target
    ws = RawWebSocket(port, path="/?token=good", extra=["X-Magic-Word: please"])
    try:
        assert_echoes(ws, b"token and auth")
    finally:
        ws.close()


def test_refused_request_never_connects_to_the_target(websockify):
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen(8)
    target.settimeout(1.0)
    try:
        proc, port = websockify("--workers", "1", "--auth-plugin", "BasicHTTPAuth",
                                "--auth-source", CREDENTIALS, "127.0.0.1:{port}",
                                "127.0.0.1:%d" % target.getsockname()[1])
        assert_refused_once(proc, port, [], 401)
        assert_refused_once(proc, port, ["Authorization: Basic %%%"], 403)
        with pytest.raises(socket.timeout):
            target.accept()
    finally:
        target.close()


def test_slow_plugin_is_cut_off_with_503(websockify, echo_target, plugin_dir):
    proc, port = websockify("--workers", "1", "--connect-timeout", "1",
                            "--auth-plugin", "oldauth.Slow", "--auth-source", "30",
                            "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target,
                            env=plugin_env(plugin_dir))
    workers = worker_pids(proc)
    started = time.monotonic()
    assert_refused_once(proc, port, [], 503)
    assert time.monotonic() - started < 10
    assert children_of(proc.pid) == workers


# -- --web-auth -------------------------------------------------------------------------

@pytest.fixture
def web_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text("<p>private page</p>\n")
    return root


def test_web_auth_protects_static_files(websockify, echo_target, web_root):
    proc, port = websockify("--workers", "1", "--web", str(web_root), "--web-auth",
                            "--auth-plugin", "BasicHTTPAuth", "--auth-source", CREDENTIALS,
                            "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    before = log_size(proc)
    status, headers, body = http_get(port, "/index.html")
    assert status == 401
    assert headers["www-authenticate"] == 'Basic realm="Websockify"'
    assert b"private page" not in body
    refused = [line for line in new_lines(proc, before) if REFUSED.search(line)]
    assert len(refused) == 1 and " 401 " in refused[0], refused

    status, _, body = http_get(port, "/index.html", [basic("user:wrong")])
    assert status == 401 and b"private page" not in body
    status, _, body = http_get(port, "/index.html", ["Authorization: Basic ###"])
    assert status == 403 and b"private page" not in body

    status, _, body = http_get(port, "/index.html", [basic(CREDENTIALS)])
    assert status == 200
    assert body == b"<p>private page</p>\n"
    ws = RawWebSocket(port, extra=[basic(CREDENTIALS)])
    try:
        assert_echoes(ws)
    finally:
        ws.close()


def test_without_web_auth_static_files_are_open_but_websockets_are_not(
        websockify, echo_target, web_root):
    proc, port = websockify("--workers", "1", "--web", str(web_root),
                            "--auth-plugin", "BasicHTTPAuth", "--auth-source", CREDENTIALS,
                            "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    status, _, body = http_get(port, "/index.html")
    assert status == 200
    assert body == b"<p>private page</p>\n"
    headers = assert_refused_once(proc, port, [], 401)
    assert headers["www-authenticate"] == 'Basic realm="Websockify"'
    ws = RawWebSocket(port, extra=[basic(CREDENTIALS)])
    try:
        assert_echoes(ws)
    finally:
        ws.close()


# -- command line -------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--auth-source", "x"], "--auth-plugin"),
    (["--web-auth"], "--auth-plugin"),
    (["--web-auth", "--auth-source", "x"], "--auth-plugin"),
])
def test_auth_options_without_a_plugin_are_usage_errors(args, message):
    done = run_cli(*args, "127.0.0.1:%d" % free_port(), "127.0.0.1:1")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr
    assert "Traceback" not in done.stderr


# -- the plugins called directly, as 0.13's own tests and embedders call them ---------------

from tests.helpers import parameters  # noqa: E402
from websockify import auth_plugins  # noqa: E402

EMPTY = inspect.Parameter.empty

#: websockify 0.13's signatures, read from its auth_plugins.py.
AUTH_SIGNATURES_013 = {
    "BasePlugin": [("src", None)],
    "AuthenticationError": [("log_msg", None), ("response_code", 403),
                            ("response_headers", {}), ("response_msg", None)],
    "InvalidOriginError": [("expected", EMPTY), ("actual", EMPTY)],
    "BasicHTTPAuth": [("src", None)],
    "ExpectOrigin": [("src", None)],
    "ClientCertCNAuth": [("src", None)],
}


@pytest.mark.parametrize("name, expected", sorted(AUTH_SIGNATURES_013.items()))
def test_auth_plugins_have_013s_constructors(name, expected):
    cls = getattr(auth_plugins, name)
    assert parameters(cls) == expected
    if name not in ("AuthenticationError", "InvalidOriginError"):
        assert parameters(cls.authenticate)[1:4] == [
            ("headers", EMPTY), ("target_host", EMPTY), ("target_port", EMPTY)]


def test_basic_http_auth_called_directly():
    plugin = auth_plugins.BasicHTTPAuth("Aladdin:open sesame")
    assert plugin.src == "Aladdin:open sesame"
    # 0.13's own cases: a plain dict of headers
    plugin.authenticate({"Authorization": "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="},
                        "localhost", "1234")
    for headers, code in (({}, 401), ({"Authorization": "Basic QWxhZGRpbjpzZXNhbWUgc3RyZWV0"}, 401),
                          ({"Authorization": "Basic " + "x" * 28}, 403),
                          ({"Authorization": "Digest abc"}, 403)):
        with pytest.raises(auth_plugins.AuthenticationError) as info:
            plugin.authenticate(headers, "localhost", "1234")
        assert info.value.code == code, headers
        if code == 401:
            assert info.value.headers == {"WWW-Authenticate": 'Basic realm="Websockify"'}
    assert plugin.validate_creds("Aladdin", "open sesame") is True
    assert plugin.validate_creds("Aladdin", "sesame") is False
    assert auth_plugins.BasicHTTPAuth().validate_creds("a", "b") is False
    with pytest.raises(auth_plugins.AuthenticationError) as info:
        plugin.auth_error()
    assert info.value.code == 403
    with pytest.raises(auth_plugins.AuthenticationError) as info:
        plugin.demand_auth()
    assert info.value.code == 401


@pytest.mark.parametrize("cls, header, error", [
    (auth_plugins.ExpectOrigin, "Origin", auth_plugins.InvalidOriginError),
    (auth_plugins.ClientCertCNAuth, "SSL_CLIENT_S_DN_CN", auth_plugins.AuthenticationError),
])
def test_allow_list_plugins_called_directly(cls, header, error):
    plugin = cls("https://a.example bob")
    assert plugin.source == ["https://a.example", "bob"] and cls().source == []
    plugin.authenticate({header: "bob"}, "h", 1)
    for headers in ({}, {header: "eve"}):
        with pytest.raises(error) as info:
            plugin.authenticate(headers, "h", 1)
        assert info.value.code == 403 and info.value.headers == {}
        if error is auth_plugins.InvalidOriginError:
            assert (info.value.msg, info.value.expected_origin, info.value.actual_origin) == (
                "Invalid Origin", plugin.source, headers.get(header))


def test_authentication_error_as_013_builds_it():
    error = auth_plugins.AuthenticationError(response_msg="some_error")
    assert (error.code, error.msg, error.headers, str(error)) == (
        403, "some_error", {}, "403 some_error")
    error = auth_plugins.AuthenticationError("why", 401, {"WWW-Authenticate": "Basic"}, "hi")
    assert (error.code, error.headers, error.msg, str(error)) == (
        401, {"WWW-Authenticate": "Basic"}, "hi", "401 why")
    # the default headers are a fresh dict each time, not one shared by every error
    auth_plugins.AuthenticationError().headers["X"] = "y"
    assert auth_plugins.AuthenticationError().headers == {}
    assert auth_plugins.BasePlugin("x").source == "x"
    assert auth_plugins.BasePlugin().authenticate({}, "h", 1) is None
