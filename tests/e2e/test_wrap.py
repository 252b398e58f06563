"""Wrapping a program (``websockify PORT -- PROGRAM ARGS``) and the rebind library.

Real processes on loopback: websockify wraps small Python servers that bind
the very port websockify listens on (the rebind library moves them), and a
WebSocket client talks to them through websockify.
"""

import glob
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import textwrap

import pytest

from websockify import cli, errors
from websockify.arbiter.wrap import REBIND_LIB_ENV, WrapError, find_rebind_lib
from tests.helpers import (PYTHON, ROOT, RawWebSocket, free_port, pid_alive, port_open,
                           require_program, skip_or_fail, wait_for, websockify_argv)
from tests.helpers import echo_through, ipv6_available

# A TCP echo server that binds the port it is given on every address, as a
# program written for that port would. Modes: serve (forever), once (one
# connection, then exit 0), quit (exit 4 on receiving "quit"), daemonize (the
# parent exits, a child serves).
ECHO_SERVER = textwrap.dedent("""\
    import os, socket, sys
    port, mode = int(sys.argv[1]), sys.argv[2]
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", port))
    server.listen()
    if mode == "daemonize":
        if os.fork():
            print("parent exits", flush=True)
            os._exit(0)
        os.setsid()
    print("pid %d listening on %s:%d" % ((os.getpid(),) + server.getsockname()), flush=True)
    while True:
        conn, _ = server.accept()
        while True:
            data = conn.recv(65536)
            if not data:
                break
            if mode == "quit" and data == b"quit":
                sys.exit(4)
            conn.sendall(data)
        conn.close()
        if mode == "once":
            sys.exit(0)
    """)

# Binds as told on the command line and prints where it ended up.
BINDER = textwrap.dedent("""\
    import json, socket, sys
    family, host, port, v6only = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    sock = socket.socket(getattr(socket, family), socket.SOCK_STREAM)
    if v6only != "-":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    sock.bind((host, port))
    sock.listen()
    print(json.dumps(sock.getsockname()[:2]), flush=True)
    conn, _ = sock.accept()
    conn.sendall(b"served")
    conn.close()
    """)


@pytest.fixture(scope="module")
def rebind_lib():
    """The library built in place next to the package (built now if it is missing)."""
    try:
        return find_rebind_lib()
    except WrapError:
        pass
    # (the rebind library cannot be built without one)
    require_program("cc", "gcc", "gcc")
    subprocess.run([PYTHON, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT,
                   check=True, capture_output=True)
    return find_rebind_lib()


@pytest.fixture
def echo_server(tmp_path):
    path = tmp_path / "echo_server.py"
    path.write_text(ECHO_SERVER)
    return str(path)


def wrapped(websockify, *listen, program, mode="serve", extra=(), **kwargs):
    """websockify wrapping the echo server on its own port; waits until it listens."""
    listen = listen or ("{port}",)
    proc, port = websockify("--workers", "1", *extra, *listen, "--",
                            PYTHON, program, "{port}", mode, **kwargs)
    proc.wait_log(r"pid \d+ listening on 127\.0\.0\.1:\d+")
    return proc, port


def program_pid(proc, pattern=r"wrapped program \S+ started \(pid (\d+)\)") -> int:
    return int(proc.wait_log(pattern).group(1))


def error_lines(log: str) -> list:
    return [line for line in log.splitlines() if " ERROR " in line]


# -- through websockify --------------------------------------------------------

def test_wrapped_program_is_reached_through_websocket(websockify, echo_server, rebind_lib):
    proc, port = wrapped(websockify, program=echo_server)
    new_port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", proc.log()).group(1))
    assert new_port != port
    assert "proxying from :%d to 127.0.0.1:%d" % (port, new_port) in proc.log()
    echo_through(port)
    echo_through(port, payload=b"x" * 100000)
    # The program's output is logged line by line with its name.
    assert re.search(r"INFO python: pid \d+ listening on", proc.log())


@pytest.mark.parametrize("source", ["option", "environment"])
def test_rebind_lib_given_by_option_or_environment(websockify, echo_server, rebind_lib,
                                                   tmp_path, source):
    lib = str(tmp_path / "rebind.so")
    shutil.copy(rebind_lib, lib)
    if source == "option":
        proc, port = wrapped(websockify, program=echo_server, extra=("--rebind-lib", lib))
    else:
        proc, port = wrapped(websockify, program=echo_server, env={REBIND_LIB_ENV: lib})
    assert "moved to 127.0.0.1:" in proc.log() and " by %s," % lib in proc.log()
    echo_through(port)


@pytest.mark.parametrize("source", ["option", "environment"])
def test_missing_rebind_lib_fails_at_start(processes, echo_server, tmp_path, source):
    port = free_port()
    missing = str(tmp_path / "nowhere" / "rebind.so")
    args = ["--rebind-lib", missing] if source == "option" else []
    proc = processes(websockify_argv(*args, port, "--", PYTHON, echo_server, port, "serve"),
                     env={REBIND_LIB_ENV: missing} if source == "environment" else None)
    assert proc.wait(15) == errors.EXIT_CONFIG
    lines = error_lines(proc.log())
    where = "--rebind-lib" if source == "option" else REBIND_LIB_ENV
    assert len(lines) == 1 and "%s: %s is not a readable file" % (where, missing) in lines[0]
    assert "wrapped program" not in proc.log()


def test_daemon_starts_the_program_after_daemonizing(processes, echo_server, rebind_lib,
                                                     tmp_path):
    port = free_port()
    log_file, pid_file = tmp_path / "ws.log", tmp_path / "ws.pid"
    launcher = processes(websockify_argv("-D", "--workers", "1", "--log-file", log_file,
                                         "--pid-file", pid_file, port, "--", PYTHON,
                                         echo_server, port, "serve"))
    assert launcher.wait(15) == 0
    master = int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(),
                          what="pid file"))
    try:
        match = wait_for(lambda: re.search(r"python: pid (\d+) listening",
                                           log_file.read_text()), what="program in the log")
        program = int(match.group(1))
        with open("/proc/%d/stat" % program) as handle:
            parent = int(handle.read().split(") ", 1)[1].split()[1])
        assert parent == master
        echo_through(port)
    finally:
        os.kill(master, signal.SIGTERM)
    wait_for(lambda: not pid_alive(master), what="daemon exit")
    assert not pid_alive(program)
    assert "stopping wrapped program python" in log_file.read_text()


def test_inetd_listener_port_is_the_one_moved(websockify, echo_server, rebind_lib):
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        lport = listener.getsockname()[1]
        proc, port = wrapped(websockify, "--inetd", program=echo_server, port=lport,
                             stdin=listener.fileno())
    finally:
        listener.close()
    echo_through(port)
    # The program does not inherit the listening socket as its stdin.
    assert os.readlink("/proc/%d/fd/0" % program_pid(proc)) == "/dev/null"


# -- wrap modes ---------------------------------------------------------------

@pytest.mark.parametrize("code, expected", [
    ("import sys, time; time.sleep(1); sys.exit(7)", 7),
    ("import os, time; time.sleep(1); os.kill(os.getpid(), 9)", 128 + 9),
    ("import time; time.sleep(1)", 0),
])
def test_exit_mode_exits_with_the_program_status(processes, rebind_lib, code, expected):
    port = free_port()
    proc = processes(websockify_argv("--workers", "1", port, "--", PYTHON, "-c", code))
    assert proc.wait(20) == expected, proc.log()
    assert "websockify exits too (--wrap-mode exit)" in proc.log()
    assert "websockify stopped" in proc.log()


def test_exit_mode_closes_the_session_and_exits_with_the_status(websockify, echo_server,
                                                                rebind_lib):
    proc, port = wrapped(websockify, program=echo_server, mode="quit")
    ws = RawWebSocket(port)
    try:
        assert ws.status == 101
        ws.send_binary(b"hello")
        assert ws.recv_data(5) == b"hello"
        ws.send_binary(b"quit")                 # the program exits with status 4
        assert ws.expect_close()[0] == 1000     # its connection closed: "Target closed"
        assert proc.wait(20) == 4, proc.log()
        assert ws.at_eof()
    finally:
        ws.close()


def test_ignore_mode_keeps_serving_after_the_program_daemonizes(websockify, echo_server,
                                                                rebind_lib):
    proc, port = wrapped(websockify, program=echo_server, mode="daemonize",
                         extra=("--wrap-mode", "ignore"))
    daemon = int(re.search(r"pid (\d+) listening", proc.log()).group(1))
    try:
        proc.wait_log(r"exited with status 0; still serving \(--wrap-mode ignore\)")
        echo_through(port)
        echo_through(port)
        assert proc.proc.poll() is None
    finally:
        os.kill(daemon, signal.SIGKILL)


def test_ignore_mode_keeps_answering_after_the_program_exits(websockify, rebind_lib):
    proc, port = websockify("--workers", "1", "--wrap-mode", "ignore", "{port}", "--",
                            PYTHON, "-c", "print('done')")
    proc.wait_log(r"python: done")
    proc.wait_log(r"exited with status 0; still serving")
    ws = RawWebSocket(port)
    assert ws.status == 502          # nothing listens on the target any more
    ws.close()
    assert proc.proc.poll() is None


def test_respawn_restarts_a_program_that_served_one_connection(websockify, echo_server,
                                                               rebind_lib):
    proc, port = wrapped(websockify, program=echo_server, mode="once",
                         extra=("--wrap-mode", "respawn"))
    first = program_pid(proc)
    echo_through(port, payload=b"first")
    proc.wait_log(r"\(pid %d\) exited with status 0; starting it again" % first)
    second = wait_for(lambda: [int(pid) for pid in re.findall(
        r"started \(pid (\d+)\)", proc.log()) if int(pid) != first], what="a new run")[0]
    wait_for(lambda: "pid %d listening" % second in proc.log(), what="second run")
    echo_through(port, payload=b"second")
    assert proc.proc.poll() is None


def test_respawn_backs_off_when_the_program_keeps_crashing(websockify, rebind_lib):
    proc, port = websockify("--workers", "1", "--wrap-mode", "respawn", "{port}", "--",
                            PYTHON, "-c", "import sys; sys.exit(3)")
    proc.wait_log(r"respawning too fast .*next start in 1 s", timeout=30)
    proc.wait_log(r"respawning too fast .*next start in 2 s", timeout=30)
    log = proc.log()
    assert log.count("exited with status 3") >= 4
    # The server stays up and still answers (the target is down: 502).
    assert proc.proc.poll() is None
    ws = RawWebSocket(port)
    assert ws.status == 502
    ws.close()
    assert not error_lines(proc.log())


# -- programs that cannot start ------------------------------------------------

def _not_executable(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text("not a program\n")
    return str(path), "not executable"


def _bad_format(tmp_path):
    path = tmp_path / "garbage"
    path.write_bytes(b"\x00\x01\x02 no interpreter line\n")
    path.chmod(0o755)
    return str(path), "Exec format error"


@pytest.mark.parametrize("make", [
    lambda tmp_path: (str(tmp_path / "missing-program"), "no such file"),
    lambda tmp_path: ("websockify-test-no-such-program", "not found in PATH"),
    _not_executable,
    _bad_format,
], ids=["missing", "not-in-path", "not-executable", "bad-format"])
def test_program_that_cannot_start(processes, rebind_lib, tmp_path, make):
    program, reason = make(tmp_path)
    port = free_port()
    proc = processes(websockify_argv("--workers", "1", port, "--", program, "arg"))
    assert proc.wait(15) == errors.EXIT_CONFIG
    lines = error_lines(proc.log())
    assert len(lines) == 1, proc.log()
    assert "cannot start wrapped program %s: %s" % (program, reason) in lines[0]
    assert not port_open(port)


# -- stopping ------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT])
def test_stopping_websockify_stops_the_program(websockify, echo_server, rebind_lib, signum):
    proc, port = wrapped(websockify, program=echo_server)
    pid = program_pid(proc)
    echo_through(port)
    proc.signal(signum)
    assert proc.wait(20) == 0
    assert not pid_alive(pid)
    assert "wrapped program python (pid %d) was killed by signal 15" % pid in proc.log()


def test_reload_keeps_the_program(websockify, echo_server, rebind_lib):
    proc, port = wrapped(websockify, program=echo_server)
    pid = program_pid(proc)
    proc.signal(signal.SIGHUP)
    proc.wait_log(r"got SIGHUP")
    echo_through(port)
    assert pid_alive(pid) and "stopping wrapped program" not in proc.log()


def test_program_ignoring_term_is_killed_with_its_children(websockify, rebind_lib, tmp_path):
    script = tmp_path / "stubborn.py"
    script.write_text(textwrap.dedent("""\
        import signal, subprocess, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen(["sleep", "120"])
        print("child %d" % child.pid, flush=True)
        time.sleep(120)
        """))
    proc, port = websockify("--workers", "1", "{port}", "--", PYTHON, str(script))
    pid = program_pid(proc)
    child = int(proc.wait_log(r"python: child (\d+)").group(1))
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert "did not stop within 5 s; killing it" in proc.log()
    assert not pid_alive(pid) and not pid_alive(child)


# -- the rebind library itself -------------------------------------------------

def run_binder(tmp_path, lib, family, host, port, v6only="-", env=None):
    """Start BINDER preloaded with ``lib``; returns (process, address it bound)."""
    script = tmp_path / "binder.py"
    script.write_text(BINDER)
    full_env = dict(os.environ, LD_PRELOAD=lib, **(env or {}))
    proc = subprocess.Popen([PYTHON, str(script), family, host, str(port), v6only],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env,
                            text=True)
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise AssertionError(proc.stderr.read())
    return proc, tuple(json.loads(line))


def talk(proc, host, port) -> bytes:
    try:
        with socket.create_connection((host, port), timeout=5) as sock:
            data = sock.recv(100)
        proc.wait(10)
        return data
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def ports():
    old, new = free_port(), free_port()
    return old, new, {"REBIND_OLD_PORT": str(old), "REBIND_NEW_PORT": str(new)}


IPV6 = pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback on this machine")


@pytest.mark.parametrize("family, host, v6only, moved_to, reached_at", [
    ("AF_INET", "0.0.0.0", "-", "127.0.0.1", "127.0.0.1"),
    ("AF_INET", "127.0.0.1", "-", "127.0.0.1", "127.0.0.1"),
    pytest.param("AF_INET6", "::", "1", "::1", "::1", marks=IPV6, id="ipv6-only"),
    pytest.param("AF_INET6", "::1", "0", "::1", "::1", marks=IPV6, id="ipv6-address"),
    # websockify connects to 127.0.0.1: a dual-stack [::] server is moved to
    # the IPv4-mapped loopback, which answers there.
    pytest.param("AF_INET6", "::", "0", "::ffff:127.0.0.1", "127.0.0.1", marks=IPV6,
                 id="dual-stack"),
])
def test_rebind_moves_the_old_port_to_loopback(rebind_lib, tmp_path, family, host, v6only,
                                               moved_to, reached_at):
    old, new, env = ports()
    proc, address = run_binder(tmp_path, rebind_lib, family, host, old, v6only, env=env)
    assert address == (moved_to, new)
    if reached_at == "::1":
        assert not port_open(new)                       # not on 127.0.0.1
    assert talk(proc, reached_at, new) == b"served"


@pytest.mark.parametrize("case", ["other-port", "port-0", "no-env", "bad-old", "bad-new",
                                  "zero-new", "huge-new"])
def test_rebind_passes_other_binds_through(rebind_lib, tmp_path, case):
    old, new, env = ports()
    port = old
    if case == "other-port":
        port = free_port()
    elif case == "port-0":
        port = 0
    elif case == "no-env":
        env = {}
    elif case == "bad-old":
        env["REBIND_OLD_PORT"] = "%dx" % old
    elif case == "bad-new":
        env["REBIND_NEW_PORT"] = "abc"
    elif case == "zero-new":
        env["REBIND_NEW_PORT"] = "0"
    elif case == "huge-new":
        env["REBIND_NEW_PORT"] = "70000"
    proc, (host, bound) = run_binder(tmp_path, rebind_lib, "AF_INET", "0.0.0.0", port,
                                     env=env)
    assert host == "0.0.0.0"
    assert bound == port if port else bound not in (0, new)
    assert talk(proc, "127.0.0.1", bound) == b"served"


def test_rebind_leaves_unix_sockets_alone(rebind_lib, tmp_path):
    old, new, env = ports()
    path = str(tmp_path / "sock")
    code = ("import socket; s = socket.socket(socket.AF_UNIX); s.bind(%r); "
            "print(s.getsockname())" % path)
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ, LD_PRELOAD=rebind_lib, **env), timeout=20)
    assert result.returncode == 0 and result.stdout.strip() == path, result.stderr


# -- the command line ----------------------------------------------------------

def test_wrap_command_line_parsed():
    settings = cli.parse_args(["--wrap-mode", "respawn", "6080", "--", "vncserver", ":1",
                               "--", "-geometry"])
    assert settings.listen_port == 6080
    assert settings.wrap_cmd == ["vncserver", ":1", "--", "-geometry"]
    assert settings.wrap_mode == "respawn"
    assert settings.target_host is None      # the master picks it at start


def test_relative_program_and_rebind_lib_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = cli.parse_args(["--rebind-lib", "lib/rebind.so", "6080", "--",
                               "./server", "./config"])
    assert settings.wrap_cmd == [str(tmp_path / "server"), "./config"]
    assert settings.rebind_lib == str(tmp_path / "lib" / "rebind.so")


@pytest.mark.parametrize("args, expected", [
    (["6080", "localhost:5900", "--", "prog"], "Too many arguments"),
    (["--echo", "6080", "--", "prog"], "--echo cannot be used with a wrapped program"),
    (["--unix-target", "/tmp/x", "6080", "--", "prog"], "--unix-target cannot be used"),
    (["--token-plugin", "TokenFile", "--token-source", "/tmp/x", "6080", "--", "prog"],
     "a token plugin cannot be used"),
    (["--target-config", "/tmp/x", "6080", "--", "prog"], "a token plugin cannot be used"),
    (["--unix-listen", "/tmp/x", "--", "prog"], "--unix-listen cannot be used"),
    (["6080", "--"], "must be followed by the command line"),
])
def test_wrap_usage_errors(args, expected):
    with pytest.raises(cli.UsageError, match=re.escape(expected)):
        cli.parse_args(args)


# -- building the library -------------------------------------------------------

def copy_project(dest):
    """The files a build needs, without built libraries or caches."""
    os.makedirs(dest)
    for name in ("setup.py", "setup.cfg", "README.md", "rebind.c"):
        shutil.copy(os.path.join(ROOT, name), dest)
    shutil.copytree(os.path.join(ROOT, "websockify"), os.path.join(dest, "websockify"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copytree(os.path.join(ROOT, "man"), os.path.join(dest, "man"))
    return dest


def built_libs(directory):
    return glob.glob(os.path.join(directory, "websockify", "_rebind*.so"))


def test_in_place_build_makes_a_preloadable_library(tmp_path):
    require_program("cc", "gcc", "gcc")
    project = copy_project(str(tmp_path / "project"))
    subprocess.run([PYTHON, "setup.py", "-q", "build_ext", "--inplace"], cwd=project,
                   check=True, capture_output=True, timeout=120)
    [lib] = built_libs(project)
    old, new, env = ports()
    proc, address = run_binder(tmp_path, lib, "AF_INET", "0.0.0.0", old, env=env)
    assert address == ("127.0.0.1", new)
    assert talk(proc, "127.0.0.1", new) == b"served"


def test_build_without_a_compiler_warns_and_succeeds(tmp_path):
    project = copy_project(str(tmp_path / "project"))
    result = subprocess.run([PYTHON, "setup.py", "build_ext", "--inplace"], cwd=project,
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, CC=str(tmp_path / "no-such-cc")))
    assert result.returncode == 0, result.stderr
    assert "could not build the rebind library" in result.stdout + result.stderr
    assert not built_libs(project)


def test_missing_library_is_a_clear_start_error(processes, echo_server, tmp_path):
    # An installation without the library (built without a compiler).
    project = copy_project(str(tmp_path / "project"))
    port = free_port()
    env = dict(os.environ)
    env.pop(REBIND_LIB_ENV, None)
    env["PYTHONPATH"] = project
    result = subprocess.run([PYTHON, "-m", "websockify", str(port), "--", PYTHON,
                             echo_server, str(port), "serve"], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == errors.EXIT_CONFIG
    lines = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(lines) == 1 and "the rebind library was not built" in lines[0]


def _pip_install(args, cwd):
    """pip, offline when the build backend is at hand; skip when it cannot be fetched."""
    # setuptools needs wheel to build without isolation.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("wheel") else []
    result = subprocess.run([PYTHON, "-m", "pip", "install", "-q", "--no-deps"] + isolation
                            + args, cwd=cwd, capture_output=True, text=True, timeout=180)
    if result.returncode and not isolation and re.search(
            r"No matching distribution|Could not find a version|NewConnectionError|"
            r"Network is unreachable|Temporary failure in name resolution", result.stderr):
        skip_or_fail("pip could not fetch the build requirements (no package index)")
    assert result.returncode == 0, result.stderr
    return result


def test_pip_install_ships_the_library_and_wrapping_works(processes, echo_server, tmp_path):
    require_program("cc", "gcc", "gcc")
    project = copy_project(str(tmp_path / "project"))
    target = str(tmp_path / "site")
    _pip_install(["--target", target, project], cwd=str(tmp_path))
    [lib] = built_libs(target)
    port = free_port()
    env = {"PYTHONPATH": target}
    proc = processes([PYTHON, "-m", "websockify", "--workers", "1", str(port), "--", PYTHON,
                      echo_server, str(port), "serve"], env=env, cwd=str(tmp_path))
    proc.wait_log(r"pid \d+ listening on 127\.0\.0\.1")
    assert " by %s," % lib in proc.log()
    echo_through(port)
