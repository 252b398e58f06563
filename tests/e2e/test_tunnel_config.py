"""--tunnel-config end to end: the real server refuses bad files (exit 5, one line), starts with a
good one, reloads it on SIGHUP; websockify-sign agent prints tokens the server's check accepts."""

import os
import signal
import socket
import subprocess
import time

import pytest

from tests.helpers import (LISTEN, PYTHON, ROOT, free_port, port_open, read_http_response,
                           tcp_sockets, wait_for, websockify_argv)
from websockify.errors import EXIT_CONFIG, EXIT_USAGE
from websockify.tunnel.agent_token import verify_agent_token

SECRET = b"0123456789abcdef-tunnel-secret"


def write(path, text):
    with open(path, "w" if isinstance(text, str) else "wb") as handle:
        handle.write(text)
    return str(path)


def run(argv, timeout=20):
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=ROOT))


def good_config(folder, agent_port):
    write(folder / "tunnel-a.key", SECRET + b"\n")
    return write(folder / "tunnels.toml", (
        '[tunnels]\nsecrets = ["tunnel-a.key"]\naudience = "websockify"\n'
        '[tunnels.agent.LKLAFA151NA774655]\nnickname = "Bus02"\n'
        'listen = "127.0.0.1:%d"\ntoken = true\n' % agent_port))


def error_lines(text):
    return [line for line in text.splitlines() if " ERROR " in line]


# -- a bad file stops the start ------------------------------------------------

@pytest.mark.parametrize("text, problem", [
    ("[tunnels]\npath = \n", ":2: TOML syntax error: Invalid value (column 8)"),
    ("[tunnels]\nsecretz = []\n", ": unknown key 'secretz' in [tunnels]"),
    ("[tunnels]\nsecrets = ['missing.key']\n",
     ": cannot read secret file {folder}/missing.key: No such file or directory"),
])
def test_bad_file_exits_5_with_one_line_naming_it(tmp_path, text, problem):
    path = write(tmp_path / "tunnels.toml", text)
    result = run(websockify_argv("--tunnel-config", path, "0"))
    assert result.returncode == EXIT_CONFIG, result
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert error_lines(result.stderr)[0].split(" ERROR ", 1)[1] == (
        path + problem.format(folder=tmp_path))


def test_a_listen_port_in_use_exits_5_with_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = good_config(tmp_path, port)
        result = run(websockify_argv("--tunnel-config", path, "0"))
    assert result.returncode == EXIT_CONFIG, result
    assert result.stderr.count("\n") == 1, result.stderr
    assert error_lines(result.stderr)[0].split(" ERROR ", 1)[1] == (
        "%s: agent LKLAFA151NA774655: cannot listen on 127.0.0.1 port %d: Address already in use"
        % (path, port))


def test_a_node_address_in_use_exits_5_with_one_line(tmp_path):
    pytest.importorskip("redis")
    write(tmp_path / "cluster.key", b"cluster secret\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write(tmp_path / "tunnels.toml", (
            '[tunnels]\nregistry = "redis://127.0.0.1:1/0"\nnode = "127.0.0.1:%d"\n'
            'cluster_secret = "cluster.key"\n' % port))
        result = run(websockify_argv("--tunnel-config", path, "0"))
    assert result.returncode == EXIT_CONFIG, result
    assert result.stderr.count("\n") == 1, result.stderr
    assert error_lines(result.stderr)[0].split(" ERROR ", 1)[1] == (
        "%s: node: cannot listen on 127.0.0.1 port %d: Address already in use" % (path, port))


def test_without_tunnel_config_a_lone_port_is_still_a_usage_error():
    result = run(websockify_argv("6080"))
    assert result.returncode == EXIT_USAGE
    assert result.stderr.splitlines()[-1] == "websockify: error: Too few arguments"


# -- a good file ---------------------------------------------------------------------

def test_good_config_starts_alone_and_stops_on_sigterm(websockify, tmp_path):
    agent_port = free_port()
    path = good_config(tmp_path, agent_port)
    proc, port = websockify("--tunnel-config", path, "--workers", "1", "127.0.0.1:{port}")
    log = proc.wait_log(r"Reverse tunnels: .*")
    assert log.group(0) == ("Reverse tunnels: 1 tunnel agent(s) at /tunnel/<ID> "
                            "(1 TCP port(s)), from %s" % path)
    assert "proxying from 127.0.0.1:%d to tunnel agents only (no target)" % port in proc.log()
    # The agent's TCP face is bound by the master before the workers fork.
    wait_for(lambda: any(state == LISTEN for _, state, _ in tcp_sockets(agent_port)),
             what="the agent's listen port %d" % agent_port)
    # No target: a WebSocket that is not for a tunnel gets 404, and nothing breaks.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\n\r\n")
        status, _, _ = read_http_response(sock)
    assert status == 404
    proc.signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert not port_open(port) and not port_open(agent_port)
    assert error_lines(proc.log()) == []


def test_reverse_websockify_config_toml_starts_and_says_its_endpoint_is_unused(websockify,
                                                                               tmp_path):
    agent_port = free_port()
    path = write(tmp_path / "config.toml", (
        'http_server_endpoint = "127.0.0.1:39000"\n\n'
        '[remote_service.LKLAFA151NA774655]\nnickname = "Bus02"\n'
        'local_listen_endpoint = "127.0.0.1:%d"\n' % agent_port))
    proc, port = websockify("--tunnel-config", path, "--workers", "1", "127.0.0.1:{port}")
    proc.wait_log(r"http_server_endpoint 127\.0\.0\.1:39000 in %s is not used: websockify "
                  r"listens on 127\.0\.0\.1:%d" % (path, port))
    assert ("Reverse tunnels: 1 tunnel agent(s) at /forward_to_me/<ID> (1 TCP port(s)), from "
            "%s (reverse_websockify's layout)" % path) in proc.log()
    wait_for(lambda: port_open(agent_port), what="the agent's listen port")


def test_sighup_with_a_broken_file_keeps_running_and_logs_one_line(websockify, tmp_path):
    agent_port = free_port()
    path = good_config(tmp_path, agent_port)
    proc, port = websockify("--tunnel-config", path, "--workers", "1", "127.0.0.1:{port}")
    wait_for(lambda: port_open(agent_port), what="the agent's listen port")
    good = open(path).read()
    write(path, good + "oops = \n")
    proc.signal(signal.SIGHUP)
    proc.wait_log(r"reload done")
    errors = error_lines(proc.log())
    assert len(errors) == 1, proc.log()
    assert errors[0].split(" ERROR ", 1)[1] == (
        "%s:8: TOML syntax error: Invalid value (column 8); new workers keep the previous "
        "tunnel configuration" % path)
    assert proc.proc.poll() is None
    assert port_open(port) and port_open(agent_port)
    # A fixed file is taken at the next SIGHUP: the agent's port moves.
    moved = free_port()
    write(path, good.replace(str(agent_port), str(moved)))
    proc.signal(signal.SIGHUP)
    proc.wait_log(r"tunnel configuration reloaded: 1 tunnel agent\(s\)")
    wait_for(lambda: port_open(moved), what="the new listen port")
    wait_for(lambda: not any(state == LISTEN for _, state, _ in tcp_sockets(agent_port)),
             what="the old listen port closed", timeout=15)
    assert len(error_lines(proc.log())) == 1


def test_sighup_with_a_listen_port_in_use_keeps_the_previous_config(websockify, tmp_path):
    agent_port = free_port()
    path = good_config(tmp_path, agent_port)
    proc, port = websockify("--tunnel-config", path, "--workers", "1", "127.0.0.1:{port}")
    wait_for(lambda: port_open(agent_port), what="the agent's listen port")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        write(path, open(path).read().replace(str(agent_port), str(busy)))
        proc.signal(signal.SIGHUP)
        proc.wait_log(r"reload done")
    errors = error_lines(proc.log())
    assert [e.split(" ERROR ", 1)[1] for e in errors] == [
        "%s: agent LKLAFA151NA774655: cannot listen on 127.0.0.1 port %d: Address already in "
        "use; new workers keep the previous tunnel configuration" % (path, busy)]
    assert port_open(agent_port)


# -- websockify-sign agent ------------------------------------------------------------

def sign(*args):
    return run([PYTHON, "-m", "websockify.sign", "agent"] + [str(a) for a in args])


def test_websockify_sign_agent_prints_a_token_the_server_accepts(tmp_path):
    key = write(tmp_path / "tunnel-a.key", b"  " + SECRET + b"\n")
    before = time.time()
    result = sign("LKLAFA151NA774655", "--secret-file", key, "--lifetime", "12h",
                  "--audience", "websockify")
    assert result.returncode == 0, result
    assert result.stderr == ""
    token = result.stdout.strip()
    assert result.stdout == token + "\n"
    claims = verify_agent_token(token, "LKLAFA151NA774655", [b"other", SECRET], "websockify",
                                time.time())
    assert claims["aud"] == "websockify" and claims["tid"] == "LKLAFA151NA774655"
    assert claims["exp"] - claims["nbf"] == 12 * 3600
    assert int(before) <= claims["nbf"] <= time.time()


def test_websockify_sign_agent_with_the_tunnel_config(tmp_path):
    path = good_config(tmp_path, free_port())
    result = sign("LKLAFA151NA774655", "--config", path)
    assert result.returncode == 0, result
    claims = verify_agent_token(result.stdout.strip(), "LKLAFA151NA774655", [SECRET],
                                "websockify", time.time())
    assert claims["exp"] - claims["nbf"] == 86400       # the default: one day
    result = sign("NOT-THERE", "--config", path)
    assert result.returncode == EXIT_CONFIG and result.stdout == ""
    assert result.stderr == ("websockify-sign: %s names no agent NOT-THERE; the server would "
                             "refuse it\n" % path)


@pytest.mark.parametrize("args, status, message", [
    (["A", "--secret-file", "{key}", "--lifetime", "32d"], EXIT_USAGE,
     "websockify-sign: --lifetime is at most 31 days: the server refuses longer tokens\n"),
    (["a b", "--secret-file", "{key}"], EXIT_USAGE,
     "websockify-sign: bad agent ID 'a b' (1 to 128 of A-Z a-z 0-9 _ ~ . % -)\n"),
    (["A", "--secret-file", "{folder}/none.key"], EXIT_CONFIG,
     "websockify-sign: {folder}/none.key: cannot read: No such file or directory\n"),
    (["A", "--secret-file", "{folder}/empty.key"], EXIT_CONFIG,
     "websockify-sign: {folder}/empty.key: the secret file is empty\n"),
])
def test_websockify_sign_agent_refusals(tmp_path, args, status, message):
    key = write(tmp_path / "tunnel-a.key", SECRET)
    write(tmp_path / "empty.key", " \n")
    result = sign(*[a.format(key=key, folder=tmp_path) for a in args])
    assert result.returncode == status, result
    assert result.stdout == ""
    assert result.stderr == message.format(folder=tmp_path)


def test_websockify_sign_keeps_its_signed_target_usage(tmp_path):
    key = write(tmp_path / "sign.key", "x" * 32)
    result = run([PYTHON, "-m", "websockify.sign", "--secret-file", key, "127.0.0.1:5901"])
    assert result.returncode == 0, result
    assert result.stdout.startswith("v1.")
