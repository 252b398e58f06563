"""Logging setup: stderr or a log file (reopened on SIGUSR1), syslog, -v, --traffic."""

import _socket
import errno
import logging
import os
import socket
import sys
import time
from typing import Callable, NamedTuple, Optional, Tuple, Union

from websockify import addr
from websockify.addr import AddressError, parse_host_port

LOGGER_NAME = "websockify"
FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(message)s"


class ReopenableFileHandler(logging.StreamHandler):
    """A file handler that can reopen its file after logrotate moved it."""

    def __init__(self, path: str):
        self.path = path
        super().__init__(self._open())

    def _open(self):
        return open(self.path, "a", encoding="utf-8", buffering=1)

    def reopen(self) -> None:
        self.acquire()
        try:
            old = self.stream
            self.stream = self._open()
            old.close()
        finally:
            self.release()

    def close(self) -> None:
        self.acquire()
        try:
            if self.stream and not self.stream.closed:
                self.stream.close()
        finally:
            self.release()
        super().close()


# -- syslog ------------------------------------------------------------------

APP_NAME = "websockify"
SYSLOG_UDP_PORT = 514
FACILITY_USER = 1
FACILITY_DAEMON = 3             # with -D, as websockify 0.13 does
SEVERITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4,
            logging.INFO: 6, logging.DEBUG: 7}
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
          "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# Longer messages (tracebacks) are cut so that one line is one datagram.
MAX_MESSAGE_BYTES = 8192


class SyslogServer(NamedTuple):
    """Where --syslog sends: a Unix datagram socket path or a UDP (host, port)."""

    text: str
    unix_path: Optional[str] = None
    host: Optional[str] = None
    port: int = SYSLOG_UDP_PORT

    def __str__(self) -> str:
        return self.text


def parse_syslog_server(text: str) -> SyslogServer:
    """``/dev/log`` (any text without a colon is a path) or ``host:port``, ``[v6]:port``.

    Raises ValueError with a message fit for a usage error.
    """
    if not text:
        raise ValueError("--syslog: empty SERVER")
    if ":" not in text or text.startswith(("/", ".")):
        return SyslogServer(text, unix_path=os.path.abspath(text))
    try:
        host, port = parse_host_port(text)
    except AddressError as exc:
        reason = {addr.NO_HOST: "no host in %r (expected host:port or a socket path)",
                  addr.PORT: "error parsing port in %r",
                  addr.RANGE: "port out of range in %r"}.get(exc.kind)
        raise ValueError("--syslog: %s" % (reason % text if reason else exc)) from None
    return SyslogServer(text, host=host, port=int(port))


def _printable_ascii(text: str, limit: int) -> str:
    """A header field: printable ASCII without spaces, as RFC 5424 requires."""
    cleaned = "".join(ch if "!" <= ch <= "~" else "_" for ch in text)[:limit]
    return cleaned or "-"


def rfc5424_line(record: logging.LogRecord, message: str, facility: int,
                 hostname: str) -> bytes:
    """``<PRI>1 TIMESTAMP HOST APP PROCID MSGID SD MSG`` (RFC 5424)."""
    pri = facility * 8 + SEVERITY.get(record.levelno, 6)
    stamp = time.gmtime(record.created)
    timestamp = "%s.%06dZ" % (time.strftime("%Y-%m-%dT%H:%M:%S", stamp),
                              int(record.created % 1 * 1e6))
    head = "<%d>1 %s %s %s %d - - " % (pri, timestamp, hostname, APP_NAME, os.getpid())
    try:
        body = message.encode("ascii")
    except UnicodeEncodeError:
        body = b"\xef\xbb\xbf" + message.encode("utf-8", "replace")   # BOM: MSG is UTF-8
    return head.encode("ascii") + body[:MAX_MESSAGE_BYTES]


def rfc3164_line(record: logging.LogRecord, message: str, facility: int,
                 hostname: Optional[str]) -> bytes:
    """``<PRI>Mmm dd hh:mm:ss [HOST ]websockify[PID]: MSG`` (RFC 3164).

    The host name is left out on a local socket, like syslog(3) does: local
    daemons (journald among them) would take it for the program name.
    """
    pri = facility * 8 + SEVERITY.get(record.levelno, 6)
    local = time.localtime(record.created)
    timestamp = "%s %2d %s" % (MONTHS[local.tm_mon - 1], local.tm_mday,
                               time.strftime("%H:%M:%S", local))
    host = (hostname + " ") if hostname else ""
    head = "<%d>%s %s%s[%d]: " % (pri, timestamp, host, APP_NAME, os.getpid())
    return head.encode("ascii") + message.encode("utf-8", "replace")[:MAX_MESSAGE_BYTES]


class SyslogHandler(logging.Handler):
    """Sends each record as one datagram to a syslog server.

    Created in the master before workers are forked; every process stamps
    its own pid at send time.  Sends never block (a worker's event loop may
    be the caller): a server that is busy loses the line, one that is down
    or missing is retried every ``retry_interval`` seconds meanwhile, and
    either case writes one warning line to the local log (stderr or
    --log-file), at most every ``warn_interval`` seconds per process.
    """

    retry_interval = 30.0
    warn_interval = 600.0

    def __init__(self, server: SyslogServer, legacy: bool = False,
                 facility: int = FACILITY_USER):
        super().__init__()
        self.server = server
        self.legacy = legacy
        self.facility = facility
        self.hostname = _printable_ascii(socket.gethostname(), 255)
        self.sock: Optional[_socket.socket] = None
        self._retry_at = 0.0          # while down: no send before this (monotonic)
        self._warned_at: Optional[float] = None
        self.setFormatter(logging.Formatter("%(message)s"))
        # Host names are resolved in the master only (at start and on
        # SIGUSR1): a worker would block its event loop on the resolver.
        self._resolver_pid = os.getpid()
        self._resolved: Optional[Tuple[int, Union[str, tuple]]] = None
        if server.unix_path is None:
            try:
                self.resolve()
            except OSError:
                pass                  # reported as "down" by the first send

    def resolve(self) -> None:
        """Look the syslog host up again (the master's job; OSError if it fails)."""
        infos = _socket.getaddrinfo(self.server.host, self.server.port, 0, _socket.SOCK_DGRAM)
        family, _, _, _, address = infos[0]
        self._resolved = (family, address)

    # -- the socket -------------------------------------------------------

    def _address(self) -> Tuple[int, Union[str, tuple]]:
        if self.server.unix_path:
            return _socket.AF_UNIX, self.server.unix_path
        if os.getpid() == self._resolver_pid and self._resolved is None:
            self.resolve()        # the master, whose loop does not carry sessions
        if self._resolved is None:
            raise OSError(errno.EHOSTUNREACH, "syslog host %s was not resolved"
                          % self.server.host)
        return self._resolved

    def _connect(self) -> _socket.socket:
        family, address = self._address()
        # A plain non-blocking socket in every process, patched or not.
        sock = _socket.socket(family, _socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            # Connected, so that a refusal (ICMP port unreachable, or no
            # reader on the Unix socket) is reported by the next send.
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return sock

    def close_socket(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    def reopen(self) -> None:
        """SIGUSR1: connect again at the next record (the server may have moved)."""
        self.acquire()
        try:
            self.close_socket()
            self._retry_at = 0.0
            if os.getpid() == self._resolver_pid and self.server.unix_path is None:
                self._resolved = None     # looked up again by the next send
        finally:
            self.release()

    def close(self) -> None:
        self.acquire()
        try:
            self.close_socket()
        finally:
            self.release()
        super().close()

    # -- sending ------------------------------------------------------------

    def encode(self, record: logging.LogRecord) -> bytes:
        message = self.format(record).rstrip("\n")
        if self.legacy:
            return rfc3164_line(record, message, self.facility,
                                None if self.server.unix_path else self.hostname)
        return rfc5424_line(record, message, self.facility, self.hostname)

    def emit(self, record: logging.LogRecord) -> None:
        now = time.monotonic()
        if now < self._retry_at:
            return
        try:
            data = self.encode(record)
            if self.sock is None:
                self.sock = self._connect()
            self.sock.send(data)
            self._retry_at = 0.0
        except BlockingIOError:
            self._warn_locally("syslog server %s is not keeping up: log lines are being "
                               "dropped" % self.server, now)
        except OSError as exc:
            self.close_socket()
            self._retry_at = now + self.retry_interval
            self._warn_locally("syslog server %s unreachable (%s): logging locally only, "
                               "trying again every %g s"
                               % (self.server, _reason(exc), self.retry_interval), now)
        except Exception:
            self.handleError(record)

    def _warn_locally(self, text: str, now: float) -> None:
        """One line to the other handlers (stderr or the log file), rate limited."""
        if self._warned_at is not None and now - self._warned_at < self.warn_interval:
            return
        self._warned_at = now
        logger = logging.getLogger(LOGGER_NAME)
        record = logger.makeRecord(LOGGER_NAME, logging.WARNING, __file__, 0, text, (), None)
        for handler in logger.handlers:
            if handler is not self and record.levelno >= handler.level:
                handler.handle(record)


def _reason(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return "cannot resolve host: %s" % (exc.strerror or exc)
    if exc.errno == errno.ENOENT:
        return "no such socket"
    return exc.strerror or str(exc)


# -- setup -------------------------------------------------------------------

class CachedTimeFormatter(logging.Formatter):
    """The default format, with the date and time text made once per second."""

    def __init__(self, fmt: str):
        super().__init__(fmt)
        self._second = -1
        self._text = ""

    def formatTime(self, record, datefmt=None) -> str:
        second = int(record.created)
        if second != self._second:
            self._text = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(record.created))
            self._second = second
        return "%s,%03d" % (self._text, record.msecs)


def setup_logging(verbose: bool, log_file: Optional[str],
                  syslog: Optional[SyslogServer] = None, legacy_syslog: bool = False,
                  daemon: bool = False) -> logging.Logger:
    """Configure the ``websockify`` logger once, in the master before forking.

    Lines always go to the local log (the log file, else stderr); --syslog
    sends them to a syslog server as well, as websockify 0.13 does.
    """
    logger = logging.getLogger(LOGGER_NAME)
    for old in logger.handlers:
        old.close()
    logger.handlers[:] = []
    logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    # A record otherwise asks for its thread and multiprocessing names, which
    # costs more under gevent's patching than the rest of the line.
    logging.logThreads = False
    logging.logMultiprocessing = False
    formatter = CachedTimeFormatter(FORMAT)
    handler: logging.Handler
    if log_file:
        handler = ReopenableFileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    if syslog is not None:
        logger.addHandler(SyslogHandler(syslog, legacy_syslog,
                                        FACILITY_DAEMON if daemon else FACILITY_USER))
    return logger


def library_logging(verbose: bool) -> logging.Logger:
    """In a library caller's process: its logging setup is its own.

    Our lines propagate to its handlers at the levels it chose (``verbose``
    asks for debug lines); only when nothing at all is set up do they get a
    stderr handler at info level, so that the banner and errors are seen.
    """
    logger = logging.getLogger(LOGGER_NAME)
    logger.propagate = True
    if verbose:
        logger.setLevel(logging.DEBUG)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(CachedTimeFormatter(FORMAT))
        logger.addHandler(handler)
        if not verbose:
            logger.setLevel(logging.INFO)
    return logger


def reopen_log_files() -> None:
    """SIGUSR1: reopen the log file (after logrotate) and reconnect to syslog."""
    for handler in logging.getLogger(LOGGER_NAME).handlers:
        if isinstance(handler, (ReopenableFileHandler, SyslogHandler)):
            handler.reopen()


def log_file_stream():
    """The --log-file stream, or None."""
    for handler in logging.getLogger(LOGGER_NAME).handlers:
        if isinstance(handler, ReopenableFileHandler):
            return handler.stream
    return None


def log_streams() -> list:
    """Open files and sockets the logger writes to (kept open across daemonizing)."""
    streams = []
    for handler in logging.getLogger(LOGGER_NAME).handlers:
        stream = getattr(handler, "stream", None) or getattr(handler, "sock", None)
        if stream is not None and hasattr(stream, "fileno"):
            streams.append(stream)
    return streams


TRAFFIC_LEGEND = """
Traffic Legend:
    }  - Client receive
    {  - Target receive

    >  - Target send
    >. - Target send partial
    <  - Client send
    <. - Client send partial
"""


def traffic_printer() -> Callable[[str], None]:
    """--traffic: legend characters on stdout as data moves, like websockify."""
    fd = sys.stdout.fileno()

    def emit(char: str) -> None:
        try:
            os.write(fd, char.encode())
        except OSError:
            pass
    return emit
