"""Worker lifecycle under load: kills, reloads, stalls, misbehaving plugins, churn.

Real processes on loopback.  Sessions are opened many at a time from this
process (``Sessions``: non-blocking sockets on one selector), and the
sessions a worker holds are counted from /proc: its socket descriptors
matched against the established TCP connections on the listening port.
Every count is asserted exactly; the only time bounds are the spec's.

LIFECYCLE_CHURN_SECONDS sets the length of the churn test (default 60).
"""

import errno
import os
import re
import resource
import selectors
import signal
import socket
import struct
import threading
import time

import pytest

from tests.helpers import (ESTABLISHED, LISTEN, ROOT, RawWebSocket, children_of,
                           handshake_request, mask_frame, pid_alive, port_open, rss_kib,
                           socket_inodes, tcp_sockets, wait_for)

CHURN_SECONDS = float(os.environ.get("LIFECYCLE_CHURN_SECONDS", "60"))


@pytest.fixture(autouse=True, scope="module")
def many_descriptors():
    """1000+ client sockets in this process: the soft descriptor limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 16
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2500:
        pytest.skip("descriptor limit below 2500")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- many sessions from one process -------------------------------------------------

OK, EOF, RESET, CLOSE, TIMEOUT, MISMATCH = "ok", "eof", "reset", "close", "timeout", "mismatch"
LOST = (EOF, RESET)


class _Conn:
    __slots__ = ("index", "sock", "buf", "want", "got")

    def __init__(self, index, sock):
        self.index = index
        self.sock = sock
        self.buf = b""
        self.want = b""
        self.got = b""


class Sessions:
    """Many WebSocket sessions on non-blocking sockets, driven by one selector.

    ``open`` connects and hand-shakes them, ``echo`` does one masked round
    trip on each and says what became of it (ok, eof, reset, close,
    timeout, mismatch); sessions found lost stay lost.
    """

    def __init__(self, port, path="/", host="127.0.0.1"):
        self.addr = (host, port)
        self.request = handshake_request(path, host)
        self.conns = []          # index -> _Conn, None once closed or lost
        self.rounds = 0

    def __len__(self):
        return sum(1 for c in self.conns if c is not None)

    def live(self) -> list:
        return [c.index for c in self.conns if c is not None]

    def client_port(self, index) -> int:
        return self.conns[index].sock.getsockname()[1]

    def open(self, n, window=64, timeout=60.0) -> dict:
        """Open n more sessions; {reason: count} of those that got no 101 (dropped)."""
        sel = selectors.DefaultSelector()
        failures = {}
        todo, active = n, 0
        deadline = time.monotonic() + timeout

        def fail(conn, reason):
            nonlocal active
            failures[reason] = failures.get(reason, 0) + 1
            sel.unregister(conn.sock)
            conn.sock.close()
            active -= 1

        try:
            while todo or active:
                while todo and active < window:
                    todo -= 1
                    sock = socket.socket()
                    sock.setblocking(False)
                    conn = _Conn(len(self.conns), sock)
                    err = sock.connect_ex(self.addr)
                    active += 1
                    sel.register(sock, selectors.EVENT_WRITE, conn)
                    if err not in (0, errno.EINPROGRESS):
                        fail(conn, "connect: %s" % errno.errorcode.get(err, err))
                left = deadline - time.monotonic()
                if left <= 0:
                    for key in list(sel.get_map().values()):
                        fail(key.data, "timeout")
                    todo = 0
                    break
                for key, events in sel.select(min(left, 1.0)):
                    conn = key.data
                    if events & selectors.EVENT_WRITE:
                        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            fail(conn, "connect: %s" % errno.errorcode.get(err, err))
                            continue
                        try:
                            conn.sock.send(self.request)
                        except OSError as exc:
                            fail(conn, "send: %s" % errno.errorcode.get(exc.errno, exc.errno))
                            continue
                        sel.modify(conn.sock, selectors.EVENT_READ, conn)
                        continue
                    try:
                        data = conn.sock.recv(4096)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        fail(conn, "recv: %s" % errno.errorcode.get(exc.errno, exc.errno))
                        continue
                    if not data:
                        fail(conn, "closed before the 101")
                        continue
                    conn.buf += data
                    head, sep, rest = conn.buf.partition(b"\r\n\r\n")
                    if not sep:
                        continue
                    if not head.startswith(b"HTTP/1.1 101"):
                        fail(conn, head.split(b"\r\n", 1)[0].decode("latin-1"))
                        continue
                    sel.unregister(conn.sock)
                    active -= 1
                    conn.buf = rest
                    self.conns.append(conn)
                    conn.index = len(self.conns) - 1
        finally:
            sel.close()
        return failures

    def open_all(self, n, **kwargs) -> None:
        failures = self.open(n, **kwargs)
        assert not failures, "sessions refused: %r" % failures

    def echo(self, indices=None, timeout=30.0) -> dict:
        """One round trip on each live session: {index: outcome}."""
        self.rounds += 1
        indices = self.live() if indices is None else indices
        outcomes = {}
        sel = selectors.DefaultSelector()
        for i in indices:
            conn = self.conns[i]
            if conn is None:
                outcomes[i] = EOF
                continue
            conn.want = b"%d.%d" % (i, self.rounds)
            conn.got = b""
            try:
                conn.sock.send(mask_frame(0x2, conn.want))
            except (BrokenPipeError, ConnectionResetError):
                outcomes[i] = RESET
                continue
            if not self._parse(conn, outcomes):
                sel.register(conn.sock, selectors.EVENT_READ, conn)
        deadline = time.monotonic() + timeout
        try:
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    for key in list(sel.get_map().values()):
                        outcomes[key.data.index] = TIMEOUT
                    break
                for key, _ in sel.select(min(left, 1.0)):
                    conn = key.data
                    try:
                        data = conn.sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except ConnectionResetError:
                        outcomes[conn.index] = RESET
                        sel.unregister(conn.sock)
                        continue
                    if not data:
                        outcomes[conn.index] = EOF
                        sel.unregister(conn.sock)
                        continue
                    conn.buf += data
                    if self._parse(conn, outcomes):
                        sel.unregister(conn.sock)
        finally:
            sel.close()
        for i, outcome in outcomes.items():
            if outcome in LOST and self.conns[i] is not None:
                self.conns[i].sock.close()
                self.conns[i] = None
        return outcomes

    @staticmethod
    def _frames(conn):
        """Take the whole server frames off conn.buf: (opcode, payload) each."""
        while len(conn.buf) >= 2:
            b0, b1 = conn.buf[0], conn.buf[1]
            length, pos = b1 & 0x7F, 2
            if length == 126:
                if len(conn.buf) < 4:
                    return
                length, pos = struct.unpack("!H", conn.buf[2:4])[0], 4
            elif length == 127:
                if len(conn.buf) < 10:
                    return
                length, pos = struct.unpack("!Q", conn.buf[2:10])[0], 10
            if len(conn.buf) < pos + length:
                return
            payload, conn.buf = conn.buf[pos:pos + length], conn.buf[pos + length:]
            yield b0 & 0x0F, payload

    def _parse(self, conn, outcomes) -> bool:
        """Consume whole server frames; True once the echo is decided."""
        for opcode, payload in self._frames(conn):
            if opcode == 0x8:
                outcomes[conn.index] = CLOSE
                return True
            if opcode in (0x0, 0x1, 0x2):
                conn.got += payload
                if len(conn.got) >= len(conn.want):
                    outcomes[conn.index] = OK if conn.got == conn.want else MISMATCH
                    return True
        return False

    def await_close(self, timeout=30.0) -> dict:
        """Wait for the server's close on every live session, answer it, see the end:
        {index: close code (None without one), or eof/reset/timeout}."""
        sel = selectors.DefaultSelector()
        codes = {}
        for conn in self.conns:
            if conn is not None:
                sel.register(conn.sock, selectors.EVENT_READ, conn)
        deadline = time.monotonic() + timeout
        try:
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    for key in list(sel.get_map().values()):
                        codes.setdefault(key.data.index, TIMEOUT)
                    break
                for key, _ in sel.select(min(left, 1.0)):
                    conn = key.data
                    try:
                        data = conn.sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except ConnectionResetError:
                        data = None
                    if not data:
                        codes.setdefault(conn.index, EOF if data == b"" else RESET)
                        sel.unregister(conn.sock)
                        continue
                    conn.buf += data
                    for opcode, payload in self._frames(conn):
                        if opcode == 0x8 and conn.index not in codes:
                            codes[conn.index] = (struct.unpack("!H", payload[:2])[0]
                                                 if len(payload) >= 2 else None)
                            try:
                                conn.sock.send(mask_frame(0x8, payload[:2]))
                            except OSError:
                                pass
        finally:
            sel.close()
        self.drop()
        return codes

    def close_all(self, timeout=30.0) -> None:
        """Close handshake on every live session, then wait for the server's end."""
        sel = selectors.DefaultSelector()
        close = mask_frame(0x8, struct.pack("!H", 1000))
        for conn in self.conns:
            if conn is None:
                continue
            try:
                conn.sock.send(close)
                sel.register(conn.sock, selectors.EVENT_READ, conn)
            except OSError:
                conn.sock.close()
        deadline = time.monotonic() + timeout
        try:
            while sel.get_map() and time.monotonic() < deadline:
                for key, _ in sel.select(1.0):
                    try:
                        data = key.data.sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(key.data.sock)
                        key.data.sock.close()
        finally:
            for key in list(sel.get_map().values()):
                key.data.sock.close()
            sel.close()
        self.conns = [None] * len(self.conns)

    def drop(self) -> None:
        """Close every socket without a close handshake (teardown)."""
        for conn in self.conns:
            if conn is not None:
                conn.sock.close()
        self.conns = [None] * len(self.conns)


def counts(outcomes: dict) -> dict:
    found = {}
    for outcome in outcomes.values():
        found[outcome] = found.get(outcome, 0) + 1
    return found


# -- processes and their sockets, from /proc --------------------------------------

def cmdline(pid: int) -> str:
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def worker_pids(master_pid: int) -> list:
    return sorted(pid for pid in children_of(master_pid) if pid_alive(pid)
                  and cmdline(pid).startswith("websockify worker"))


def wait_workers(proc, count: int, exclude=(), timeout=10.0) -> list:
    """Wait for ``count`` live workers of the master ``proc``, none in ``exclude``."""
    def found():
        if proc.proc.poll() is not None:
            raise AssertionError("the master exited with status %s:\n%s"
                                 % (proc.proc.returncode, proc.log()))
        pids = [pid for pid in worker_pids(proc.pid) if pid not in exclude]
        return pids if len(pids) == count else None
    return wait_for(found, timeout, what="%d worker(s) of %d other than %s"
                    % (count, proc.pid, sorted(exclude)))


def wait_serving(proc, pids, timeout=10.0) -> None:
    """Wait until each of ``pids`` has logged that it serves (needs -v)."""
    for pid in pids:
        proc.wait_log(r"\b%d\b[^\n]*serving" % pid, timeout)


def fd_count(pid: int) -> int:
    return len(os.listdir("/proc/%d/fd" % pid))





def held_sessions(pid: int, port: int) -> int:
    """Established connections on the listening port whose socket ``pid`` holds."""
    mine = socket_inodes(pid)
    return sum(1 for inode, state, _ in tcp_sockets(port)
               if state == ESTABLISHED and inode in mine)


def owners(sessions: Sessions, port: int, pids) -> dict:
    """{session index: pid of the worker holding its server side}."""
    by_inode = {inode: pid for pid in pids for inode in socket_inodes(pid)}
    by_port = {rport: by_inode.get(inode) for inode, state, rport in tcp_sockets(port)
               if state == ESTABLISHED}
    return {i: by_port.get(sessions.client_port(i)) for i in sessions.live()}


def listening(pids, port: int) -> list:
    """Those of ``pids`` that still hold the listening socket (have not begun to drain)."""
    inodes = {inode for inode, state, _ in tcp_sockets(port) if state == LISTEN}
    return sorted(pid for pid in pids if socket_inodes(pid) & inodes)


def owner_of(sock: socket.socket, port: int, pids):
    """The pid of ``pids`` holding the server side of a connected client socket."""
    cport = sock.getsockname()[1]

    def find():
        inode = next((inode for inode, state, rport in tcp_sockets(port)
                      if rport == cport), None)
        return next((pid for pid in pids if inode in socket_inodes(pid)), None)
    return wait_for(find, 5, what="the worker holding client port %d" % cport)


class PidWatcher:
    """Every child the master has, sampled every 10 ms on a thread."""

    def __init__(self, master_pid):
        self.master_pid = master_pid
        self.seen = set(children_of(master_pid))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.seen.update(children_of(self.master_pid))
            self._stop.wait(0.01)

    def stop(self) -> set:
        self._stop.set()
        self._thread.join(2)
        return self.seen


def session_ok(port, path="/", payload=b"fresh session") -> RawWebSocket:
    ws = RawWebSocket(port, path=path)
    assert ws.status == 101, (ws.status, ws.buffer)
    ws.send_binary(payload)
    assert ws.recv_data(len(payload)) == payload
    return ws


def first_session_after(port, since, path="/", limit=30.0):
    """(seconds from ``since`` to the first 101, the open RawWebSocket)."""
    deadline = time.monotonic() + limit
    while True:
        try:
            ws = RawWebSocket(port, path=path, timeout=max(0.1, deadline - time.monotonic()))
            if ws.status == 101:
                return time.monotonic() - since, ws
            ws.close()
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("no session within %gs" % limit)
        time.sleep(0.01)


def all_ok(outcomes: dict, what="sessions") -> None:
    bad = {i: o for i, o in outcomes.items() if o != OK}
    assert not bad, "%d of %d %s failed: %r" % (len(bad), len(outcomes), what, counts(bad))


# -- a worker killed --------------------------------------------------------------

def test_kill_9_of_one_worker_loses_only_its_sessions(websockify):
    # Each worker takes at most half: with 1000 open both are full, so the
    # session after the kill can only be served by the replacement.
    proc, port = websockify("--echo", "--workers", "2", "--worker-connections", "500",
                            "127.0.0.1:{port}")
    workers = wait_workers(proc, 2)
    sessions = Sessions(port)
    try:
        sessions.open_all(1000)
        all_ok(sessions.echo())
        held = {}

        def all_held():
            held.update({pid: held_sessions(pid, port) for pid in workers})
            return sum(held.values()) == 1000

        wait_for(all_held, 10, what="the two workers to hold the 1000 sessions")
        victim, survivor = workers
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        elapsed, fresh = first_session_after(port, killed_at)
        try:
            replacement = wait_workers(proc, 1, exclude=workers, timeout=5)[0]
            assert owner_of(fresh.sock, port, [survivor, replacement]) == replacement
            assert elapsed < 1.0, "the replacement served %.2fs after the kill" % elapsed
            fresh.send_binary(b"from the replacement")
            assert fresh.recv_data(20) == b"from the replacement"
        finally:
            fresh.close()
        outcomes = sessions.echo()
        found = counts(outcomes)
        lost = found.get(EOF, 0) + found.get(RESET, 0)
        assert lost == held[victim], (held, found)
        assert found.get(OK, 0) == 1000 - held[victim], (held, found)
        assert sorted(worker_pids(proc.pid)) == sorted([survivor, replacement])
        assert proc.proc.poll() is None
    finally:
        sessions.drop()


def test_two_workers_killed_at_once_are_both_replaced(websockify):
    proc, port = websockify("-v", "--echo", "--workers", "2", "127.0.0.1:{port}")
    old = wait_workers(proc, 2)
    # Killed before it is ready, a first-generation worker is a boot failure.
    wait_serving(proc, old)
    sessions = Sessions(port)
    try:
        sessions.open_all(20)
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        new = wait_workers(proc, 2, exclude=old)
        found = counts(sessions.echo())
        assert found.get(EOF, 0) + found.get(RESET, 0) == 20, found
        more = Sessions(port)
        try:
            more.open_all(20)
            all_ok(more.echo())
            assert set(owners(more, port, new).values()) <= set(new)
        finally:
            more.drop()
        assert proc.proc.poll() is None
        assert sorted(worker_pids(proc.pid)) == sorted(new)
    finally:
        sessions.drop()


def test_worker_that_exits_after_boot_is_replaced(websockify):
    proc, port = websockify("-v", "--echo", "--workers", "2", "--graceful-timeout", "1",
                            "127.0.0.1:{port}")
    old = wait_workers(proc, 2)
    wait_serving(proc, old)
    # SIGTERM straight to one worker: it drains and exits with status 0.
    os.kill(old[0], signal.SIGTERM)
    replacement = wait_workers(proc, 1, exclude=old)
    wait_for(lambda: not pid_alive(old[0]), 10, what="worker %d to exit" % old[0])
    assert sorted(worker_pids(proc.pid)) == sorted([old[1]] + replacement)
    session_ok(port).close()
    assert proc.proc.poll() is None


def test_replacements_dying_right_after_boot_do_not_stop_the_master(websockify):
    """Four workers in a row killed as soon as they serve: the master backs off
    (at once, then 1, 2 ... s: the exact ladder is unit-tested) and the fifth serves."""
    proc, port = websockify("-v", "--echo", "--workers", "1", "127.0.0.1:{port}")
    seen = wait_workers(proc, 1)
    wait_serving(proc, seen)
    os.kill(seen[0], signal.SIGKILL)
    for _ in range(3):
        pid = wait_workers(proc, 1, exclude=seen, timeout=30)[0]
        seen.append(pid)
        wait_serving(proc, [pid])
        os.kill(pid, signal.SIGKILL)
    last = wait_workers(proc, 1, exclude=seen, timeout=30)[0]
    _, ws = first_session_after(port, time.monotonic(), limit=30)
    try:
        assert owner_of(ws.sock, port, [last]) == last
    finally:
        ws.close()
    assert proc.proc.poll() is None
    assert len(set(seen)) == 4
    log = proc.log()
    for delay in (1, 2):
        assert re.search(r"WARNING worker 1 \(pid \d+\) killed by signal 9 \d+\.\d s after it "
                         r"started, \d+ times in a row; starting a new one in %d s" % delay, log), log


# -- reloads -----------------------------------------------------------------------

def test_sighup_keeps_1000_sessions_and_new_workers_serve(websockify):
    proc, port = websockify("--echo", "--workers", "2", "--graceful-timeout", "30",
                            "127.0.0.1:{port}")
    old = wait_workers(proc, 2)
    sessions = Sessions(port)
    try:
        sessions.open_all(1000)
        all_ok(sessions.echo())
        # A readiness probe's connection may still be ESTABLISHED until the
        # worker reads its EOF: wait for exactly the sessions.
        wait_for(lambda: sum(held_sessions(pid, port) for pid in old) == 1000, 15,
                 what="the old workers to hold exactly the 1000 sessions")
        hup_at = time.monotonic()
        proc.signal(signal.SIGHUP)
        new = wait_workers(proc, 2, exclude=old, timeout=15)
        # The old generation has been told to drain: it closed its listener.
        wait_for(lambda: not listening(old, port), 15, what="old workers to stop listening")
        all_ok(sessions.echo(), "sessions held across the SIGHUP")
        fresh = Sessions(port)
        try:
            fresh.open_all(20)
            all_ok(fresh.echo())
            assert set(owners(fresh, port, old + new).values()) <= set(new)
        finally:
            fresh.drop()
        all_ok(sessions.echo(), "sessions held across the SIGHUP")
        assert sum(held_sessions(pid, port) for pid in old) == 1000
        assert time.monotonic() - hup_at < 30, "checked after --graceful-timeout: void"
        assert proc.proc.poll() is None
    finally:
        sessions.drop()


def test_hup_storm_keeps_sessions_and_the_newest_generation_serves(websockify):
    proc, port = websockify("--echo", "--workers", "4", "--graceful-timeout", "60",
                            "127.0.0.1:{port}")
    first = wait_workers(proc, 4)
    sessions = Sessions(port)
    try:
        sessions.open_all(200)
        all_ok(sessions.echo())
        holding = [pid for pid in first if held_sessions(pid, port)]
        for _ in range(10):            # 10 HUPs in 5 s
            proc.signal(signal.SIGHUP)
            time.sleep(0.5)
            assert proc.proc.poll() is None, proc.log()

        # SIGUSR1 as a barrier: the master dispatches signals in the order its
        # handlers ran them, and a HUP still pending with it runs first.  Once
        # its line is logged every HUP has been seen, and the storm is over when
        # each reload begun ("replacing workers") has logged "reload done".
        proc.signal(signal.SIGUSR1)
        proc.wait_log(r"got SIGUSR1: reopening log files", 10)

        def settled():
            log = proc.log()
            begun = log.count("got SIGHUP: replacing workers")
            return begun if begun and begun == log.count("reload done:") else None
        reloads = wait_for(settled, 60, what="every reload of the HUP storm done")
        assert 2 <= reloads <= 10, proc.log()   # coalesced, and at least one after the first
        # No reload follows now, so the listening workers only dwindle: the
        # generations before the newest were told to drain and close the listener.
        def newest():
            pids = listening(worker_pids(proc.pid), port)
            return pids if len(pids) == 4 else None
        serving = wait_for(newest, 10, what="only the newest generation listening")
        assert not set(serving) & set(first)
        all_ok(sessions.echo(), "sessions held through the HUP storm")
        fresh = Sessions(port)
        try:
            fresh.open_all(40)
            all_ok(fresh.echo())
            assert set(owners(fresh, port, worker_pids(proc.pid)).values()) <= set(serving)
        finally:
            fresh.drop()
        # Generations between the first and the newest held nothing: gone.
        wait_for(lambda: worker_pids(proc.pid) == sorted(holding + serving), 30,
                 what="only the first generation's busy workers and the newest")
        all_ok(sessions.echo(), "sessions held through the HUP storm")
        assert proc.proc.poll() is None
    finally:
        sessions.drop()


FAKE_SETPROCTITLE = '''
import os

def setproctitle(title):
    # Boot breaks for workers forked while the flag file exists.
    if title.startswith("websockify worker") and os.path.exists(os.environ["BREAK_BOOT"]):
        raise RuntimeError("boot broken on purpose for %r" % title)
'''


def test_reload_whose_workers_fail_to_boot_keeps_the_old_generation(websockify, tmp_path):
    # The new generation cannot boot: setproctitle (first thing a worker
    # does) fails while a flag file exists.  The fake module has no titles,
    # so workers are the master's children here.
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "setproctitle.py").write_text(FAKE_SETPROCTITLE)
    flag = tmp_path / "break-boot"
    proc, port = websockify("-v", "--echo", "--workers", "2", "--graceful-timeout", "30",
                            "127.0.0.1:{port}",
                            env={"PYTHONPATH": str(fake) + os.pathsep + ROOT,
                                 "BREAK_BOOT": str(flag)})
    old = wait_for(lambda: (lambda k: sorted(k) if len(k) == 2 else None)(children_of(proc.pid)),
                   what="two workers")
    # Both old workers must be ready before boots start failing.
    wait_serving(proc, old)
    sessions = Sessions(port)
    try:
        sessions.open_all(100)
        all_ok(sessions.echo())
        flag.write_text("")
        proc.signal(signal.SIGHUP)
        proc.wait_log(r"boot broken on purpose", timeout=15)
        proc.wait_log(r"reload failed: worker \d \(pid \d+\) of the new generation exited "
                      r"with status 3 before it was ready; the previous workers keep serving",
                      timeout=15)
        assert proc.proc.poll() is None, proc.log()
        assert all(pid_alive(pid) for pid in old)
        all_ok(sessions.echo(), "sessions of the old generation")
        fresh = Sessions(port)
        try:
            fresh.open_all(20)
            all_ok(fresh.echo(), "new sessions while the reload fails")
            assert set(owners(fresh, port, old).values()) <= set(old)
        finally:
            fresh.drop()
        # Fixed: the next reload brings a generation that serves.
        flag.unlink()
        proc.signal(signal.SIGHUP)
        new = wait_for(lambda: (lambda k: k if len(k) >= 2 and not listening(old, port)
                                and len(listening(k, port)) == 2 else None)(
            [pid for pid in children_of(proc.pid) if pid not in old]),
            30, what="a new generation serving")
        fresh = Sessions(port)
        try:
            fresh.open_all(20)
            all_ok(fresh.echo())
            assert set(owners(fresh, port, new + old).values()) <= set(new)
        finally:
            fresh.drop()
        all_ok(sessions.echo(), "sessions of the old generation")
        assert proc.proc.poll() is None
    finally:
        sessions.drop()


def test_sighup_during_sigterm_drain_is_ignored(websockify):
    proc, port = websockify("--echo", "--workers", "2", "--graceful-timeout", "5",
                            "127.0.0.1:{port}")
    workers = wait_workers(proc, 2)
    watcher = PidWatcher(proc.pid)
    sessions = Sessions(port)
    try:
        sessions.open_all(20)
        proc.signal(signal.SIGTERM)
        term_at = time.monotonic()
        wait_for(lambda: not listening(workers, port), 5, what="workers to begin draining")
        for _ in range(3):
            proc.signal(signal.SIGHUP)
        time.sleep(0.5)
        outcomes = sessions.echo()
        if time.monotonic() - term_at < 5:
            all_ok(outcomes, "sessions during the drain")
        # After --graceful-timeout, every session is closed with 1001.
        codes = sessions.await_close(30)
        assert counts(codes) == {1001: 20}, counts(codes)
        assert proc.wait(30) == 0, proc.log()
        assert watcher.stop() == set(workers), "workers forked after SIGTERM"
        assert not any(pid_alive(pid) for pid in workers)
        assert not port_open(port)
    finally:
        sessions.drop()


@pytest.mark.parametrize("when", ["at once", "new workers forked"])
def test_sigterm_during_reload_stops_cleanly(websockify, when):
    proc, port = websockify("--echo", "--workers", "2", "--graceful-timeout", "3",
                            "127.0.0.1:{port}")
    old = wait_workers(proc, 2)
    watcher = PidWatcher(proc.pid)
    sessions = Sessions(port)
    try:
        sessions.open_all(20)
        proc.signal(signal.SIGHUP)
        if when == "new workers forked":
            wait_for(lambda: len(set(children_of(proc.pid)) - set(old)) >= 2, 10,
                     what="the new generation forked")
        proc.signal(signal.SIGTERM)
        codes = sessions.await_close(30)
        assert counts(codes) == {1001: 20}, counts(codes)
        assert proc.wait(30) == 0, proc.log()
        seen = watcher.stop()
        assert set(old) <= seen
        left = [pid for pid in seen if pid_alive(pid)]
        assert not left, "orphan workers: %s" % left
        assert not port_open(port)
    finally:
        sessions.drop()


# -- a stalled worker -------------------------------------------------------------

STALL_PLUGIN = '''
import time
from gevent import monkey

real_sleep = monkey.get_original("time", "sleep")


class StallPlugin:
    """'stall' blocks the whole event loop for 30 s; any other token: the echo target."""

    def __init__(self, src):
        self.target = ("127.0.0.1", int(src))

    def lookup(self, token):
        if token == "stall":
            real_sleep(30)
        return self.target
'''


def test_stalled_worker_is_replaced_and_the_other_carries_on(websockify, echo_target, tmp_path):
    plugin = tmp_path / "stallplugin.py"
    plugin.write_text(STALL_PLUGIN)
    proc, port = websockify("--workers", "2", "--worker-timeout", "2",
                            "--token-plugin", "stallplugin.StallPlugin",
                            "--token-source", str(echo_target), "127.0.0.1:{port}",
                            env={"PYTHONPATH": str(tmp_path) + os.pathsep + ROOT})
    workers = wait_workers(proc, 2)
    sessions = Sessions(port, path="/?token=ok")
    staller = None
    try:
        # One at a time, so that both workers hold some.
        for _ in range(20):
            sessions.open_all(1, window=1)
        all_ok(sessions.echo())
        owner_by_session = owners(sessions, port, workers)
        assert set(owner_by_session.values()) == set(workers), owner_by_session
        staller = socket.create_connection(("127.0.0.1", port), timeout=30)
        staller.sendall(handshake_request("/?token=stall"))
        stalled = owner_of(staller, port, workers)
        other = [pid for pid in workers if pid != stalled][0]
        mine = [i for i, pid in owner_by_session.items() if pid == other]
        theirs = [i for i, pid in owner_by_session.items() if pid == stalled]
        all_ok(sessions.echo(mine), "sessions of the other worker during the stall")

        wait_for(lambda: not pid_alive(stalled), 20, what="the stalled worker %d to go" % stalled)
        replacement = wait_workers(proc, 1, exclude=workers, timeout=10)[0]
        assert sorted(worker_pids(proc.pid)) == sorted([other, replacement])
        log = proc.log()
        assert re.search(r'File "%s", line \d+ in lookup' % re.escape(str(plugin)), log), log
        assert re.search(r"SIGABRT|signal 6|Aborted", log), log
        assert [line for line in log.splitlines() if str(stalled) in line
                and re.search(r"(?i)time|stopped reporting", line)], log

        all_ok(sessions.echo(mine), "sessions of the other worker after the stall")
        found = counts(sessions.echo(theirs))
        assert found.get(EOF, 0) + found.get(RESET, 0) == len(theirs), found
        session_ok(port, path="/?token=ok").close()
        assert proc.proc.poll() is None
    finally:
        sessions.drop()
        if staller is not None:
            staller.close()


# -- plugins that misbehave ------------------------------------------------------

BAD_PLUGINS = '''
import sys


class BadPlugin:
    """Misbehaves for the token that names how; any other token: the echo target."""

    def __init__(self, src):
        self.target = ("127.0.0.1", int(src))

    def lookup(self, token):
        if token == "exit":
            sys.exit(3)
        if token == "interrupt":
            raise KeyboardInterrupt
        if token == "memory":
            raise MemoryError
        if token == "int":
            return 42
        if token == "junk3":
            return ("a", b"b", None)
        return self.target


class ExitAuth:
    """sys.exit() for a request with an X-Exit header; everything else is allowed."""

    def __init__(self, src=None):
        pass

    def authenticate(self, headers, target_host, target_port):
        if headers.get("X-Exit"):
            sys.exit(4)
'''


def _held_on_one_worker(proc, port, path):
    worker = wait_workers(proc, 1)[0]
    sessions = Sessions(port, path=path)
    sessions.open_all(10)
    all_ok(sessions.echo())
    return worker, sessions


@pytest.mark.parametrize("token,status", [("exit", 500), ("interrupt", 500), ("memory", 500),
                                          ("int", 502), ("junk3", 502)])
def test_token_plugin_misbehaving_costs_one_session(websockify, echo_target, tmp_path,
                                                    token, status):
    (tmp_path / "badplugins.py").write_text(BAD_PLUGINS)
    proc, port = websockify("--workers", "1", "--token-plugin", "badplugins.BadPlugin",
                            "--token-source", str(echo_target), "127.0.0.1:{port}",
                            env={"PYTHONPATH": str(tmp_path) + os.pathsep + ROOT})
    worker, sessions = _held_on_one_worker(proc, port, "/?token=ok")
    try:
        bad = RawWebSocket(port, path="/?token=%s" % token)
        try:
            assert bad.status == status, (bad.status, bad.buffer, proc.log())
        finally:
            bad.close()
        all_ok(sessions.echo(), "sessions held on the worker")
        session_ok(port, path="/?token=ok").close()
        all_ok(sessions.echo(), "sessions held on the worker")
        assert worker_pids(proc.pid) == [worker]
        assert proc.proc.poll() is None
    finally:
        sessions.drop()


def test_auth_plugin_calling_sys_exit_costs_one_session(websockify, echo_target, tmp_path):
    (tmp_path / "badplugins.py").write_text(BAD_PLUGINS)
    proc, port = websockify("--workers", "1", "--auth-plugin", "badplugins.ExitAuth",
                            "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target,
                            env={"PYTHONPATH": str(tmp_path) + os.pathsep + ROOT})
    worker, sessions = _held_on_one_worker(proc, port, "/")
    try:
        bad = RawWebSocket(port, extra=["X-Exit: yes"])
        try:
            assert bad.status == 500, (bad.status, bad.buffer, proc.log())
        finally:
            bad.close()
        all_ok(sessions.echo(), "sessions held on the worker")
        session_ok(port).close()
        assert worker_pids(proc.pid) == [worker]
        assert proc.proc.poll() is None
    finally:
        sessions.drop()


# -- churn ------------------------------------------------------------------------

def _descriptors(proc, workers) -> dict:
    counts = {}
    for pid in [proc.pid] + workers:
        try:
            counts[pid] = fd_count(pid)
        except FileNotFoundError:
            raise AssertionError("process %d is gone during the churn:\n%s"
                                 % (pid, proc.log())) from None
    return counts


def test_churn_beside_held_sessions_leaks_no_descriptors_or_memory(websockify):
    proc, port = websockify("--echo", "--workers", "2", "127.0.0.1:{port}")
    workers = wait_workers(proc, 2)
    held = Sessions(port)
    try:
        held.open_all(100)
        all_ok(held.echo())

        def churn(seconds):
            done = 0
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                batch = Sessions(port)
                try:
                    batch.open_all(8, window=8)
                    all_ok(batch.echo(), "churned sessions")
                    batch.close_all()
                finally:
                    batch.drop()
                done += 8
            return done

        churn(3)                   # warm-up: first-use allocations are not a leak
        wait_for(lambda: sum(held_sessions(pid, port) for pid in workers) == 100, 10,
                 what="only the 100 held sessions left")
        fds_before = _descriptors(proc, workers)
        rss_before = {pid: rss_kib(pid) for pid in workers}

        done = churn(CHURN_SECONDS)

        try:
            wait_for(lambda: _descriptors(proc, workers) == fds_before, 15,
                     what="descriptors back to where they were")
        except AssertionError:
            pass
        fds_after = _descriptors(proc, workers)
        assert fds_after == fds_before, "descriptors (pid: count) after %d sessions in %gs" % (
            done, CHURN_SECONDS)
        growth = {pid: rss_kib(pid) - rss_before[pid] for pid in workers}
        assert all(g < 4096 for g in growth.values()), (
            "RSS growth (KiB) after %d sessions in %gs: %r" % (done, CHURN_SECONDS, growth))
        all_ok(held.echo(), "held sessions after the churn")
        assert worker_pids(proc.pid) == workers
        assert proc.proc.poll() is None
    finally:
        held.drop()
