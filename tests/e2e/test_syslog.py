"""--syslog and --legacy-syslog: real UDP and Unix datagram sockets stand in
for the syslog server; the lines they receive are parsed."""

import datetime
import logging
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from tests.helpers import ROOT, children_of, pid_alive, port_open, wait_for, websockify_argv
from tests.e2e.test_cli import assert_usage_error, run_cli
from tests.e2e.test_logging import echo_session
from websockify import log as wslog

RFC5424 = re.compile(r"<(\d+)>1 (\S+) (\S+) (\S+) (\S+) (\S+) (\S+) (.*)", re.S)
RFC3164 = re.compile(r"<(\d+)>(\w{3}) ([ \d]\d) (\d\d:\d\d:\d\d) websockify\[(\d+)\]: (.*)",
                     re.S)
USER, DAEMON = 1, 3
INFO, DEBUG = 6, 7
WARNING_LINE = re.compile(r"syslog server .* unreachable")


class SyslogServer:
    """A datagram socket collecting what websockify sends."""

    def __init__(self, family, address):
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.lines = []

    @property
    def address(self) -> str:
        name = self.sock.getsockname()
        return name if isinstance(name, str) else "%s:%d" % name

    def collect(self) -> list:
        while True:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                return self.lines
            self.lines.append(data.decode("utf-8"))

    def wait_for(self, pattern, timeout=10.0) -> str:
        regex = re.compile(pattern)

        def found():
            return next((line for line in self.collect() if regex.search(line)), None)
        return wait_for(found, timeout, what="syslog line %r in %r" % (pattern, self.lines))

    def close(self):
        self.sock.close()


@pytest.fixture
def udp_syslog():
    server = SyslogServer(socket.AF_INET, ("127.0.0.1", 0))
    yield server
    server.close()


@pytest.fixture
def unix_syslog_path(tmp_path):
    # AF_UNIX paths are short (108 bytes): a short directory of our own.
    import tempfile
    directory = tempfile.mkdtemp(prefix="wslog")
    path = os.path.join(directory, "log")
    yield path
    if os.path.exists(path):
        os.unlink(path)
    os.rmdir(directory)


def signal_pending(pid: int, signum: int) -> bool:
    """Whether ``signum`` waits to be delivered to process ``pid`` (/proc status)."""
    with open("/proc/%d/status" % pid) as handle:
        masks = [int(line.split()[1], 16) for line in handle
                 if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask & (1 << (signum - 1)) for mask in masks)


def parse_5424(line):
    match = RFC5424.fullmatch(line)
    assert match, line
    pri, timestamp, host, app, procid, msgid, sd, msg = match.groups()
    return {"facility": int(pri) // 8, "severity": int(pri) % 8, "timestamp": timestamp,
            "host": host, "app": app, "pid": int(procid), "msgid": msgid, "sd": sd,
            "msg": msg}


# -- RFC 5424 ----------------------------------------------------------------------

def test_rfc5424_over_udp_from_master_and_workers(websockify, echo_target, udp_syslog):
    proc, port = websockify("--workers", "2", "--syslog", udp_syslog.address,
                            "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    for number in range(4):
        echo_session(port, path="/s%d" % number)
    wait_for(lambda: sum(": closed (1000)" in line for line in udp_syslog.collect()) == 4,
             what="four session lines in %r" % udp_syslog.lines)
    workers = set(children_of(proc.pid))
    assert len(workers) == 2
    records = [parse_5424(line) for line in udp_syslog.lines]
    now = datetime.datetime.now(datetime.timezone.utc)
    for record in records:
        assert record["facility"] == USER
        assert record["app"] == "websockify"
        assert record["host"] == socket.gethostname()
        assert record["msgid"] == "-" and record["sd"] == "-"
        stamp = datetime.datetime.strptime(record["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ")
        assert abs((now - stamp.replace(tzinfo=datetime.timezone.utc)).total_seconds()) < 60
        assert "\n" not in record["msg"]
    banner = [r for r in records if "proxying from" in r["msg"]]
    assert len(banner) == 1 and banner[0]["pid"] == proc.pid
    assert banner[0]["severity"] == INFO
    sessions = [r for r in records if ": closed (1000)" in r["msg"]]
    assert len(sessions) == 4
    # Each line carries the pid of the worker that logged it.
    assert {r["pid"] for r in sessions} <= workers
    assert all(r["severity"] == INFO for r in sessions)
    assert all(re.match(r"127\.0\.0\.1:\d+ /s\d -> 127\.0\.0\.1:%d: closed" % echo_target,
                        r["msg"]) for r in sessions), sessions
    # The local log carries on as well (websockify 0.13 logs to both).
    assert proc.log().count(": closed (1000)") == 4
    assert not WARNING_LINE.search(proc.log())


def test_rfc5424_over_unix_socket_with_debug(websockify, echo_target, unix_syslog_path):
    server = SyslogServer(socket.AF_UNIX, unix_syslog_path)
    try:
        proc, port = websockify("-v", "--workers", "1", "--syslog", unix_syslog_path,
                                "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
        echo_session(port)
        server.wait_for(r": closed \(1000\)")
        records = [parse_5424(line) for line in server.lines]
        opened = [r for r in records if "session opened" in r["msg"]]
        assert opened and opened[0]["severity"] == DEBUG
        assert opened[0]["pid"] in children_of(proc.pid)
    finally:
        server.close()


# -- RFC 3164 ----------------------------------------------------------------------

def test_legacy_syslog_over_unix_socket(websockify, echo_target, unix_syslog_path):
    server = SyslogServer(socket.AF_UNIX, unix_syslog_path)
    try:
        proc, port = websockify("--workers", "1", "--syslog", unix_syslog_path,
                                "--legacy-syslog", "127.0.0.1:{port}",
                                "127.0.0.1:%d" % echo_target)
        echo_session(port)
        server.wait_for(r": closed \(1000\)")
        workers = children_of(proc.pid)
        for line in server.lines:
            match = RFC3164.fullmatch(line)
            assert match, line
            pri, month, day, clock, pid, msg = match.groups()
            assert int(pri) == USER * 8 + INFO
            assert month in wslog.MONTHS
            # A local socket gets no host name (syslog(3) style).
            assert not msg.startswith(socket.gethostname() + " ")
            if ": closed (" in msg:
                assert int(pid) in workers
            if "proxying from" in msg:
                assert int(pid) == proc.pid
    finally:
        server.close()


def test_legacy_syslog_over_udp_names_the_host(websockify, echo_target, udp_syslog):
    websockify("--workers", "1", "--syslog", udp_syslog.address, "--legacy-syslog",
               "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    line = udp_syslog.wait_for("proxying from")
    assert re.fullmatch(r"<14>\w{3} [ \d]\d \d\d:\d\d:\d\d %s websockify\[\d+\]: .*"
                        % re.escape(socket.gethostname()), line, re.S), line


def test_daemon_logs_with_the_daemon_facility(tmp_path, echo_target, udp_syslog):
    from tests.helpers import free_port
    port = free_port()
    pid_file = tmp_path / "ws.pid"
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run(websockify_argv(
        "-D", "--workers", "1", "--pid-file", str(pid_file), "--syslog", udp_syslog.address,
        "127.0.0.1:%d" % port, "127.0.0.1:%d" % echo_target),
        env=env, cwd=ROOT, capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), what="pid file")
    pid = int(pid_file.read_text())
    try:
        wait_for(lambda: port_open(port), what="daemon listening")
        echo_session(port)
        line = udp_syslog.wait_for(r": closed \(1000\)")
        record = parse_5424(line)
        assert record["facility"] == DAEMON
        assert record["pid"] in children_of(pid)
        # The daemon's own lines carry its pid after detaching, not the launcher's.
        banner = [parse_5424(l) for l in udp_syslog.lines if "worker(s)" in l]
        assert banner and banner[0]["facility"] == DAEMON
    finally:
        kids = children_of(pid)
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not pid_alive(pid), what="daemon stopped")
        for kid in kids:
            if pid_alive(kid):
                os.kill(kid, signal.SIGKILL)


# -- a server that is down or missing ----------------------------------------------

def warnings_in(text):
    return [line for line in text.splitlines() if WARNING_LINE.search(line)]


def test_missing_syslog_socket_one_warning_and_local_logging(websockify, echo_target,
                                                            unix_syslog_path):
    proc, port = websockify("--workers", "2", "--syslog", unix_syslog_path,
                            "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    for _ in range(3):
        echo_session(port)
    wait_for(lambda: proc.log().count(": closed (1000)") == 3, what="three session lines")
    lines = warnings_in(proc.log())
    assert len(lines) == 1, proc.log()
    assert "WARNING" in lines[0] and unix_syslog_path in lines[0]
    assert "no such socket" in lines[0]
    assert proc.proc.poll() is None


def test_udp_syslog_server_down_at_start(websockify, echo_target):
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    address = "127.0.0.1:%d" % closed.getsockname()[1]
    closed.close()
    proc, port = websockify("--workers", "2", "--syslog", address, "127.0.0.1:{port}",
                            "127.0.0.1:%d" % echo_target)
    for _ in range(3):
        echo_session(port)
    wait_for(lambda: proc.log().count(": closed (1000)") == 3, what="three session lines")
    lines = warnings_in(proc.log())
    assert len(lines) == 1, proc.log()
    assert "refused" in lines[0].lower()


def test_syslog_server_going_away_while_serving(websockify, echo_target, udp_syslog):
    proc, port = websockify("--workers", "1", "--syslog", udp_syslog.address,
                            "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    echo_session(port)
    udp_syslog.wait_for(r": closed \(1000\)")
    udp_syslog.close()
    for _ in range(4):
        echo_session(port)
    wait_for(lambda: proc.log().count(": closed (1000)") == 5, what="five session lines")
    assert len(warnings_in(proc.log())) == 1, proc.log()
    # Still serving.
    echo_session(port)


def test_sigusr1_reconnects_to_a_syslog_server_that_came_back(websockify, echo_target,
                                                              unix_syslog_path):
    proc, port = websockify("-v", "--workers", "2", "--syslog", unix_syslog_path,
                            "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    proc.wait_log(WARNING_LINE.pattern)
    # Workers ignore SIGUSR1 until they have booted: wait for both.
    proc.wait_log(r"worker 1 \(pid \d+\) serving")
    proc.wait_log(r"worker 2 \(pid \d+\) serving")
    workers = children_of(proc.pid)
    assert len(workers) == 2
    server = SyslogServer(socket.AF_UNIX, unix_syslog_path)
    try:
        proc.signal(signal.SIGUSR1)
        # The master reconnects, logs this line (now at the server) and then
        # passes the signal on; once the kernel has delivered it to both
        # workers, their next record connects again.
        server.wait_for(r"got SIGUSR1: reopening log files")
        wait_for(lambda: not any(signal_pending(pid, signal.SIGUSR1) for pid in workers),
                 what="SIGUSR1 delivered to the workers")
        echo_session(port, path="/after-usr1")
        server.wait_for(r"/after-usr1 .*closed \(1000\)")
    finally:
        server.close()


def test_handler_retries_after_its_interval(unix_syslog_path):
    """In process: a server that appears is used again after the retry interval."""
    handler = wslog.SyslogHandler(wslog.parse_syslog_server(unix_syslog_path))
    handler.retry_interval = 0.3
    local = []
    logger = logging.getLogger(wslog.LOGGER_NAME)
    saved = logger.handlers[:]

    class Collect(logging.Handler):
        def emit(self, record):
            local.append(record.getMessage())
    logger.handlers[:] = [Collect(), handler]
    server = None
    try:
        logger.warning("first")
        assert len(local) == 2 and WARNING_LINE.search(local[1])   # "first", then the warning
        server = SyslogServer(socket.AF_UNIX, unix_syslog_path)
        logger.warning("too soon")
        assert server.collect() == []
        time.sleep(0.4)              # past the retry interval: the thing under test
        logger.warning("again")
        assert [l.split(" - - ", 1)[1] for l in server.collect()] == ["again"]
        assert len([l for l in local if WARNING_LINE.search(l)]) == 1
    finally:
        logger.handlers[:] = saved
        handler.close()
        if server:
            server.close()


# -- line format details -------------------------------------------------------------

def make_record(message, level=logging.INFO):
    return logging.LogRecord("websockify", level, __file__, 1, message, (), None)


def test_non_ascii_message_is_utf8_with_bom():
    line = wslog.rfc5424_line(make_record("x"), "café", wslog.FACILITY_USER, "host")
    assert line.endswith(b" - - \xef\xbb\xbfcaf\xc3\xa9")
    assert line.startswith(b"<14>1 ")


def test_long_messages_are_cut():
    line = wslog.rfc5424_line(make_record("x"), "y" * 100000, wslog.FACILITY_USER, "h")
    assert len(line) < wslog.MAX_MESSAGE_BYTES + 200


def test_severities():
    for level, severity in ((logging.ERROR, 3), (logging.WARNING, 4), (logging.DEBUG, 7)):
        line = wslog.rfc5424_line(make_record("m", level), "m", wslog.FACILITY_DAEMON, "h")
        assert line.startswith(b"<%d>1 " % (24 + severity))


# -- the command line ------------------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    (("--syslog", "localhost:notaport"), "error parsing port"),
    (("--syslog", "localhost:0"), "port out of range"),
    (("--syslog", ":514"), "no host"),
    (("--legacy-syslog",), "--legacy-syslog needs --syslog"),
])
def test_bad_syslog_options_exit_2(args, expected):
    assert_usage_error(run_cli(*args, "6080", "localhost:5900"), expected)


def test_syslog_server_parsing():
    assert wslog.parse_syslog_server("/dev/log").unix_path == "/dev/log"
    server = wslog.parse_syslog_server("[::1]:1514")
    assert (server.host, server.port, server.unix_path) == ("::1", 1514, None)
    assert wslog.parse_syslog_server("log.example:514").host == "log.example"
    assert wslog.parse_syslog_server("rel/log").unix_path == os.path.abspath("rel/log")
