"""The master process end to end: titles, workers, signals, timeouts, listeners.

Every test starts real processes on loopback (or Unix sockets in tmp_path)
and stops them by their pid.
"""

import os
import re
import resource
import signal
import socket
import struct
import threading
import time

import pytest

from websockify import errors
from websockify.demo.echo import echo_connection
from tests.helpers import (LISTEN, ROOT, RawWebSocket, children_of, fd_links, free_port,
                           handshake_request, pid_alive, port_open, read_http_response,
                           socket_inodes, tcp_sockets, wait_for, websockify_argv)


# -- helpers -------------------------------------------------------------------

def cmdline(pid: int) -> str:
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            raw = handle.read()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode("utf-8", "replace").strip()


def worker_pids(master_pid: int) -> list:
    return [pid for pid in children_of(master_pid)
            if cmdline(pid).startswith("websockify worker")]


def wait_workers(master_pid: int, count: int, timeout=10.0) -> list:
    """Wait until the master has ``count`` children titled as workers."""
    return wait_for(lambda: (lambda pids: pids if len(pids) == count else None)(
        worker_pids(master_pid)), timeout, what="%d workers of %d" % (count, master_pid))


def echoes(ws: RawWebSocket, payload: bytes) -> bool:
    ws.send_binary(payload)
    return ws.recv_data(len(payload)) == payload


def open_session(port, host="127.0.0.1") -> RawWebSocket:
    ws = RawWebSocket(port, host=host)
    assert ws.status == 101, (ws.status, ws.buffer)
    assert echoes(ws, b"hello %d" % ws.sock.getsockname()[1])
    return ws


def close_session(ws: RawWebSocket, code=1000):
    ws.send(0x8, struct.pack("!H", code))
    assert ws.expect_close()[0] == code
    assert ws.at_eof()
    ws.close()


def ws_over(sock, host="localhost") -> RawWebSocket:
    """A RawWebSocket on an already connected socket (a Unix socket, say)."""
    sock.settimeout(10)
    sock.sendall(handshake_request("/", host))
    ws = RawWebSocket.__new__(RawWebSocket)
    ws.sock = sock
    ws.status, ws.headers, ws.buffer = read_http_response(sock)
    return ws


def open_files(pid: int) -> set:
    """The paths of the files process ``pid`` has open."""
    return fd_links(pid)


def server_side_inode(listen_port: int, client_port: int):
    """Inode of the accepted socket for the client's connection (from /proc/net/tcp*)."""
    return next((inode for inode, _, remote in tcp_sockets(listen_port)
                 if remote == client_port), None)


def holds_listener(pid: int, listen_port: int) -> bool:
    """Whether ``pid`` still has the listening socket (a draining worker closes its copy)."""
    listener = listener_inode(listen_port)
    return listener is not None and listener in socket_inodes(pid)


def listener_inode(port: int):
    """Inode of the socket listening on loopback TCP ``port``, None when none is."""
    return next((inode for inode, state, _ in tcp_sockets(port) if state == LISTEN), None)


def seconds_since_start(pid: int) -> float:
    """How long ago process ``pid`` started (from /proc, to 10 ms)."""
    with open("/proc/%d/stat" % pid) as handle:
        start_ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as handle:
        uptime = float(handle.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def owner(ws: RawWebSocket, listen_port: int, pids) -> int:
    """Which of ``pids`` holds the server side of this session."""
    client_port = ws.sock.getsockname()[1]

    def find():
        inode = server_side_inode(listen_port, client_port)
        if inode is None:
            return None
        for pid in pids:
            if inode in socket_inodes(pid):
                return pid
        return None
    return wait_for(find, 5, what="owner of client port %d" % client_port)


def log_lines(text: str) -> list:
    return [line for line in text.splitlines() if line.strip()]


def read_text(path) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


def new_connection_outcome(port, wait=3.0) -> str:
    """What a new client gets: refused, closed, reset, 101, other, or hang (no answer)."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=2)
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        return "refused (%s)" % exc
    try:
        sock.settimeout(wait)
        sock.sendall(handshake_request())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        if data.startswith(b"HTTP/1.1 101"):
            return "101"
        return "closed" if not data else "other: %r" % data[:40]
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    except socket.timeout:
        return "hang"     # accepted by the kernel, never answered
    finally:
        sock.close()


def kill_pids(pids):
    for pid in pids:
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# -- process titles ----------------------------------------------------------------

def test_process_titles_and_worker_count(websockify, echo_target):
    proc, port = websockify("--workers", "3", "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    workers = wait_workers(proc.pid, 3)
    assert cmdline(proc.pid) == "websockify master 127.0.0.1:%d -> 127.0.0.1:%d" % (
        port, echo_target)
    assert len(children_of(proc.pid)) == 3
    assert sorted(cmdline(pid) for pid in workers) == [
        "websockify worker 1", "websockify worker 2", "websockify worker 3"]


# -- a worker dies -----------------------------------------------------------------

def test_killed_worker_is_replaced_and_other_sessions_survive(websockify, echo_target):
    proc, port = websockify("--workers", "2", "--worker-connections", "3",
                            "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    workers = wait_workers(proc.pid, 2)
    sessions = []
    try:
        # One at a time, each echoing before the next: a worker holding three
        # connections stops accepting, so the six spread three and three.
        for _ in range(6):
            sessions.append(open_session(port))
        owners = [owner(ws, port, workers) for ws in sessions]
        assert set(owners) == set(workers), owners
        victim = owners[0]
        victim_title = cmdline(victim)
        os.kill(victim, signal.SIGKILL)

        survivors = [ws for ws, pid in zip(sessions, owners) if pid != victim]
        dead = [ws for ws, pid in zip(sessions, owners) if pid == victim]
        assert survivors and dead
        for ws in dead:
            assert ws.at_eof(5), "a session of the killed worker is still open"
        for i, ws in enumerate(survivors):
            assert echoes(ws, b"still here %d" % i)

        replacement = wait_for(
            lambda: [pid for pid in worker_pids(proc.pid) if pid not in workers],
            5, what="a replacement worker")
        assert len(replacement) == 1
        assert len(children_of(proc.pid)) == 2
        wait_for(lambda: cmdline(replacement[0]) == victim_title, 5,
                 what="replacement titled %r" % victim_title)

        # The surviving worker is full: new sessions go to the replacement.
        for _ in range(2):
            ws = open_session(port)
            sessions.append(ws)
            assert owner(ws, port, worker_pids(proc.pid)) == replacement[0]
        for ws in survivors:
            assert echoes(ws, b"and still")

        about_victim = [line for line in log_lines(proc.log())
                        if "pid %d" % victim in line]
        assert len(about_victim) == 1, proc.log()
        assert "killed by signal 9" in about_victim[0], about_victim
        assert proc.proc.poll() is None
    finally:
        for ws in sessions:
            ws.close()


# -- failures at start ---------------------------------------------------------------

def test_listen_port_in_use(processes, echo_target):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = processes(websockify_argv("127.0.0.1:%d" % port, "127.0.0.1:%d" % echo_target),
                         name="websockify")
        assert proc.wait(10) == errors.EXIT_LISTEN
    lines = log_lines(proc.log())
    assert len(lines) == 1, proc.log()
    assert str(port) in lines[0]
    assert "ERROR" in lines[0]


FAKE_SETPROCTITLE = '''
def setproctitle(title):
    if title.startswith("websockify worker"):
        raise RuntimeError("fake setproctitle refuses %r" % title)
'''


def test_worker_boot_failure_stops_the_master(processes, echo_target, tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "setproctitle.py").write_text(FAKE_SETPROCTITLE)
    port = free_port()
    proc = processes(websockify_argv("--workers", "2", "127.0.0.1:%d" % port,
                                     "127.0.0.1:%d" % echo_target),
                     name="websockify", env={"PYTHONPATH": str(fake) + os.pathsep + ROOT})
    assert proc.wait(15) == errors.EXIT_WORKER_BOOT, proc.log()
    log = proc.log()
    assert "fake setproctitle refuses" in log
    assert len([line for line in log_lines(log) if "failed to start" in line
                and "stopping the server" in line]) == 1, log
    assert "starting a new one" not in log


# -- --run-once, --timeout, --idle-timeout --------------------------------------------

def test_run_once_exits_after_first_websocket_session(websockify, echo_target):
    proc, port = websockify("-v", "--run-once", "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    proc.wait_log(r"serving")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, _, _ = read_http_response(sock)
    assert status == 405
    # Nothing shows that the master did not count the 405, but an exit: give
    # it several of its ticks (0.25 s) to make the mistake.
    time.sleep(1.0)
    assert proc.proc.poll() is None, "a 405 must not count as the one session:\n" + proc.log()
    ws = open_session(port)
    close_session(ws)
    assert proc.wait(10) == 0, proc.log()


def test_timeout_refuses_new_connections_but_keeps_sessions(websockify, echo_target):
    # --timeout counts from the master's start, worker boot included: 2 s
    # leaves room to open the session first on a slow machine.
    proc, port = websockify("-v", "--timeout", "2", "127.0.0.1:{port}",
                            "127.0.0.1:%d" % echo_target)
    proc.wait_log(r"serving")
    ws = open_session(port)
    try:
        proc.wait_log(r"listener exit due to --timeout", timeout=5)
        # The master and the worker close the listening socket: then nobody
        # listens on the port, and a new client is refused by the kernel.
        wait_for(lambda: listener_inode(port) is None, 5, what="the listener to be closed")
        assert new_connection_outcome(port) == "refused"
        # The worker stopped accepting and goes on relaying the open session.
        assert echoes(ws, b"after the timeout")
        assert proc.proc.poll() is None
        assert echoes(ws, b"still after the timeout")
        assert proc.proc.poll() is None
        close_session(ws)
    finally:
        ws.close()
    assert proc.wait(10) == 0, proc.log()


def test_idle_timeout_without_sessions(websockify, echo_target):
    proc, port = websockify("--idle-timeout", "1", "127.0.0.1:{port}",
                            "127.0.0.1:%d" % echo_target)
    assert proc.wait(6) == 0, proc.log()
    assert "idle-timeout" in proc.log()


def test_idle_timeout_waits_for_the_open_session(websockify, echo_target):
    # The idle time counts from the master's start, worker boot included, and
    # the master sees a session up to ~0.5 s late: 2 s leaves room for both.
    proc, port = websockify("-v", "--idle-timeout", "2", "127.0.0.1:{port}",
                            "127.0.0.1:%d" % echo_target)
    proc.wait_log(r"serving")
    ws = open_session(port)
    try:
        # Until well past the idle time counted from the process's start: 2 s
        # more for the imports before the master's clock starts, a tick and
        # the ~0.5 s the master may see the session late.
        wait_for(lambda: (proc.proc.poll() is not None
                          or seconds_since_start(proc.pid) >= 2.0 + 2.0),
                 10, what="the idle time to pass")
        assert proc.proc.poll() is None, "exited with a session open:\n" + proc.log()
        assert echoes(ws, b"not idle")
        close_session(ws)
    finally:
        ws.close()
    ended = time.time()
    assert proc.proc.poll() is None, "exited at once, not after the idle time"
    assert proc.wait(8) == 0, proc.log()
    assert time.time() - ended >= 1.0, "exited before the idle time had passed"
    assert "idle-timeout" in proc.log()


# -- signals -------------------------------------------------------------------------

def test_sigterm_closes_sessions_after_graceful_timeout(websockify, echo_target):
    proc, port = websockify("--graceful-timeout", "1", "127.0.0.1:{port}",
                            "127.0.0.1:%d" % echo_target)
    ws = open_session(port)
    try:
        started = time.time()
        listening = listener_inode(port)
        proc.signal(signal.SIGTERM)
        # Stopping has begun once neither the master nor the worker holds the
        # listening socket; the session still relays in the grace period.
        wait_for(lambda: listener_inode(port) is None, 5, what="the listener to be closed")
        assert listening is not None
        assert echoes(ws, b"during the grace period")
        code, reason = ws.expect_close()
        elapsed = time.time() - started
        assert code == 1001, (code, reason)
        assert 0.7 <= elapsed <= 5.0, elapsed
        ws.send(0x8, struct.pack("!H", 1001))
        assert ws.at_eof()
    finally:
        ws.close()
    assert proc.wait(10) == 0, proc.log()
    assert not port_open(port)


def test_sigquit_closes_sessions_now(websockify, echo_target):
    proc, port = websockify("127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    ws = open_session(port)
    try:
        started = time.time()
        proc.signal(signal.SIGQUIT)
        code, _ = ws.expect_close()
        assert code == 1001
        assert time.time() - started < 2.0
        ws.send(0x8, struct.pack("!H", 1001))
        assert ws.at_eof()
    finally:
        ws.close()
    assert proc.wait(10) == 0, proc.log()


def test_sighup_replaces_workers_and_old_sessions_continue(websockify, echo_target):
    proc, port = websockify("--workers", "2", "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    old = wait_workers(proc.pid, 2)
    old_ws = open_session(port)
    new_ws = None
    try:
        busy = owner(old_ws, port, old)
        idle = [pid for pid in old if pid != busy][0]
        proc.signal(signal.SIGHUP)
        new = wait_for(lambda: (lambda n: n if len(n) == 2 else None)(
            [pid for pid in worker_pids(proc.pid) if pid not in old]), 5, what="new workers")
        wait_for(lambda: not pid_alive(idle), 5, what="idle old worker %d to exit" % idle)
        # The old generation drains once the new one is ready: the busy worker
        # stops accepting (it closes its listener) but keeps its session.
        wait_for(lambda: not holds_listener(busy, port), 5,
                 what="old worker %d to stop accepting" % busy)
        assert pid_alive(busy)
        assert echoes(old_ws, b"old worker still relays")
        new_ws = open_session(port)
        assert owner(new_ws, port, new + [busy]) in new
        assert echoes(old_ws, b"still")
        assert pid_alive(busy)
        close_session(old_ws)
        wait_for(lambda: not pid_alive(busy), 5, what="old worker %d to exit" % busy)
        assert echoes(new_ws, b"new worker relays")
        assert sorted(worker_pids(proc.pid)) == sorted(new)
        close_session(new_ws)
        assert proc.proc.poll() is None
    finally:
        old_ws.close()
        if new_ws is not None:
            new_ws.close()


def test_sigusr1_reopens_log_files(processes, echo_target, tmp_path):
    logfile = tmp_path / "ws.log"
    rotated = tmp_path / "ws.log.1"
    port = free_port()
    proc = processes(websockify_argv("-v", "--workers", "2", "--worker-connections", "1",
                                     "--log-file", logfile, "127.0.0.1:%d" % port,
                                     "127.0.0.1:%d" % echo_target), name="websockify")
    wait_for(lambda: len(re.findall(r"serving", read_text(logfile))) == 2,
             what="two workers serving in %s" % logfile)
    workers = worker_pids(proc.pid)
    os.rename(logfile, rotated)
    proc.signal(signal.SIGUSR1)
    # Every worker has the new file open (the old one shows as the rotated name).
    wait_for(lambda: all(str(logfile) in open_files(pid) for pid in workers), 5,
             what="the workers to reopen %s" % logfile)
    # One session per worker (each holds one connection at most).
    first = open_session(port)
    second = open_session(port)
    assert {owner(first, port, workers), owner(second, port, workers)} == set(workers)
    close_session(first)
    close_session(second)
    wait_for(lambda: len(re.findall(r"closed \(1000\)", read_text(logfile))) == 2, 5,
             what="both session lines in the reopened log:\nnew:\n%s\nold:\n%s"
             % (read_text(logfile), read_text(rotated)))
    new_text = read_text(logfile)
    pids = {int(m) for m in re.findall(r"\[(\d+)\] INFO [^\n]*closed \(1000\)", new_text)}
    assert pids == set(workers)
    assert "closed (" not in read_text(rotated)
    assert "SIGUSR1" in read_text(logfile)    # logged after the reopening
    proc.signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    new_text = read_text(logfile)
    assert re.search(r"\[%d\] INFO websockify stopped" % proc.pid, new_text), new_text
    assert "websockify stopped" not in read_text(rotated)


def test_sigusr1_while_workers_boot_does_not_stop_the_server(websockify, echo_target):
    """logrotate's USR1 right after a reload (HUP) reaches workers still booting."""
    # -v: workers log that they are serving once booted.
    proc, port = websockify("-v", "--workers", "2", "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    old = wait_workers(proc.pid, 2)
    proc.signal(signal.SIGHUP)
    proc.signal(signal.SIGUSR1)

    def new_workers():
        if proc.proc.poll() is not None:
            return True
        pids = [pid for pid in worker_pids(proc.pid) if pid not in old]
        return pids if len(pids) == 2 else None
    new = wait_for(new_workers, 5, what="new workers")
    assert proc.proc.poll() is None, "the server stopped:\n" + proc.log()
    # Both new workers booted through the USR1 (a boot failure is before this line).
    for pid in new:
        proc.wait_log(r"\(pid %d\) serving" % pid)
    assert proc.proc.poll() is None, "the server stopped:\n" + proc.log()
    assert "failed to start" not in proc.log(), proc.log()
    # Once the new generation is ready, the old one stops accepting.
    wait_for(lambda: not any(holds_listener(pid, port) for pid in old), 5,
             what="the old workers to stop accepting")
    ws = open_session(port)
    assert owner(ws, port, worker_pids(proc.pid)) in new
    close_session(ws)


# -- daemon and pid file ----------------------------------------------------------

def _find_master_by_title(title: str) -> list:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and cmdline(int(name)) == title:
            found.append(int(name))
    return found


def test_daemon_with_pid_file(processes, echo_target, tmp_path):
    pid_file = tmp_path / "ws.pid"
    logfile = tmp_path / "ws.log"
    port = free_port()
    title = "websockify master 127.0.0.1:%d -> 127.0.0.1:%d" % (port, echo_target)
    proc = processes(websockify_argv("-D", "--pid-file", pid_file, "--log-file", logfile,
                                     "127.0.0.1:%d" % port, "127.0.0.1:%d" % echo_target),
                     name="websockify")
    daemon_pids = []
    try:
        assert proc.wait(10) == 0, proc.log()
        wait_for(lambda: pid_file.exists() and read_text(pid_file).strip(), 10,
                 what="the pid file")
        pid = int(read_text(pid_file).strip())
        daemon_pids.append(pid)
        assert pid != proc.pid
        assert pid_alive(pid)
        wait_for(lambda: cmdline(pid) == title, 5, what="master title, got %r" % cmdline(pid))
        wait_for(lambda: port_open(port), 10, what="the daemon listening")
        ws = open_session(port)
        close_session(ws)
        assert "proxying from" in read_text(logfile)
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not pid_alive(pid), 10, what="the daemon to exit")
        wait_for(lambda: not pid_file.exists(), 5, what="the pid file to be removed")
        assert "websockify stopped" in read_text(logfile)
    finally:
        daemon_pids += _find_master_by_title(title)
        kids = [k for pid in daemon_pids for k in children_of(pid)]
        kill_pids(daemon_pids + kids)


def test_pid_file_without_daemon(websockify, echo_target, tmp_path):
    pid_file = tmp_path / "ws.pid"
    proc, port = websockify("--pid-file", str(pid_file), "127.0.0.1:{port}",
                            "127.0.0.1:%d" % echo_target)
    wait_for(lambda: pid_file.exists(), 5, what="the pid file")
    assert read_text(pid_file).strip() == str(proc.pid)
    proc.signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert not pid_file.exists()


# -- other listeners and targets ---------------------------------------------------

def _short_path(tmp_path, name):
    path = str(tmp_path / name)
    if len(path) > 100:   # AF_UNIX path limit
        path = os.path.join("/tmp", "wsk-%d-%s" % (os.getpid(), name))
    return path


@pytest.mark.parametrize("mode", [None, "0660"])
def test_unix_listen(processes, echo_target, tmp_path, mode):
    path = _short_path(tmp_path, "ws.sock")
    args = ["--unix-listen", path]
    if mode:
        args += ["--unix-listen-mode", mode]
    proc = processes(websockify_argv(*args, "127.0.0.1:%d" % echo_target), name="websockify")
    try:
        wait_for(lambda: os.path.exists(path) or proc.proc.poll() is not None,
                 what="the unix socket")
        assert proc.proc.poll() is None, proc.log()
        assert oct(os.stat(path).st_mode & 0o777) == oct(int(mode or "0600", 8))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            ws = ws_over(sock)
            assert ws.status == 101, (ws.status, ws.buffer)
            assert echoes(ws, b"over a unix socket")
            close_session(ws)
        proc.signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert not os.path.exists(path)
    finally:
        if os.path.exists(path) and not path.startswith(str(tmp_path)):
            os.unlink(path)


def test_inetd_listener_from_stdin(websockify, echo_target):
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        lport = listener.getsockname()[1]
        proc, port = websockify("--inetd", "127.0.0.1:%d" % echo_target, port=lport,
                                stdin=listener.fileno())
    finally:
        listener.close()
    assert "inetd" in proc.log()
    first = open_session(port)
    second = open_session(port)
    assert echoes(first, b"one")
    close_session(first)
    close_session(second)


@pytest.mark.parametrize("what", ["devnull", "unbound socket"])
def test_inetd_without_listening_socket(processes, echo_target, what):
    sock = socket.socket() if what == "unbound socket" else None
    try:
        kwargs = {"stdin": sock.fileno()} if sock else {}
        proc = processes(websockify_argv("--inetd", "127.0.0.1:%d" % echo_target),
                         name="websockify", **kwargs)
        rc = proc.wait(10)
    finally:
        if sock:
            sock.close()
    assert rc == errors.EXIT_LISTEN, proc.log()
    assert len(log_lines(proc.log())) == 1, proc.log()


class UnixEcho:
    """A Unix-socket echo server on a thread."""

    def __init__(self, path):
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.listener.settimeout(0.2)
        self.stopped = threading.Event()
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn):
        conn.settimeout(10)
        echo_connection(conn)

    def stop(self):
        self.stopped.set()
        self.thread.join(2)
        self.listener.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def test_unix_target(websockify, tmp_path):
    echo = UnixEcho(_short_path(tmp_path, "target.sock"))
    try:
        proc, port = websockify("--unix-target", echo.path, "127.0.0.1:{port}")
        ws = open_session(port)
        assert echoes(ws, b"x" * 100000)
        close_session(ws)
        assert echo.connections == 1
        proc.wait_log(r"closed \(1000\)")
        assert "unix:%s" % echo.path in proc.log()
    finally:
        echo.stop()


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) on this host")
def test_ipv6_listen(websockify, echo_target):
    port = free_port(socket.AF_INET6, "::1")
    proc, port = websockify("[::1]:{port}", "127.0.0.1:%d" % echo_target, port=port, wait=False)
    wait_for(lambda: port_open(port, host="::1") or proc.proc.poll() is not None,
             what="websockify on [::1]:%d" % port)
    assert proc.proc.poll() is None, proc.log()
    assert "[::1]:%d" % port in proc.log()
    ws = open_session(port, host="::1")
    assert ws.sock.family == socket.AF_INET6
    close_session(ws)


def test_worker_connections_limit_holds_for_a_burst(websockify, echo_target):
    """Connections that arrive together must not push a worker past --worker-connections."""
    proc, port = websockify("--workers", "1", "--worker-connections", "2",
                            "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    worker = wait_workers(proc.pid, 1)[0]
    clients = []
    os.kill(worker, signal.SIGSTOP)
    try:
        # All eight wait in the backlog together when the worker wakes up.
        for _ in range(8):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    finally:
        os.kill(worker, signal.SIGCONT)

    def split():
        """(clients the worker accepted, clients still in the backlog): a
        connection not yet accepted has no descriptor, so inode 0."""
        held = socket_inodes(worker)
        inodes = [server_side_inode(port, sock.getsockname()[1]) for sock in clients]
        return ([c for c, inode in zip(clients, inodes) if inode and inode in held],
                [c for c, inode in zip(clients, inodes) if inode == 0])
    try:
        # The clients send nothing, so the two accepted stay in their handshake.
        wait_for(lambda: [len(part) for part in split()] == [2, 6], 10,
                 what="2 accepted and 6 waiting, got %s" % [len(p) for p in split()])
        # One of them leaves: its slot goes to exactly one of the others.
        leaving = split()[0][0]
        clients.remove(leaving)
        leaving.close()
        wait_for(lambda: [len(part) for part in split()] == [2, 5], 10,
                 what="2 accepted and 5 waiting, got %s" % [len(p) for p in split()])
    finally:
        for sock in clients:
            sock.close()


# -- descriptor limit ---------------------------------------------------------------

def _nofile(pid: int) -> tuple:
    with open("/proc/%d/limits" % pid) as handle:
        for line in handle:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return soft, hard
    raise AssertionError("no Max open files in /proc/%d/limits" % pid)


def test_descriptor_limit_raised_to_hard(processes, echo_target):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("hard descriptor limit is unlimited")
    low = min(256, hard)
    port = free_port()
    argv = ["sh", "-c", 'ulimit -S -n %d && exec "$@"' % low, "sh"] + websockify_argv(
        "--workers", "1", "127.0.0.1:%d" % port, "127.0.0.1:%d" % echo_target)
    proc = processes(argv, name="websockify")
    wait_for(lambda: port_open(port), what="websockify on port %d" % port)
    workers = wait_workers(proc.pid, 1)
    assert cmdline(proc.pid).startswith("websockify master")
    for pid in [proc.pid] + workers:
        soft_now, hard_now = _nofile(pid)
        assert soft_now == hard_now == str(hard), (pid, soft_now, hard_now)
    assert "descriptor limit %d" % hard in proc.log()
