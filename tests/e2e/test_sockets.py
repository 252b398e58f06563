"""Listeners: TCP_NODELAY and keepalive on both legs, Unix socket mode, inetd,
systemd socket activation."""

import ctypes
import os
import socket
import tempfile

import pytest

from tests.helpers import (PYTHON, ROOT, RawWebSocket, children_of, free_port,
                           handshake_request, port_open, read_http_response, wait_for)
from websockify.errors import EXIT_LISTEN
from websockify.net.sockets import (inetd_listener, systemd_listen_fds, tcp_listener,
                                unix_listener)


def options(sock):
    return (sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0,
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0)


def test_accepted_client_sockets_inherit_nodelay_and_keepalive():
    listener = tcp_listener("127.0.0.1", 0)
    try:
        listener.setblocking(True)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            accepted, _ = listener.accept()
            with accepted:
                assert options(accepted) == (True, True)
    finally:
        listener.close()


# -- the options of a running server's sockets -----------------------------------

SYS_PIDFD_GETFD = 438        # the same number on every Linux architecture


def socket_inode(local_port: int, remote_port: int):
    """The inode of the loopback TCP socket from ``local_port`` to ``remote_port``."""
    with open("/proc/net/tcp") as handle:
        for line in handle.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1].rsplit(":", 1)[1], fields[2].rsplit(":", 1)[1]
            if int(local, 16) == local_port and int(remote, 16) == remote_port:
                return int(fields[9])
    return None


def borrow_socket(pid: int, inode: int) -> socket.socket:
    """A duplicate of the descriptor process ``pid`` holds for socket ``inode``
    (pidfd_getfd): the same socket, so its options are the ones the process set."""
    fd = next((int(name) for name in os.listdir("/proc/%d/fd" % pid)
               if os.readlink("/proc/%d/fd/%s" % (pid, name)) == "socket:[%d]" % inode),
              None)
    assert fd is not None, "process %d holds no descriptor for socket %d" % (pid, inode)
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        copy = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    finally:
        os.close(pidfd)
    if copy < 0:
        err = ctypes.get_errno()
        # An old kernel or no right to another process's descriptors: nothing
        # else shows TCP_NODELAY from outside the process.
        pytest.skip("pidfd_getfd is not available here: %s" % os.strerror(err))
    return socket.socket(fileno=copy)


def test_running_server_sets_nodelay_and_keepalive_on_both_legs(websockify):
    """Read from the worker's own sockets: the one to the target (the proxy tunes
    it after connecting) and the one from the client (inherited from the listener)."""
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen(1)
    target.settimeout(10)
    target_port = target.getsockname()[1]
    try:
        proc, port = websockify("--workers", "1", "127.0.0.1:{port}",
                                "127.0.0.1:%d" % target_port)
        [worker] = wait_for(lambda: children_of(proc.pid), what="the worker")
        ws = RawWebSocket(port)
        try:
            assert ws.status == 101, (ws.status, ws.buffer)
            conn, (_, worker_port) = target.accept()
            with conn:
                legs = {"to the target": socket_inode(worker_port, target_port),
                        "from the client": socket_inode(port, ws.sock.getsockname()[1])}
                for leg, inode in legs.items():
                    assert inode is not None, leg
                    with borrow_socket(worker, inode) as sock:
                        assert options(sock) == (True, True), leg
        finally:
            ws.close()
    finally:
        target.close()


def test_unix_listener_mode(tmp_path):
    path = str(tmp_path / "ws.sock")
    listener = unix_listener(path, 0o640)
    try:
        import os
        import stat
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    finally:
        listener.close()


def test_inetd_listener_refuses_a_socket_that_is_not_listening():
    import pytest
    from websockify.net.sockets import ListenError
    sock = socket.socket()
    try:
        with pytest.raises(ListenError):
            inetd_listener(sock.fileno())
    finally:
        sock.close()


# -- systemd socket activation (LISTEN_PID, LISTEN_FDS, fd 3) ---------------------

# What systemd does before starting the service: the socket on fd 3, the
# variables naming this very process (after the fork, before the exec).
ACTIVATE = """
import os, sys
os.dup2(0, 3)
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
os.close(null)
pid = sys.argv[1]
os.environ["LISTEN_PID"] = str(os.getpid()) if pid == "self" else pid
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_FDNAMES"] = "websockify.socket"
os.execv(sys.executable, [sys.executable, "-m", "websockify"] + sys.argv[2:])
"""

# A token plugin that refuses (403) if a worker still sees the variables.
ENV_CHECK_PLUGIN = """
import os

class EnvCheck:
    def __init__(self, source):
        self.source = source

    def lookup(self, token):
        leaked = [name for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
                  if name in os.environ]
        if leaked:
            raise Exception("inherited %s" % leaked)
        host, port = self.source.rsplit(":", 1)
        return host, int(port)
"""


def activated(processes, tmp_path, listener, *args, listen_pid="self"):
    (tmp_path / "envcheck.py").write_text(ENV_CHECK_PLUGIN)
    env = {"PYTHONPATH": ROOT + os.pathsep + str(tmp_path)}
    return processes([PYTHON, "-c", ACTIVATE, listen_pid] + [str(a) for a in args],
                     name="activated", env=env, stdin=listener.fileno())


def echo_through(connect, path="/?token=x"):
    sock = connect()
    ws = RawWebSocket.__new__(RawWebSocket)
    ws.sock = sock
    sock.sendall(handshake_request(path))
    ws.status, ws.headers, ws.buffer = read_http_response(sock)
    try:
        assert ws.status == 101, (ws.status, ws.buffer)
        ws.send_binary(b"activated")
        assert ws.recv_data(9) == b"activated"
        ws.send(0x8, b"\x03\xe8")
        assert ws.expect_close() == (1000, "")
    finally:
        ws.close()


@pytest.fixture
def tcp_activation_socket():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock
    sock.close()


def test_socket_activation_serves_websocket(processes, tmp_path, echo_target,
                                            tcp_activation_socket):
    port = tcp_activation_socket.getsockname()[1]
    proc = activated(processes, tmp_path, tcp_activation_socket, "--workers", "2",
                     "--token-plugin", "envcheck.EnvCheck",
                     "--token-source", "127.0.0.1:%d" % echo_target)
    proc.wait_log(r"Listen on 127\.0\.0\.1:%d \(socket passed by systemd\)" % port)
    proc.wait_log(r"proxying from systemd socket")
    tcp_activation_socket.close()            # only the server holds it now
    for _ in range(3):                       # reaches both workers, most likely
        echo_through(lambda: socket.create_connection(("127.0.0.1", port), timeout=10))
    assert "inherited" not in proc.log(), proc.log()
    assert proc.proc.poll() is None


def test_socket_activation_of_a_unix_socket(processes, tmp_path, echo_target):
    directory = tempfile.mkdtemp(prefix="wsact")
    path = os.path.join(directory, "ws.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(16)
        proc = activated(processes, tmp_path, listener, "--workers", "1",
                         "127.0.0.1:%d" % echo_target)
        proc.wait_log(r"proxying from systemd socket")

        def connect():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(path)
            return sock
        echo_through(connect, path="/")
    finally:
        listener.close()
        os.unlink(path)
        os.rmdir(directory)


def test_listen_address_given_under_activation_is_not_used(processes, tmp_path, echo_target,
                                                           tcp_activation_socket):
    port = tcp_activation_socket.getsockname()[1]
    unused = free_port()
    proc = activated(processes, tmp_path, tcp_activation_socket, "--workers", "1",
                     "127.0.0.1:%d" % unused, "127.0.0.1:%d" % echo_target)
    proc.wait_log(r"proxying from systemd socket")
    echo_through(lambda: socket.create_connection(("127.0.0.1", port), timeout=10), path="/")
    assert not port_open(unused)


def test_variables_for_another_process_are_ignored(processes, tmp_path, echo_target,
                                                   tcp_activation_socket):
    # LISTEN_PID names our parent (as when a shell script was activated).
    port = free_port()
    proc = activated(processes, tmp_path, tcp_activation_socket, "--workers", "1",
                     "127.0.0.1:%d" % port, "127.0.0.1:%d" % echo_target,
                     listen_pid=str(os.getpid()))
    wait_for(lambda: port_open(port) or proc.proc.poll() is not None, what="listening")
    proc.wait_log(r"proxying from 127\.0\.0\.1:%d" % port)
    echo_through(lambda: socket.create_connection(("127.0.0.1", port), timeout=10), path="/")


def test_variables_for_another_process_need_a_listen_address(processes, tmp_path,
                                                             echo_target,
                                                             tcp_activation_socket):
    proc = activated(processes, tmp_path, tcp_activation_socket,
                     "127.0.0.1:%d" % echo_target, listen_pid="1")
    assert proc.wait(10) == 2
    # Without the passed socket the one address left is the target: no listen address.
    assert "websockify: error: Too few arguments" in proc.log(), proc.log()


def test_activated_descriptor_that_is_not_listening(processes, tmp_path, echo_target):
    sock = socket.socket()
    try:
        proc = activated(processes, tmp_path, sock, "127.0.0.1:%d" % echo_target)
        assert proc.wait(10) == EXIT_LISTEN
        errors = [line for line in proc.log().splitlines() if "ERROR" in line]
        assert len(errors) == 1, proc.log()
        assert "socket activation: descriptor 3 is not a listening stream socket" in errors[0]
    finally:
        sock.close()


@pytest.mark.parametrize("environ, expected", [
    ({"LISTEN_PID": "self", "LISTEN_FDS": "1"}, 1),
    ({"LISTEN_PID": "self", "LISTEN_FDS": "2"}, 2),
    ({"LISTEN_PID": "self", "LISTEN_FDS": "0"}, 0),
    ({"LISTEN_PID": "1", "LISTEN_FDS": "1"}, 0),
    ({"LISTEN_PID": "self"}, 0),
    ({"LISTEN_PID": "x", "LISTEN_FDS": "1"}, 0),
    ({}, 0),
])
def test_systemd_listen_fds(environ, expected):
    if environ.get("LISTEN_PID") == "self":
        environ = dict(environ, LISTEN_PID=str(os.getpid()))
    assert systemd_listen_fds(environ) == expected
