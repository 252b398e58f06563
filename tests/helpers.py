"""Test helpers: real server processes on loopback and a byte-level WebSocket client."""

import base64
import importlib
import inspect
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


# -- what the tests need from the machine --------------------------------------

def in_ci() -> bool:
    """CI runs .ci/run with CI=true; that script installs what the tests need."""
    return os.environ.get("CI") == "true"


def skip_or_fail(reason: str) -> None:
    """A missing requirement skips the test locally, with ``reason``; in CI it
    fails it, so that a broken install cannot pass as a green run."""
    if in_ci():
        pytest.fail("%s; CI=true, where it must be installed (.ci/run, the test extra)"
                    % reason, pytrace=False)
    pytest.skip(reason)


# Debian installs daemons (nginx) in sbin, which a non-root PATH often lacks.
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def find_program(*names):
    """The path of the first of ``names`` found on PATH or in the sbin folders."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath)] + list(_SBIN))
    for name in names:
        found = shutil.which(name, path=search)
        if found:
            return found
    return None


def require_program(name: str, package: str, *alternatives: str) -> str:
    """The path of program ``name`` (or of one of ``alternatives``); skips
    locally, fails in CI, when none is installed."""
    found = find_program(name, *alternatives)
    if found is None:
        skip_or_fail("%s is not installed (Debian package %s)" % (name, package))
    return found


def require_module(name: str, install: str):
    """Python module ``name`` imported; skips locally, fails in CI, when missing
    (the test extra installs it)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        skip_or_fail("%s is not installed (%s)" % (name, install))


def free_port(family=socket.AF_INET, host="127.0.0.1") -> int:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout=10.0, interval=0.05, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out after %gs waiting for %s" % (timeout, what))


def port_open(port, host="127.0.0.1", family=socket.AF_INET) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def children_of(pid: int) -> list:
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        return []


def fd_links(pid: int) -> set:
    """What the descriptors of process ``pid`` point to (readlink of /proc/<pid>/fd/*)."""
    links = set()
    try:
        names = os.listdir("/proc/%d/fd" % pid)
    except OSError:
        return links
    for name in names:
        try:
            links.add(os.readlink("/proc/%d/fd/%s" % (pid, name)))
        except OSError:
            pass        # closed since the listing
    return links


def socket_inodes(pid: int) -> set:
    """Inodes of the sockets process ``pid`` holds (from /proc/<pid>/fd)."""
    return {int(link[8:-1]) for link in fd_links(pid) if link.startswith("socket:[")}


ESTABLISHED, LISTEN = "01", "0A"      # /proc/net/tcp's state codes


def tcp_sockets(port: int) -> list:
    """(inode, state, remote port) of the TCP sockets whose local port is ``port``.

    The kernel writes the tables a chunk per read and resumes by position, so
    a table changing meanwhile (other tests' connections) can show a socket
    twice: each table is read in one large read and each socket counted once.
    """
    found = []
    seen = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, "rb", buffering=0) as handle:
                text = _read_whole(handle).decode("ascii", "replace")
        except OSError:
            continue
        for line in text.splitlines()[1:]:
            fields = line.split()
            if len(fields) < 10 or int(fields[1].rsplit(":", 1)[1], 16) != port:
                continue
            inode = int(fields[9])
            if inode and inode in seen:
                continue
            seen.add(inode)
            found.append((inode, fields[3], int(fields[2].rsplit(":", 1)[1], 16)))
    return found


def _read_whole(handle) -> bytes:
    chunks = []
    while True:
        chunk = handle.read(1 << 22)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def rss_kib(pid: int) -> int:
    """Resident memory of a process, in KiB."""
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for %d" % pid)


def pid_alive(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


class Process:
    """A real process started for a test, logged to a file, stopped by its pid."""

    def __init__(self, argv, log_path, env=None, cwd=None, stdin=None):
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        if env:
            full_env.update(env)
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=full_env, cwd=cwd or ROOT,
                                     stdin=stdin if stdin is not None else subprocess.DEVNULL)
        self.pid = self.proc.pid

    def log(self) -> str:
        self._log.flush()
        with open(self.log_path, "rb") as handle:
            return handle.read().decode("utf-8", "replace")

    def wait_log(self, pattern, timeout=10.0):
        regex = re.compile(pattern)
        return wait_for(lambda: regex.search(self.log()), timeout,
                        what="log line %r in:\n%s" % (pattern, self.log()))

    def wait(self, timeout=10.0):
        return self.proc.wait(timeout)

    def signal(self, signum):
        if self.proc.poll() is None:
            os.kill(self.pid, signum)

    def stop(self, timeout=10.0):
        """SIGTERM, then SIGKILL the process and any children left behind."""
        kids = children_of(self.pid)
        grandkids = [g for k in kids for g in children_of(k)]
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        for pid in kids + grandkids:
            if pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._log.close()


def websockify_argv(*args):
    return [PYTHON, "-m", "websockify"] + [str(a) for a in args]


def ipv6_available() -> bool:
    """Whether this host can bind ::1."""
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


# Test payloads: random bytes repeating with a prime period, so no repetition
# lines up with a frame, window or read size.
_PATTERN_PERIOD = 1000003
_PATTERN = os.urandom(_PATTERN_PERIOD)


def pattern(size: int) -> bytes:
    return (_PATTERN * (size // _PATTERN_PERIOD + 1))[:size]


def bridge_echoes(port, token, sizes=(1, 12, 65536, 300000)):
    """A bridge session to ``?token=<token>`` (an echo service behind it): each size's
    pattern comes back exactly, then a close 1000 answered with 1000."""
    websocket_echoes(port, "/websockify?token=%s" % token, sizes)


def websocket_echoes(port, path, sizes):
    """A WebSocket session to ``path`` whose messages are echoed: each size's pattern
    comes back exactly, then a close 1000 answered with 1000."""
    ws = RawWebSocket(port, path=path)
    try:
        assert ws.status == 101, ws.buffer
        for size in sizes:
            data = pattern(size)
            ws.send_binary(data)
            assert ws.recv_data(size) == data
        ws.send(0x8, struct.pack("!H", 1000))
        assert ws.expect_close()[0] == 1000
    finally:
        ws.close()


def echo_through(port, path="/", extra=(), payload=b"hello through the token"):
    """One WebSocket session that must echo ``payload`` through the server."""
    ws = RawWebSocket(port, path=path, extra=extra)
    try:
        assert ws.status == 101, (ws.status, ws.buffer)
        ws.send_binary(payload)
        assert ws.recv_data(len(payload)) == payload
    finally:
        ws.close()


class SharedProcess:
    """A Process a module's tests share, as one test sees it: ``log()`` is what
    it logged since ``mark()``, which the test's fixture calls at its start;
    everything else (pid, proc, signal) is the Process's."""

    def __init__(self, process):
        self._process = process
        self._mark = 0

    def __getattr__(self, name):
        return getattr(self._process, name)

    def mark(self):
        self._mark = len(self._process.log())

    def log(self) -> str:
        return self._process.log()[self._mark:]

    def whole_log(self) -> str:
        return self._process.log()

    def wait_log(self, pattern, timeout=10.0):
        regex = re.compile(pattern)
        return wait_for(lambda: regex.search(self.log()), timeout,
                        what="log line %r in:\n%s" % (pattern, self.log()))


class ServerUnderTest:
    """A running websockify, its worker processes and its log, as tests read them."""

    def __init__(self, proc, port, target_port, workers=1):
        self.proc = proc
        self.port = port
        self.target_port = target_port
        self.workers = sorted(wait_for(
            lambda: len(children_of(proc.pid)) == workers and children_of(proc.pid),
            what="%d worker process(es)" % workers))
        self._mark = 0

    def mark(self):
        """A test starts on a server other tests used before: ``lines_about``
        and ``wait_line`` see only what is logged from now on (a client's
        local port can come round again)."""
        self._mark = len(self.proc.log())

    def log(self):
        """The whole log: checks for crashes and errors see every test's part."""
        return self.proc.log()

    def recent_log(self):
        """The log since the last ``mark``."""
        return self.proc.log()[self._mark:]

    def lines_about(self, cport):
        """The log lines about the client whose local port is ``cport``."""
        regex = re.compile(r"\b127\.0\.0\.1:%d\b" % cport)
        return [line for line in self.recent_log().splitlines() if regex.search(line)]

    def wait_line(self, pattern, timeout=10.0):
        regex = re.compile(pattern)
        return wait_for(lambda: regex.search(self.recent_log()), timeout,
                        what="log line %r in:\n%s" % (pattern, self.recent_log()))


# -- a byte-level WebSocket client -------------------------------------------

def handshake_request(path="/", host="127.0.0.1", key=None, version="13",
                      protocols="binary", extra=()) -> bytes:
    key = key if key is not None else base64.b64encode(os.urandom(16)).decode()
    lines = ["GET %s HTTP/1.1" % path, "Host: %s" % host, "Upgrade: websocket",
             "Connection: Upgrade"]
    if key:
        lines.append("Sec-WebSocket-Key: %s" % key)
    if version:
        lines.append("Sec-WebSocket-Version: %s" % version)
    if protocols:
        lines.append("Sec-WebSocket-Protocol: %s" % protocols)
    lines += list(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_http_response(sock, limit=65536) -> tuple:
    """(status code, headers dict with lower-case names, body bytes read so far)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            break
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines or not lines[0].startswith("HTTP/"):
        return None, {}, data
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "-1"))
    while length >= 0 and len(rest) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest


def tunnel_status(port, path="/tunnel/") -> dict:
    """The tunnel status page's JSON document, asked from 127.0.0.1 (200 expected)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\n"
                      "Connection: close\r\n\r\n" % path).encode("latin-1"))
        status, _, body = read_http_response(sock)
    assert status == 200, body
    return json.loads(body)


def mask_frame(opcode, payload=b"", fin=True, mask=True, rsv=0, key=None, length=None) -> bytes:
    length = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    if length < 126:
        header = struct.pack("!BB", first, (0x80 if mask else 0) | length)
    elif length < 65536:
        header = struct.pack("!BBH", first, (0x80 if mask else 0) | 126, length)
    else:
        header = struct.pack("!BBQ", first, (0x80 if mask else 0) | 127, length)
    if not mask:
        return header + payload
    key = key or os.urandom(4)
    n = len(payload)
    masked = (int.from_bytes(payload, "little")
              ^ int.from_bytes((key * (n // 4 + 1))[:n], "little")).to_bytes(n, "little")
    return header + key + masked


class RawWebSocket:
    """A WebSocket client over a plain socket, byte by byte."""

    def __init__(self, port, host="127.0.0.1", path="/", protocols="binary", timeout=10.0,
                 extra=(), ssl_context=None):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        if ssl_context is not None:
            self.sock = ssl_context.wrap_socket(self.sock, server_hostname=host)
        self.sock.sendall(handshake_request(path, host, protocols=protocols, extra=extra))
        self.status, self.headers, self.buffer = read_http_response(self.sock)

    def send(self, opcode, payload=b"", **kwargs):
        self.sock.sendall(mask_frame(opcode, payload, **kwargs))

    def send_binary(self, payload):
        self.send(0x2, payload)

    def _fill(self, n):
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed")
            self.buffer += chunk

    def recv_frame(self) -> tuple:
        """(fin, opcode, payload) of the next frame from the server."""
        self._fill(2)
        b0, b1 = self.buffer[0], self.buffer[1]
        assert not b1 & 0x80, "server frames must not be masked"
        length = b1 & 0x7F
        pos = 2
        if length == 126:
            self._fill(4)
            length = struct.unpack("!H", self.buffer[2:4])[0]
            pos = 4
        elif length == 127:
            self._fill(10)
            length = struct.unpack("!Q", self.buffer[2:10])[0]
            pos = 10
        self._fill(pos + length)
        payload = self.buffer[pos:pos + length]
        self.buffer = self.buffer[pos + length:]
        return bool(b0 & 0x80), b0 & 0x0F, payload

    def recv_data(self, n) -> bytes:
        """Collect n payload bytes from data frames (answering nothing)."""
        out = b""
        while len(out) < n:
            fin, opcode, payload = self.recv_frame()
            assert opcode in (0, 1, 2), "unexpected opcode %d" % opcode
            out += payload
        return out

    def expect_close(self) -> tuple:
        """Read frames until a close frame; returns (code or None, reason)."""
        while True:
            fin, opcode, payload = self.recv_frame()
            if opcode == 0x8:
                if len(payload) >= 2:
                    return struct.unpack("!H", payload[:2])[0], payload[2:].decode("utf-8", "replace")
                return None, ""

    def at_eof(self, timeout=5.0) -> bool:
        """True when the server closed the TCP connection (after any data)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def parameters(func) -> list:
    """[(name, default)] of a callable's parameters, ``*args``/``**kwargs`` spelled so.

    A class gives its constructor's (without self), a function all of its own.
    """
    out = []
    for param in inspect.signature(func).parameters.values():
        prefix = {param.VAR_POSITIONAL: "*", param.VAR_KEYWORD: "**"}.get(param.kind, "")
        out.append((prefix + param.name, param.default))
    return out


NGINX_PROLOGUE = """
worker_processes 1;
daemon off;
{user}
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log info;
events {{ }}
http {{
  access_log {tmp}/nginx-access.log;
  client_body_temp_path {tmp}/client_body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
"""


def start_nginx(processes, program, directory, http_block: str, port: int):
    """A real nginx in ``directory`` whose http block holds ``http_block``; waits for ``port``."""
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_PROLOGUE.format(tmp=directory,
                                          user="user root;" if os.geteuid() == 0 else "")
                    + http_block + "\n}\n")
    nginx = processes([program, "-p", str(directory), "-c", str(conf)], name="nginx")
    wait_for(lambda: port_open(port) or nginx.proc.poll() is not None, what="nginx")
    assert nginx.proc.poll() is None, nginx.log()
    return nginx
