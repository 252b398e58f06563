"""Token plugins: where the token comes from, every plugin, the answers, fail-fast, HUP.

End-to-end tests start ``python -m websockify`` with one worker and talk to
it over loopback; the targets are echo servers in this process (TCP on IPv4
and IPv6, and Unix sockets).  Plugin parsing rules are also checked on the
plugin objects directly, where a server adds nothing.
"""

import base64
import hashlib
import hmac
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import textwrap
import threading
import time
import urllib.parse

import pytest

from tests.helpers import (PYTHON, ROOT, RawWebSocket, children_of, echo_through, free_port,
                           ipv6_available, require_module, wait_for)
from websockify.plugins import tokens as tp
from websockify.demo.echo import echo_connection

TIMEOUT = 10.0


# -- targets and clients ------------------------------------------------------------

class EchoServer:
    """An echo target in this process: ("127.0.0.1"|"::1", port) or a Unix socket path."""

    def __init__(self, family=socket.AF_INET, address=("127.0.0.1", 0)):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if family != socket.AF_UNIX:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(address)
        self.sock.listen(64)
        self.address = self.sock.getsockname()
        self.port = self.address[1] if family != socket.AF_UNIX else None
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=echo_connection, args=(conn,), daemon=True).start()

    def close(self):
        self.sock.close()


@pytest.fixture
def echo4():
    server = EchoServer()
    yield server
    server.close()


def answer(port, path="/", extra=(), host="127.0.0.1"):
    """(status, body) of an upgrade request; the WebSocket is closed."""
    ws = RawWebSocket(port, path=path, extra=extra)
    try:
        if ws.status == 101:
            return 101, b""
        return ws.status, ws.buffer
    finally:
        ws.close()


def write(path, text, mode="w"):
    with open(str(path), mode) as handle:
        handle.write(text)
    return str(path)


def start_tokens(websockify, *args, **kwargs):
    proc, port = websockify("--workers", "1", *args, **kwargs)
    return proc, port


def assert_clean(proc):
    log = proc.log()
    assert "Traceback" not in log, log


def refusal_lines(proc, status):
    return [line for line in proc.log().splitlines()
            if re.search(r"refused '[^']*': %d " % status, line)]


# -- where the token comes from ---------------------------------------------------------

def test_token_from_query_anywhere_in_the_path_cookie_and_host():
    get = tp.token_from_request
    assert get({"QUERY_STRING": "token=abc"}, False) == "abc"
    assert get({"QUERY_STRING": "a=1&token=abc&token=def"}, False) == "abc"
    assert get({"QUERY_STRING": "token=a%2Fb%3D"}, False) == "a/b="
    # noVNC's ?path=websockify?token=x arrives with the token inside another parameter
    assert get({"QUERY_STRING": "path=websockify?token=xyz",
                "RAW_URI": "/x?path=websockify?token=xyz"}, False) == "xyz"
    assert get({"QUERY_STRING": "", "RAW_URI": "/", "HTTP_COOKIE": "a=b; token=ck"}, False) == "ck"
    assert get({"QUERY_STRING": "token=q", "HTTP_COOKIE": "token=ck"}, False) == "q"
    assert get({"QUERY_STRING": "", "RAW_URI": "/"}, False) is None
    assert get({"HTTP_HOST": "desk1.example.org:6080"}, True) == "desk1.example.org"
    assert get({"HTTP_HOST": "desk1"}, True) == "desk1"
    assert get({"HTTP_HOST": "[fd00::5]:6080"}, True) == "fd00::5"
    assert get({"HTTP_HOST": "[fd00::5]"}, True) == "fd00::5"
    assert get({"HTTP_HOST": "fd00::5"}, True) == "fd00::5"
    assert get({"QUERY_STRING": "token=abc"}, True) is None


def test_query_cookie_and_prefix_paths_end_to_end(websockify, echo4, tmp_path):
    cfg = write(tmp_path / "tokens.cfg", "alice: 127.0.0.1:%d\n" % echo4.port)
    proc, port = start_tokens(websockify, "--token-plugin", "TokenFile", "--token-source", cfg,
                              "{port}")
    echo_through(port, "/?token=alice")
    echo_through(port, "/novnc/websockify?token=alice")
    echo_through(port, "/?path=websockify?token=alice")
    echo_through(port, "/websockify", extra=["Cookie: theme=dark; token=alice"])
    status, body = answer(port, "/novnc/websockify?token=bob")
    assert status == 404 and body == b"unknown token\n"
    status, body = answer(port, "/novnc/websockify")
    assert status == 400 and b"no token" in body
    wait_for(lambda: len(refusal_lines(proc, 404)) == 1 and len(refusal_lines(proc, 400)) == 1,
             what="one log line per refusal")
    echo_through(port, "/?token=alice")
    assert_clean(proc)


def test_host_token_end_to_end(websockify, echo4, tmp_path):
    cfg = write(tmp_path / "tokens.cfg", "desk1.example.org: 127.0.0.1:%d\n" % echo4.port)
    proc, port = start_tokens(websockify, "--token-plugin", "TokenFile", "--token-source", cfg,
                              "--host-token", "{port}")
    from tests.helpers import handshake_request, read_http_response
    for host, expected in (("desk1.example.org:6080", 101), ("desk1.example.org", 101),
                           ("[::1]:6080", 404), ("other:1", 404)):
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        sock.sendall(handshake_request("/?token=ignored", host=host))
        status, _, _ = read_http_response(sock)
        sock.close()
        assert status == expected, host
    assert_clean(proc)


# -- command line ------------------------------------------------------------------------

def run_cli(*args, timeout=15):
    return subprocess.run([PYTHON, "-m", "websockify"] + [str(a) for a in args],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=ROOT))


@pytest.mark.parametrize("args, message", [
    (["--token-plugin", "TokenFile", "--token-source", "x", "6080", "127.0.0.1:5900"],
     "cannot be given with a token plugin"),
    (["--target-config", "x", "6080", "127.0.0.1:5900"], "cannot be given with a token plugin"),
    (["--token-source", "x", "6080", "127.0.0.1:5900"], "--token-plugin to use --token-source"),
    (["--host-token", "6080", "127.0.0.1:5900"], "--token-plugin to use --host-token"),
    (["--target-config", "x", "--token-plugin", "TokenFile", "6080"], "cannot be used together"),
    (["--token-plugin", "TokenFile", "--echo", "6080"], "cannot be used together"),
    (["--token-plugin", "TokenFile", "--unix-target", "/tmp/x", "6080"],
     "cannot be used together"),
])
def test_usage_errors(args, message):
    result = run_cli(*args)
    assert result.returncode == 2, result
    assert message in result.stderr


def test_help_documents_token_options():
    out = run_cli("--help").stdout
    for flag in ("--token-plugin", "--token-source", "--host-token", "--target-config"):
        assert flag in out
    section = out.split("  --target-config", 1)[1].split("  --auth-plugin")[0]
    assert "--host-token" in section and "not supported yet" not in section


@pytest.mark.parametrize("content, where, message", [
    (None, "tokens.cfg", "token file does not exist"),
    ("ok: 127.0.0.1:5900\n\nthis line is wrong\n", "tokens.cfg:3", "syntax error"),
    ("ok: 127.0.0.1:5900\r\nbad: 127.0.0.1:notaport\r\n", "tokens.cfg:2", "bad port"),
    ("ok: 127.0.0.1:99999\n", "tokens.cfg:1", "out of range"),
    ("ok: unix_socket:\n", "tokens.cfg:1", "needs a path"),
])
def test_bad_token_file_fails_at_start(tmp_path, content, where, message):
    path = tmp_path / "tokens.cfg"
    if content is not None:
        write(path, content)
    result = run_cli("--token-plugin", "TokenFile", "--token-source", path, free_port())
    assert result.returncode == 5, result
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    assert str(tmp_path / where) in errors[0] and message in errors[0], errors
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--token-plugin", "TokenFileName", "--token-source", "/nonexistent/dir"], "needs a directory"),
    (["--token-plugin", "UnixDomainSocketDirectory", "--token-source", "/nonexistent"],
     "needs a directory"),
    (["--token-plugin", "JWTTokenApi", "--token-source", "/nonexistent/key"], "/nonexistent/key"),
    (["--token-plugin", "JSONTokenApi", "--token-source", "http://127.0.0.1/x"], "%s"),
    (["--token-plugin", "TokenRedis", "--token-source", "127.0.0.1:notaport"], "TokenRedis"),
    (["--token-plugin", "SignedTarget", "--token-source", "/nonexistent.conf"], "/nonexistent.conf"),
    (["--token-plugin", "NoSuchPlugin"], "has no 'NoSuchPlugin'"),
    (["--token-plugin", "no_such_module.Plugin"], "cannot import module no_such_module"),
    (["--token-plugin", "TokenFile"], "needs --token-source"),
])
def test_bad_plugin_or_source_fails_at_start(args, message):
    result = run_cli(*(args + [free_port()]))
    assert result.returncode == 5, result
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_target_config_is_a_deprecated_token_file(websockify, echo4, tmp_path):
    cfg = write(tmp_path / "tokens.cfg", "t1: 127.0.0.1:%d\n" % echo4.port)
    proc, port = start_tokens(websockify, "--target-config", cfg, "{port}")
    echo_through(port, "/?token=t1")
    assert "--target-config is deprecated" in proc.log()


# -- token files ----------------------------------------------------------------------------

def test_token_file_format(tmp_path, caplog):
    path = write(tmp_path / "tokens.cfg",
                 "\ufeff# comment\r\n\r\n   \r\n"
                 "a: 127.0.0.1:5900\r\n"
                 "b:\t10.0.0.1:5901\n"
                 "v6: ::1:5902\n"
                 "v6b: [fd00::1]:5903\n"
                 "sock: unix_socket:/run/vnc/1.sock\n"
                 "  indented: host.example:5904  \n"
                 "a: 127.0.0.1:5999\n")
    with caplog.at_level("WARNING", logger="websockify"):
        plugin = tp.TokenFile(path)
        plugin.check()
    # lookup() gives the target as written, split at the last colon (0.13)
    assert plugin.lookup("a") == ["127.0.0.1", "5999"]
    assert plugin.lookup("b") == ["10.0.0.1", "5901"]
    assert plugin.lookup("v6") == ["::1", "5902"]
    assert plugin.lookup("v6b") == ["[fd00::1]", "5903"]
    assert plugin.lookup("sock") == ["unix_socket", "/run/vnc/1.sock"]
    assert plugin.lookup("indented") == ["host.example", "5904"]
    assert plugin.lookup("missing") is None
    # the server's target from each
    assert tp.target_from_result(plugin.lookup("v6b")) == ("fd00::1", 5903)
    assert tp.target_from_result(plugin.lookup("sock")) == ("unix_socket", "/run/vnc/1.sock")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "'a'" in warnings[0] and "last one wins" in warnings[0]
    assert "tokens.cfg:10" in warnings[0] and "tokens.cfg:4" in warnings[0]


def test_token_directory(tmp_path):
    write(tmp_path / "a.cfg", "a: 127.0.0.1:1\nshared: 127.0.0.1:2\n")
    write(tmp_path / "b.cfg", "b: 127.0.0.1:3\nshared: 127.0.0.1:4\n")
    write(tmp_path / ".hidden", "garbage that would not parse\n")
    write(tmp_path / "b.cfg~", "garbage\n")
    os.mkdir(str(tmp_path / "sub"))
    write(tmp_path / "sub" / "c.cfg", "c: 127.0.0.1:5\n")
    plugin = tp.TokenFile(str(tmp_path))
    plugin.check()
    assert plugin.lookup("a") == ["127.0.0.1", "1"]
    assert plugin.lookup("b") == ["127.0.0.1", "3"]
    assert plugin.lookup("shared") == ["127.0.0.1", "4"]
    assert plugin.lookup("c") is None
    # a new file in the directory is seen at once
    write(tmp_path / "d.cfg", "d: 127.0.0.1:6\n")
    assert plugin.lookup("d") == ["127.0.0.1", "6"]


def test_token_file_reread_on_change_not_parsed_per_lookup(tmp_path, monkeypatch):
    path = write(tmp_path / "tokens.cfg", "a: 127.0.0.1:1\n")
    plugin = tp.TokenFile(path)
    plugin.check()
    parses = []
    original = plugin._parse
    monkeypatch.setattr(plugin, "_parse", lambda files: parses.append(1) or original(files))
    for _ in range(50):
        assert plugin.lookup("a") == ["127.0.0.1", "1"]
        assert plugin.lookup("nope") is None
    assert parses == []
    write(path, "a: 127.0.0.1:2\n")              # same size, within the same second
    assert plugin.lookup("a") == ["127.0.0.1", "2"]
    assert plugin.lookup("nope") is None
    assert len(parses) == 1


def test_token_file_broken_while_running_keeps_last_good_table(tmp_path, caplog):
    path = write(tmp_path / "tokens.cfg", "a: 127.0.0.1:1\n")
    plugin = tp.TokenFile(path)
    plugin.check()
    write(path, "a: 127.0.0.1:1\nthis is broken\n")
    with caplog.at_level("INFO", logger="websockify"):
        for _ in range(20):
            assert plugin.lookup("a") == ["127.0.0.1", "1"]
            assert plugin.lookup("b") is None
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    assert "tokens.cfg:2" in errors[0] and "keeping the last good table" in errors[0]
    os.unlink(path)
    assert plugin.lookup("a") == ["127.0.0.1", "1"]
    write(path, "b: 127.0.0.1:3\n")
    assert plugin.lookup("b") == ["127.0.0.1", "3"]
    assert plugin.lookup("a") is None


def test_read_only_token_file_is_read_once(tmp_path):
    # Read at the first lookup (as 0.13) or by check() at start, never again.
    path = write(tmp_path / "tokens.cfg", "a: 127.0.0.1:1\n")
    plugin = tp.ReadOnlyTokenFile(path)
    write(path, "b: 127.0.0.1:2\n")
    assert plugin.lookup("b") == ["127.0.0.1", "2"]
    write(path, "a: 127.0.0.1:1\n")
    assert plugin.lookup("b") == ["127.0.0.1", "2"]
    assert plugin.lookup("a") is None
    checked = tp.ReadOnlyTokenFile(path)
    checked.check()
    write(path, "c: 127.0.0.1:3\n")
    assert checked.lookup("a") == ["127.0.0.1", "1"]
    assert checked.lookup("c") is None


def test_token_file_targets_end_to_end(websockify, echo4, tmp_path):
    """IPv4, IPv6 (both spellings) and unix_socket: targets through the server."""
    unix_path = str(tmp_path / "target.sock")
    unix_echo = EchoServer(socket.AF_UNIX, unix_path)
    lines = ["# targets", "", "v4: 127.0.0.1:%d" % echo4.port, "sock: unix_socket:%s" % unix_path]
    echo6 = None
    if ipv6_available():
        echo6 = EchoServer(socket.AF_INET6, ("::1", 0))
        lines += ["v6: ::1:%d" % echo6.port, "v6b: [::1]:%d" % echo6.port]
    cfg = write(tmp_path / "tokens.cfg", "\r\n".join(lines) + "\r\n")
    try:
        proc, port = start_tokens(websockify, "--token-plugin", "TokenFile", "--token-source",
                                  cfg, "{port}")
        echo_through(port, "/?token=v4")
        echo_through(port, "/?token=sock")
        if echo6:
            echo_through(port, "/?token=v6")
            echo_through(port, "/?token=v6b")
        assert_clean(proc)
    finally:
        unix_echo.close()
        if echo6:
            echo6.close()


def test_token_file_changes_while_running(websockify, echo4, tmp_path):
    cfg = write(tmp_path / "tokens.cfg", "a: 127.0.0.1:%d\n" % echo4.port)
    proc, port = start_tokens(websockify, "--token-plugin", "TokenFile", "--token-source", cfg,
                              "{port}")
    echo_through(port, "/?token=a")
    write(cfg, "a: 127.0.0.1:%d\nb: 127.0.0.1:%d\n" % (echo4.port, echo4.port))
    echo_through(port, "/?token=b")           # new token: seen at once
    write(cfg, "a: 127.0.0.1:%d\nbroken line\n" % echo4.port)
    for _ in range(3):
        assert answer(port, "/?token=unknown")[0] == 404   # a miss checks the file
        echo_through(port, "/?token=b")       # last good table
    time.sleep(1.1)                           # past the plugin's 1 s check interval
    echo_through(port, "/?token=b")           # the periodic check: no second error
    proc.wait_log(r"ERROR .*tokens\.cfg:2: syntax error.*keeping the last good table")
    assert len([l for l in proc.log().splitlines() if " ERROR " in l]) == 1
    assert_clean(proc)


def test_hup_reloads_token_source_without_dropping_sessions(websockify, echo4, tmp_path):
    cfg = write(tmp_path / "tokens.cfg", "old: 127.0.0.1:%d\n" % echo4.port)
    proc, port = start_tokens(websockify, "--token-plugin", "ReadOnlyTokenFile",
                              "--token-source", cfg, "{port}")
    ws = RawWebSocket(port, path="/?token=old")
    assert ws.status == 101
    write(cfg, "new: 127.0.0.1:%d\n" % echo4.port)
    assert answer(port, "/?token=new")[0] == 404      # read-only: not yet
    before = children_of(proc.pid)
    proc.signal(signal.SIGHUP)
    proc.wait_log(r"token plugin ReadOnlyTokenFile reloaded")
    wait_for(lambda: answer(port, "/?token=new")[0] == 101, what="new token after HUP")
    ws.send_binary(b"still open")
    assert ws.recv_data(10) == b"still open"          # the old session survived
    ws.close()
    # The old worker leaves with its session: one worker, the reloaded one.
    reloaded = wait_for(lambda: (lambda kids: kids if len(kids) == 1 else None)(
        children_of(proc.pid)), what="the old worker to leave")
    assert set(reloaded).isdisjoint(before)
    # a broken file on HUP keeps the previous configuration, in new workers too
    write(cfg, "nonsense\n")
    proc.signal(signal.SIGHUP)
    proc.wait_log(r"ERROR .*tokens\.cfg:1: syntax error.*keep the previous token configuration")
    wait_for(lambda: (lambda kids: len(kids) == 1 and kids[0] not in reloaded)(
        children_of(proc.pid)), what="the worker replaced after the second HUP")
    assert answer(port, "/?token=new")[0] == 101
    assert proc.proc.poll() is None


# -- plugins written for websockify 0.13 ----------------------------------------------------

WILD_PLUGINS = '''
import json
from websockify.token_plugins import BasePlugin, TokenFile


class ListPlugin(BasePlugin):
    """The style of plugins in the wild: a list, the port a string."""
    def lookup(self, token):
        if token == "good":
            return [self.source.split(":")[0], self.source.split(":")[1]]
        return None


class TuplePlugin(BasePlugin):
    def __init__(self, src):
        super().__init__(src)
        self.port = int(src)

    def lookup(self, token):
        return ("127.0.0.1", self.port) if token.startswith("ok") else None


class RaisingPlugin(BasePlugin):
    def lookup(self, token):
        raise ValueError("token %s is on the deny list" % token)


class BadResultPlugin(BasePlugin):
    def lookup(self, token):
        return "nonsense"


class MalformedPlugin(BasePlugin):
    """lookup() answers that are no target: the server must refuse each (502)."""
    RESULTS = {"notaport": ("127.0.0.1", "notaport"), "range": ("127.0.0.1", 70000),
               "zero": ("127.0.0.1", 0), "negative": ("127.0.0.1", -1),
               "service": ("127.0.0.1", "ssh"), "float": ("127.0.0.1", 5900.0),
               "bool": ("127.0.0.1", True), "nonsense": "nonsense", "int": 42,
               "nonehost": (None, 5900), "inthost": (127, 5900), "emptyhost": ("", 5900),
               "three": ("a", "b", "c"), "one": ["h"], "remote": ["remote_host", "remote_port"],
               "dict": {"nohost": 1}, "unixnopath": ("unix_socket", ""),
               "unixint": ("unix_socket", 5)}

    def lookup(self, token):
        return self.RESULTS.get(token)


class MyTokenFile(TokenFile):
    def lookup(self, token):
        return super().lookup(token.lower())


class ExitingPlugin(BasePlugin):
    def __init__(self, src):
        import sys
        sys.exit()
'''


@pytest.fixture
def wild(tmp_path):
    write(tmp_path / "wildplugins.py", WILD_PLUGINS)
    return {"PYTHONPATH": "%s%s%s" % (ROOT, os.pathsep, tmp_path)}


def test_plugins_from_the_wild_work_unchanged(websockify, echo4, tmp_path, wild):
    proc, port = start_tokens(websockify, "--token-plugin", "wildplugins.ListPlugin",
                              "--token-source", "127.0.0.1:%d" % echo4.port, "{port}", env=wild)
    echo_through(port, "/?token=good")
    assert answer(port, "/?token=bad")[0] == 404
    assert_clean(proc)


def test_tuple_plugin_and_token_file_subclass(websockify, echo4, tmp_path, wild):
    proc, port = start_tokens(websockify, "--token-plugin", "wildplugins.TuplePlugin",
                              "--token-source", str(echo4.port), "{port}", env=wild)
    echo_through(port, "/?token=ok1")
    cfg = write(tmp_path / "t.cfg", "abc: 127.0.0.1:%d\n" % echo4.port)
    proc2, port2 = start_tokens(websockify, "--token-plugin", "wildplugins.MyTokenFile",
                                "--token-source", cfg, "{port}", env=wild)
    echo_through(port2, "/?token=ABC")


def test_raising_plugin_is_500_one_line_worker_lives(websockify, echo4, wild):
    proc, port = start_tokens(websockify, "--token-plugin", "wildplugins.RaisingPlugin",
                              "{port}", env=wild)
    # The master listens before it forks: wait for the worker.
    pids = wait_for(lambda: children_of(proc.pid), what="the worker")
    for _ in range(5):
        status, body = answer(port, "/?token=x")
        # The plugin's own words stay in the log, not in the answer.
        assert (status, body.strip()) == (500, b"token plugin failed")
    wait_for(lambda: len(refusal_lines(proc, 500)) == 5, what="one line per refusal")
    line = refusal_lines(proc, 500)[0]
    assert "ValueError: token x is on the deny list" in line
    assert children_of(proc.pid) == pids
    assert_clean(proc)
    proc2, port2 = start_tokens(websockify, "--token-plugin", "wildplugins.BadResultPlugin",
                                "{port}", env=wild)
    assert answer(port2, "/?token=x")[0] == 502


def test_malformed_lookup_results_are_502_with_one_line_each(websockify, wild):
    namespace = {}
    exec(WILD_PLUGINS, namespace)          # the plugin's table, read here as the server reads it
    tokens = sorted(namespace["MalformedPlugin"].RESULTS)
    proc, port = start_tokens(websockify, "--token-plugin", "wildplugins.MalformedPlugin",
                              "{port}", env=wild)
    # The master listens before it forks: wait for the worker.
    pids = wait_for(lambda: children_of(proc.pid), what="the worker")
    for token in tokens:
        status, body = answer(port, "/?token=" + token)
        assert status == 502 and b"unusable target" in body, (token, status, body)
    wait_for(lambda: len(refusal_lines(proc, 502)) == len(tokens), what="one line per token")
    assert len(refusal_lines(proc, 502)) == len(tokens)
    assert answer(port, "/?token=unknown")[0] == 404
    assert children_of(proc.pid) == pids
    assert_clean(proc)


def test_plugin_that_exits_in_init_fails_at_start(wild):
    result = subprocess.run([PYTHON, "-m", "websockify", "--token-plugin",
                             "wildplugins.ExitingPlugin", str(free_port())],
                            capture_output=True, text=True, cwd=ROOT, timeout=15,
                            env=dict(os.environ, **wild))
    assert result.returncode == 5 and "ExitingPlugin" in result.stderr


def test_lookup_results_accepted():
    norm = tp.target_from_result
    assert norm(["h", "5900"]) == ("h", 5900)
    assert norm(("h", 5900)) == ("h", 5900)
    assert norm(["h", b"5900"]) == ("h", 5900)          # 0.13's BaseTokenAPI
    assert norm(["[::1]", "5900"]) == ("::1", 5900)
    assert norm(["unix_socket", "/run/x.sock"]) == ("unix_socket", "/run/x.sock")
    assert norm("h:5900") == ("h", 5900)
    for bad in (["h"], ["h", "x"], ["h", 0], ["h", 70000], ["", 1], 5, ["h", True]):
        with pytest.raises(ValueError):
            norm(bad)


def test_token_plugins_module_has_websockify_names():
    import websockify.token_plugins as m
    for name in ("BasePlugin", "ReadOnlyTokenFile", "TokenFile", "TokenFileName",
                 "BaseTokenAPI", "JSONTokenApi", "JWTTokenApi", "TokenRedis",
                 "UnixDomainSocketDirectory", "parse_source_args", "SignedTarget"):
        assert hasattr(m, name), name
    assert m.parse_source_args('a:b:"c:d":e') == ["a", "b", "c:d", "e"]
    assert m.parse_source_args("host:::pw") == ["host", "", "", "pw"]
    assert m.parse_source_args('h::::"ns1:ns2"') == ["h", "", "", "", "ns1:ns2"]


def test_every_registered_plugin_is_a_bare_name():
    from websockify.plugins.loader import load_class
    import websockify.token_plugins as m
    for name, cls in tp.PLUGINS.items():
        assert load_class(name, tp.DEFAULT_MODULE, "token plugin") is cls
        assert name in m.__all__


# -- TokenFileName and UnixDomainSocketDirectory ------------------------------------------

def test_token_file_name(tmp_path):
    d = tmp_path / "tokens"
    d.mkdir()
    write(d / "alice", "127.0.0.1:5900\n")
    write(d / "v6", "[::1]:5901")
    write(d / "garbage", "not a target")
    write(tmp_path / "secret", "10.0.0.1:22\n")
    plugin = tp.TokenFileName(str(d))
    assert plugin.lookup("alice") == ["127.0.0.1", "5900"]
    assert plugin.lookup("v6") == ["[::1]", "5901"]
    assert plugin.lookup("nobody") is None
    for bad in ("../secret", "..", "a/../../secret", "/etc/passwd", ".hidden", "a\\b"):
        assert plugin.lookup(bad) is None
        with pytest.raises(tp.TokenRefused):
            plugin.resolve(bad)
    # what the file holds, which the server refuses (502)
    assert plugin.lookup("garbage") == ["not a target"]
    with pytest.raises(ValueError):
        tp.target_from_result(plugin.lookup("garbage"))
    write(d / "remote", "remote_host:remote_port\n")
    write(d / "sock", "unix_socket:/run/x.sock")
    assert plugin.lookup("remote") == ["remote_host", "remote_port"]
    assert plugin.lookup("sock") == ["unix_socket", "/run/x.sock"]
    # 0.13 refuses a source that is not a directory when it is built
    with pytest.raises(tp.SourceError, match="needs a directory"):
        tp.TokenFileName(str(d / "alice"))


def test_token_file_name_end_to_end(websockify, echo4, tmp_path):
    d = tmp_path / "tokens"
    d.mkdir()
    write(d / "alice", "127.0.0.1:%d\n" % echo4.port)
    write(d / "remote", "remote_host:remote_port\n")
    write(tmp_path / "outside", "127.0.0.1:%d\n" % echo4.port)
    proc, port = start_tokens(websockify, "--token-plugin", "TokenFileName", "--token-source",
                              str(d), "{port}")
    echo_through(port, "/?token=alice")
    assert answer(port, "/?token=..%2Foutside")[0] == 403
    assert answer(port, "/?token=bob")[0] == 404
    status, body = answer(port, "/?token=remote")
    assert status == 502 and b"bad port 'remote_port'" in body
    assert_clean(proc)


def test_unix_domain_socket_directory(websockify, tmp_path):
    d = tmp_path / "socks"
    d.mkdir()
    target = EchoServer(socket.AF_UNIX, str(d / "desk1"))
    outside = EchoServer(socket.AF_UNIX, str(tmp_path / "outside"))
    write(d / "plainfile", "x")
    os.symlink(str(tmp_path / "outside"), str(d / "link"))
    try:
        plugin = tp.UnixDomainSocketDirectory(str(d))
        assert plugin.lookup("desk1") == ["unix_socket", os.path.abspath(str(d / "desk1"))]
        assert plugin.lookup("plainfile") is None
        assert plugin.lookup("nothing") is None
        # "link": a symlink that leaves the directory
        for bad in ("../outside", "..", "x/../../outside", "link"):
            assert plugin.lookup(bad) is None
            with pytest.raises(tp.TokenRefused):
                plugin.resolve(bad)
        proc, port = start_tokens(websockify, "--token-plugin", "UnixDomainSocketDirectory",
                                  "--token-source", str(d), "{port}")
        echo_through(port, "/?token=desk1")
        assert answer(port, "/?token=..%2Foutside")[0] == 403
        assert answer(port, "/?token=nothing")[0] == 404
        assert_clean(proc)
    finally:
        target.close()
        outside.close()


# -- HTTP APIs -------------------------------------------------------------------------------

class TokenAPI:
    """A token API in this process that records the paths it was asked for."""

    def __init__(self, table, delay=0.0):
        self.paths = []
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                api.paths.append(self.path)
                if delay:
                    time.sleep(delay)
                token = urllib.parse.unquote(self.path.rsplit("/", 1)[1])
                if token == "crash":
                    self.send_response(500)
                    self.end_headers()
                    return
                body = table.get(token)
                self.send_response(200 if body is not None else 404)
                self.end_headers()
                if body is not None:
                    try:
                        self.wfile.write(body.encode())
                    except OSError:
                        pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_json_token_api(websockify, echo4):
    api = TokenAPI({"desk 1/x": json.dumps({"host": "127.0.0.1", "port": echo4.port}),
                    "strport": json.dumps({"host": "127.0.0.1", "port": str(echo4.port)}),
                    "remote": json.dumps({"host": "remote_host", "port": "remote_port"}),
                    "broken": "{not json"})
    try:
        proc, port = start_tokens(websockify, "--token-plugin", "JSONTokenApi", "--token-source",
                                  "http://127.0.0.1:%d/tokens/%%s" % api.port, "{port}")
        echo_through(port, "/?token=desk%201%2Fx")
        assert "/tokens/desk%201%2Fx" in api.paths          # URL-escaped
        echo_through(port, "/?token=strport")
        assert answer(port, "/?token=unknown")[0] == 404
        assert answer(port, "/?token=broken")[0] == 502
        assert answer(port, "/?token=remote")[0] == 502
        assert answer(port, "/?token=crash")[0] == 503
        assert_clean(proc)
    finally:
        api.close()


def test_base_token_api_and_api_down(websockify, echo4):
    api = TokenAPI({"t": "127.0.0.1:%d" % echo4.port})
    try:
        proc, port = start_tokens(websockify, "--token-plugin", "BaseTokenAPI", "--token-source",
                                  "http://127.0.0.1:%d/%%s" % api.port, "{port}")
        echo_through(port, "/?token=t")
    finally:
        api.close()
    status, body = answer(port, "/?token=t")
    assert status == 503 and b"unreachable" in body
    wait_for(lambda: refusal_lines(proc, 503), what="a 503 line")
    assert_clean(proc)


def test_slow_token_api_gets_503_within_the_deadline(websockify, echo4):
    api = TokenAPI({"t": "127.0.0.1:%d" % echo4.port}, delay=4)
    try:
        proc, port = start_tokens(websockify, "--connect-timeout", "1", "--token-plugin",
                                  "BaseTokenAPI", "--token-source",
                                  "http://127.0.0.1:%d/%%s" % api.port, "{port}")
        started = time.time()
        status, body = answer(port, "/?token=t")
        assert status == 503 and time.time() - started < 3
    finally:
        api.close()


# -- JWT -------------------------------------------------------------------------------------

try:
    from jwcrypto import jwk, jwt
except ImportError:  # the jwt extra is not installed: the keys fixture says so
    jwk = jwt = None


def make_jwt(key, claims, alg):
    token = jwt.JWT(header={"alg": alg}, claims=claims)
    token.make_signed_token(key)
    return token.serialize()


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture
def keys(tmp_path):
    require_module("jwcrypto", "pip install 'websockify[jwt]'")
    secret = b"a shared secret of some length!!"
    rsa = jwk.JWK.generate(kty="RSA", size=2048)
    ec = jwk.JWK.generate(kty="EC", crv="P-256")
    # websockify 0.13's shared-secret file: the secret's base64url text
    paths = {"hs": write(tmp_path / "hs.key", b64(secret) + "\n"),
             "rs": write(tmp_path / "rs.pem", rsa.export_to_pem(private_key=True, password=None),
                         "wb"),
             "es": write(tmp_path / "es.pem", ec.export_to_pem(private_key=True, password=None),
                         "wb")}
    oct_key = jwk.JWK(kty="oct", k=b64(secret))
    return paths, {"hs": oct_key, "rs": rsa, "es": ec}


def test_jwt_token_api(keys):
    paths, k = keys
    now = time.time()
    good = {"host": "127.0.0.1", "port": 5900}
    for name, alg in (("hs", "HS256"), ("rs", "RS256"), ("es", "ES256")):
        plugin = tp.JWTTokenApi(paths[name])
        assert plugin.lookup(make_jwt(k[name], good, alg)) == ("127.0.0.1", 5900)
        assert plugin.lookup(make_jwt(k[name], dict(good, port="5901", nbf=now - 5,
                                                   exp=now + 60), alg)) == ("127.0.0.1", "5901")
    plugin = tp.JWTTokenApi(paths["hs"])
    cases = {
        "expired": make_jwt(k["hs"], dict(good, exp=now - 1), "HS256"),
        "not yet valid": make_jwt(k["hs"], dict(good, nbf=now + 600), "HS256"),
        "other key": make_jwt(jwk.JWK.generate(kty="oct", size=256), good, "HS256"),
        "alg none": "%s.%s." % (b64(b'{"alg":"none","typ":"JWT"}'),
                                b64(json.dumps(good).encode())),
        "no target": make_jwt(k["hs"], {"sub": "x"}, "HS256"),
        "garbage": "not.a.jwt",
    }
    for what, token in cases.items():
        assert plugin.lookup(token) is None, what
        with pytest.raises(tp.TokenRefused):
            plugin.resolve(token)
            pytest.fail(what)
    # an RS256 token checked with the public key only
    pub_path = paths["rs"] + ".pub"
    write(pub_path, k["rs"].export_to_pem(), "wb")
    assert tp.JWTTokenApi(pub_path).lookup(make_jwt(k["rs"], good, "RS256")) == ("127.0.0.1", 5900)
    # HS256 signed with the RSA public key bytes (algorithm confusion) is refused
    confused = make_jwt(jwk.JWK(kty="oct", k=b64(k["rs"].export_to_pem())), good, "HS256")
    assert tp.JWTTokenApi(pub_path).lookup(confused) is None
    with pytest.raises(tp.TokenRefused):
        tp.JWTTokenApi(pub_path).resolve(confused)


def test_jwe_token(keys):
    paths, k = keys
    inner = make_jwt(k["hs"], {"host": "10.0.0.7", "port": 5902}, "HS256")
    outer = jwt.JWT(header={"alg": "A256KW", "enc": "A256CBC-HS512"}, claims=inner)
    outer.make_encrypted_token(k["hs"])
    assert tp.JWTTokenApi(paths["hs"]).lookup(outer.serialize()) == ("10.0.0.7", 5902)
    # RSA: encrypted to the server's key, inner token signed by the same key
    inner = make_jwt(k["rs"], {"host": "10.0.0.8", "port": 5903}, "RS256")
    outer = jwt.JWT(header={"alg": "RSA-OAEP-256", "enc": "A256GCM"}, claims=inner)
    outer.make_encrypted_token(k["rs"])
    assert tp.JWTTokenApi(paths["rs"]).lookup(outer.serialize()) == ("10.0.0.8", 5903)
    # an encrypted token that holds bare claims (anyone with the public key could make it)
    bare = jwt.JWT(header={"alg": "RSA-OAEP-256", "enc": "A256GCM"},
                   claims={"host": "10.0.0.9", "port": 1})
    bare.make_encrypted_token(k["rs"])
    assert tp.JWTTokenApi(paths["rs"]).lookup(bare.serialize()) is None
    with pytest.raises(tp.TokenRefused):
        tp.JWTTokenApi(paths["rs"]).resolve(bare.serialize())


def test_jwt_end_to_end(websockify, echo4, keys):
    paths, k = keys
    proc, port = start_tokens(websockify, "--token-plugin", "JWTTokenApi", "--token-source",
                              paths["es"], "{port}")
    echo_through(port, "/?token=" + make_jwt(k["es"], {"host": "127.0.0.1",
                                                       "port": echo4.port}, "ES256"))
    expired = make_jwt(k["es"], {"host": "127.0.0.1", "port": echo4.port,
                                 "exp": time.time() - 10}, "ES256")
    status, body = answer(port, "/?token=" + expired)
    assert status == 403 and b"expired" in body
    early = make_jwt(k["es"], {"host": "127.0.0.1", "port": echo4.port,
                               "nbf": time.time() + 600}, "ES256")
    status, body = answer(port, "/?token=" + early)
    assert status == 403 and b"not valid yet" in body
    other = make_jwt(jwk.JWK.generate(kty="EC", crv="P-256"),
                     {"host": "127.0.0.1", "port": echo4.port}, "ES256")
    assert answer(port, "/?token=" + other)[0] == 403
    # a signed target the server cannot use
    remote = make_jwt(k["es"], {"host": "remote_host", "port": "remote_port"}, "ES256")
    assert answer(port, "/?token=" + remote)[0] == 502
    assert_clean(proc)


# -- SignedTarget and websockify-sign ------------------------------------------------------------

@pytest.fixture
def signed(tmp_path):
    write(tmp_path / "sign.key", base64.b64encode(os.urandom(32)).decode() + "\n")
    conf = write(tmp_path / "signed.conf", textwrap.dedent("""\
        # SignedTarget configuration
        secret sign.key
        allow 127.0.0.0/8 1024-65535
        allow ::1 5900-5999   # one address
        """))
    return conf


def sign(*args):
    result = subprocess.run([PYTHON, "-m", "websockify.sign"] + [str(a) for a in args],
                            capture_output=True, text=True, cwd=ROOT, timeout=15,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    return result


def test_signed_target_plugin(signed, tmp_path):
    plugin = tp.SignedTarget(signed)
    secret = plugin.secret
    good = tp.sign_target(secret, "127.0.0.1", 5901, 60)
    assert plugin.lookup(good) == ("127.0.0.1", 5901)
    assert plugin.lookup(tp.sign_target(secret, "::1", 5901, 60)) == ("::1", 5901)
    refused = {
        "expired": tp.sign_target(secret, "127.0.0.1", 5901, -1),
        "outside network": tp.sign_target(secret, "10.0.0.1", 5901, 60),
        "outside ports": tp.sign_target(secret, "::1", 6000, 60),
        "privileged port": tp.sign_target(secret, "127.0.0.1", 22, 60),
        "other secret": tp.sign_target(b"x" * 32, "127.0.0.1", 5901, 60),
        "not signed": "127.0.0.1:5901",
    }
    head, payload, mac = good.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=="))
    data["p"] = 5902
    refused["altered payload"] = "%s.%s.%s" % (head, b64(json.dumps(data).encode()), mac)
    refused["altered mac"] = "%s.%s.%s" % (head, payload, mac[:-2] + ("AA" if mac[-2:] != "AA" else "BB"))
    for what, token in refused.items():
        assert plugin.lookup(token) is None, what
        with pytest.raises(tp.TokenRefused):
            plugin.resolve(token)
            pytest.fail(what)
    # a host name cannot be signed into an allowed target
    with pytest.raises(tp.TokenRefused):
        plugin.resolve(tp.sign_target(secret, "localhost", 5901, 60))


def test_signed_target_nothing_allowed_until_configured(tmp_path):
    write(tmp_path / "k", "0123456789abcdef0123456789abcdef")
    conf = write(tmp_path / "c.conf", "secret k\n")
    plugin = tp.SignedTarget(conf)
    with pytest.raises(tp.TokenRefused):
        plugin.resolve(tp.sign_target(plugin.secret, "127.0.0.1", 5901, 60))


@pytest.mark.parametrize("content, where", [
    ("allow 127.0.0.0/8 5900\n", "no 'secret FILE' line"),
    ("secret k\nallow 300.0.0.0/8 5900\n", "c.conf:2: bad allow line"),
    ("secret k\nallow 127.0.0.1 5900-80\n", "c.conf:2: bad allow line"),
    ("secret k\nmystery line\n", "c.conf:2: expected"),
    ("secret missing.key\n", "missing.key: cannot read secret file"),
    ("secret short\n", "short: secret is too short"),
])
def test_signed_target_bad_config(tmp_path, content, where):
    write(tmp_path / "k", "0123456789abcdef0123456789abcdef")
    write(tmp_path / "short", "abc")
    conf = write(tmp_path / "c.conf", content)
    plugin = tp.SignedTarget(conf)              # builds: check() refuses the source
    with pytest.raises(tp.SourceError) as info:
        plugin.check()
    assert where in str(info.value)
    assert plugin.lookup(tp.sign_target(b"k" * 32, "127.0.0.1", 5901, 60)) is None


def test_websockify_sign_and_server(websockify, echo4, signed, tmp_path):
    proc, port = start_tokens(websockify, "--token-plugin", "SignedTarget", "--token-source",
                              signed, "{port}")
    result = sign("--config", signed, "--lifetime", "5m", "127.0.0.1:%d" % echo4.port)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    echo_through(port, "/?token=" + token)
    # a URL for noVNC: the token rides in the WebSocket path
    result = sign("--config", signed, "--url",
                  "http://example.org/novnc/vnc.html?path=novnc/websockify",
                  "127.0.0.1:%d" % echo4.port)
    assert result.stdout.startswith(
        "http://example.org/novnc/vnc.html?path=novnc/websockify%3Ftoken=v1.")
    result = sign("--secret-file", str(tmp_path / "sign.key"), "--url", "http://h/ws",
                  "127.0.0.1:%d" % echo4.port)
    assert result.stdout.startswith("http://h/ws?token=v1.")
    # the signer refuses what the server would refuse
    result = sign("--config", signed, "10.9.9.9:5900")
    assert result.returncode != 0 and "allow-list" in result.stderr
    # what the server refuses: outside the allow-list, expired
    outside = sign("--secret-file", str(tmp_path / "sign.key"), "10.9.9.9:5900").stdout.strip()
    status, body = answer(port, "/?token=" + outside)
    assert status == 403 and b"outside the allow-list" in body
    secret = tp.SignedTarget(signed).secret
    expired = tp.sign_target(secret, "127.0.0.1", echo4.port, -5)
    status, body = answer(port, "/?token=" + expired)
    assert status == 403 and b"expired" in body
    assert sign("--config", signed, "--lifetime", "soon", "127.0.0.1:1").returncode == 2
    assert_clean(proc)


def documented_token(secret: bytes, host: str, port: int, expires: int) -> str:
    """A SignedTarget token made as the README describes it, without the project's
    code: v1.PAYLOAD.MAC, PAYLOAD the unpadded base64url of {"h", "p", "e"} JSON,
    MAC the unpadded base64url of HMAC-SHA256(secret, "v1." + PAYLOAD)."""
    def unpadded(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
    payload = unpadded(json.dumps({"h": host, "p": port, "e": expires}).encode("utf-8"))
    signed_part = "v1." + payload
    mac = hmac.new(secret, signed_part.encode("ascii"), hashlib.sha256).digest()
    return signed_part + "." + unpadded(mac)


def one_byte_changed(token: str, index: int) -> str:
    """``token`` with the base64url character at ``index`` replaced by another."""
    other = "B" if token[index] == "A" else "A"
    return token[:index] + other + token[index + 1:]


def test_token_signed_as_documented_is_accepted(websockify, echo4, signed, tmp_path):
    proc, port = start_tokens(websockify, "--token-plugin", "SignedTarget", "--token-source",
                              signed, "{port}")
    # The secret is the key file's text (surrounding whitespace stripped), as is.
    secret = (tmp_path / "sign.key").read_bytes().strip()
    token = documented_token(secret, "127.0.0.1", echo4.port, int(time.time()) + 300)
    echo_through(port, "/?token=" + token)
    head, payload, mac = token.split(".")
    # One character changed in the payload, then in the MAC (inside each,
    # where every bit of the character is data).
    for index in (len(head) + 1 + len(payload) // 2, len(token) - len(mac) // 2):
        altered = one_byte_changed(token, index)
        assert altered != token and len(altered) == len(token)
        assert answer(port, "/?token=" + altered) == (
            403, b"signed target token altered or malformed\n")
    expired = documented_token(secret, "127.0.0.1", echo4.port, int(time.time()) - 5)
    assert answer(port, "/?token=" + expired) == (403, b"signed target token expired\n")
    assert len(refusal_lines(proc, 403)) == 3, proc.log()
    assert_clean(proc)
