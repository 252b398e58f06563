"""The wrapped program (``websockify PORT -- PROGRAM ARGS``), supervised by the master.

The program is started with the rebind library preloaded: its bind() to the
port websockify listens on is moved to the loopback address at a free port,
which becomes websockify's target. Its output goes to the log line by line;
when it exits, --wrap-mode says whether websockify exits too, carries on, or
starts it again (with a back-off when it keeps dying). No gevent here: the
master drives this from its loop.
"""

import collections
import errno
import importlib.machinery
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, List, Optional

from websockify.addr import format_host_port
from websockify.errors import ConfigError

log = logging.getLogger("websockify")

REBIND_LIB_ENV = "WEBSOCKIFY_REBIND_LIB"
REBIND_MODULE = "websockify._rebind"    # rebind.c, built by setup.py
TARGET_HOST = "127.0.0.1"

STOP_GRACE = 5.0            # seconds between TERM and KILL when stopping the program
RESPAWN_WINDOW = 10.0       # websockify 0.13: the mean of the last three starts
RESPAWN_BURST = 3           #   less than 10 s ago means "respawning too fast"
BACKOFF_FIRST = 1.0         # then the delay doubles on each fast respawn ...
BACKOFF_MAX = 60.0          # ... up to this
LINE_MAX = 4096             # longer output lines are logged in pieces
READS_PER_TICK = 16         # bound one loop turn's output reading


class WrapError(ConfigError):
    """The program cannot be wrapped or started (exit status EXIT_CONFIG)."""


def _built_library(package_dir: Optional[str] = None) -> Optional[str]:
    """websockify/_rebind<suffix>.so in the websockify package directory, or None.

    Looked for in that directory only: an import search could find another
    copy's library (an editable install's finder, say).
    """
    package_dir = package_dir or _package_dir()
    name = REBIND_MODULE.rpartition(".")[2]
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(package_dir, name + suffix)
        if os.path.isfile(path):
            return path
    return None


def _package_dir() -> str:
    """The websockify package directory (the one holding arbiter/)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _prefix_library(package_dir: Optional[str] = None) -> Optional[str]:
    """PREFIX/lib/websockify/rebind.so when this package is installed in
    PREFIX/lib/python3[.N]/{dist,site}-packages and that file exists, or None.

    The Debian package's place for it (/usr/lib/websockify/rebind.so):
    Debian keeps a program's private libraries out of the Python directories.
    Only a websockify installed under that prefix looks there, so a copy run
    from a source tree or a virtualenv never picks up another install's library.
    """
    package_dir = package_dir or _package_dir()
    site_dir = os.path.dirname(package_dir)
    python_dir = os.path.dirname(site_dir)
    if (os.path.basename(site_dir) not in ("dist-packages", "site-packages")
            or not os.path.basename(python_dir).startswith("python3")):
        return None
    path = os.path.join(os.path.dirname(python_dir), "websockify", "rebind.so")
    return path if os.path.isfile(path) else None


def find_rebind_lib(explicit: Optional[str] = None) -> str:
    """The absolute path of the rebind library to preload.

    --rebind-lib, else $WEBSOCKIFY_REBIND_LIB, else the library built next to
    this package's own files (an editable install builds it in place), else
    PREFIX/lib/websockify/rebind.so of the prefix this package is installed in
    (the Debian package's /usr/lib/websockify/rebind.so).
    """
    path = explicit or os.environ.get(REBIND_LIB_ENV)
    if path:
        where = "--rebind-lib" if explicit else REBIND_LIB_ENV
        if not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise WrapError("%s: %s is not a readable file" % (where, path))
    else:
        path = _built_library() or _prefix_library()
        if path is None:
            raise WrapError(
                "cannot wrap a program: the rebind library was not built with this "
                "websockify (no C compiler when it was installed?); install again with "
                "a C compiler, or give its path with --rebind-lib or %s" % REBIND_LIB_ENV)
    path = os.path.abspath(path)
    if any(char in path for char in ": \t\n"):
        # LD_PRELOAD separates its entries with colons and spaces.
        raise WrapError("the rebind library path %r cannot go in LD_PRELOAD "
                        "(it contains a colon or a space)" % path)
    return path


def free_loopback_port(attempts: int = 20) -> int:
    """A port free on 127.0.0.1, and on ::1 too where IPv6 works.

    The program binds it after we let it go (as websockify 0.13 does); an
    IPv6-only socket of the program is moved to ::1, so both must be free.
    """
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((TARGET_HOST, 0))
            port = sock.getsockname()[1]
            if _ipv6_loopback_port_free(port):
                return port
    raise WrapError("no port is free on both 127.0.0.1 and ::1 for the wrapped program")


def _ipv6_loopback_port_free(port: int) -> bool:
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        return True     # no IPv6: only 127.0.0.1 matters
    with sock:
        try:
            sock.bind(("::1", port))
        except OSError as exc:
            return exc.errno != errno.EADDRINUSE
    return True


def resolve_program(argv0: str) -> str:
    """The executable ``argv0`` names, or a WrapError saying why it cannot run."""
    if "/" in argv0:
        if not os.path.exists(argv0):
            raise WrapError("cannot start wrapped program %s: no such file" % argv0)
        if os.path.isdir(argv0) or not os.access(argv0, os.X_OK):
            raise WrapError("cannot start wrapped program %s: not executable" % argv0)
        return argv0
    found = shutil.which(argv0)
    if found is None:
        raise WrapError("cannot start wrapped program %s: not found in PATH" % argv0)
    return found


def listen_port_of(listener: socket.socket) -> int:
    """The TCP port the program would have bound (also right for port 0 or --inetd)."""
    address = listener.getsockname() if listener is not None else None
    if not isinstance(address, tuple):
        raise WrapError("wrapping a program needs a TCP listener: the program's port "
                        "is moved off the port websockify listens on")
    return address[1]


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return "was killed by signal %d" % os.WTERMSIG(status)
    return "exited with status %d" % os.WEXITSTATUS(status)


def exit_code_of(status: int) -> int:
    """The program's exit status as ours: a signal N gives 128+N, as in a shell."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _die_with_parent() -> Optional[Callable[[], None]]:
    """A pre-exec step asking Linux to TERM the program if the master dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:      # the master died before prctl
            os._exit(1)
    return preexec


class WrappedProgram:
    """One wrapped command line: started, watched, restarted, stopped by the master."""

    def __init__(self, argv: List[str], mode: str, rebind_lib: str, listen_port: int,
                 target_port: int, cwd: Optional[str] = None):
        self.argv = list(argv)
        self.executable = resolve_program(self.argv[0])
        self.name = os.path.basename(self.argv[0])
        self.mode = mode
        self.rebind_lib = rebind_lib
        self.listen_port = listen_port
        self.target_port = target_port
        self.cwd = cwd
        self.pid: Optional[int] = None
        self.proc: Optional[subprocess.Popen] = None
        self.started_at = 0.0
        self.starts = collections.deque(maxlen=RESPAWN_BURST)
        self.backoff_level = 0
        self.respawn_at: Optional[float] = None
        self.term_sent_at: Optional[float] = None
        self.killed = False
        self._out_r = self._out_w = -1
        self._partial = b""

    @classmethod
    def from_config(cls, config, listener: socket.socket) -> "WrappedProgram":
        """Check everything that can be checked before daemonizing.

        The master makes ``target_host``:``target_port`` the sessions' target
        before any worker is forked.
        """
        listen_port = listen_port_of(listener)
        lib = find_rebind_lib(config.rebind_lib)
        try:
            # Where websockify was started, not where the daemon moved to.
            cwd: Optional[str] = os.getcwd()
        except OSError:
            cwd = None
        return cls(config.wrap_cmd, config.wrap_mode, lib, listen_port,
                   free_loopback_port(), cwd=cwd)

    @property
    def target_host(self) -> str:
        return TARGET_HOST

    def describe(self) -> str:
        return "wrapping %s (port %d moved to %s by %s, --wrap-mode %s)" % (
            shlex.join(self.argv), self.listen_port,
            format_host_port(TARGET_HOST, self.target_port), self.rebind_lib, self.mode)

    # -- running -------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.pid is not None

    def environment(self) -> dict:
        env = dict(os.environ)
        preload = env.get("LD_PRELOAD", "").strip()
        env["LD_PRELOAD"] = self.rebind_lib + (":" + preload if preload else "")
        env["REBIND_OLD_PORT"] = str(self.listen_port)
        env["REBIND_NEW_PORT"] = str(self.target_port)
        return env

    def start(self, now: Optional[float] = None) -> None:
        """Start the program (after daemonizing); a WrapError if it cannot run."""
        if self._out_r < 0:
            # One pipe for every run: what an exited run left behind (a
            # daemonized child) keeps logging through it.
            self._out_r, self._out_w = os.pipe()
            os.set_blocking(self._out_r, False)
        cwd = self.cwd if self.cwd and os.path.isdir(self.cwd) else None
        try:
            self.proc = subprocess.Popen(
                self.argv, executable=self.executable, env=self.environment(), cwd=cwd,
                stdin=subprocess.DEVNULL, stdout=self._out_w, stderr=self._out_w,
                close_fds=True, start_new_session=True, preexec_fn=_die_with_parent())
        except (OSError, subprocess.SubprocessError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise WrapError("cannot start wrapped program %s: %s"
                            % (self.argv[0], reason)) from None
        self.pid = self.proc.pid
        self.started_at = time.time() if now is None else now
        self.starts.append(self.started_at)
        self.respawn_at = None
        self.term_sent_at = None
        self.killed = False
        log.info("wrapped program %s started (pid %d); its port %d is moved to %s",
                 self.name, self.pid, self.listen_port,
                 format_host_port(TARGET_HOST, self.target_port))

    def owns(self, pid: int) -> bool:
        return self.pid is not None and pid == self.pid

    def exited(self, status: int, stopping: bool, now: Optional[float] = None) -> Optional[int]:
        """The master reaped the program. Returns the status websockify should
        exit with (--wrap-mode exit), or None to carry on."""
        now = time.time() if now is None else now
        pid, ran = self.pid, now - self.started_at
        self.pid = None
        if self.proc is not None:
            self.proc.returncode = exit_code_of(status)   # reaped by the master, not Popen
            self.proc = None
        self.read_output()
        what = "wrapped program %s (pid %d) %s" % (self.name, pid, describe_status(status))
        if stopping:
            log.info("%s", what)
            return None
        if self.mode == "exit":
            log.info("%s; websockify exits too (--wrap-mode exit)", what)
            return exit_code_of(status)
        if self.mode == "ignore":
            log.info("%s; still serving (--wrap-mode ignore)", what)
            return None
        self._schedule_respawn(what, ran, now)
        return None

    def _schedule_respawn(self, what: str, ran: float, now: float) -> None:
        if ran >= RESPAWN_WINDOW:
            self.backoff_level = 0      # it ran a while: not a crash loop
        recent = (len(self.starts) == RESPAWN_BURST
                  and now - sum(self.starts) / len(self.starts) < RESPAWN_WINDOW)
        if not recent:
            log.info("%s; starting it again (--wrap-mode respawn)", what)
            self.respawn_at = now
            return
        delay = min(BACKOFF_FIRST * 2 ** self.backoff_level, BACKOFF_MAX)
        self.backoff_level += 1
        log.warning("%s; respawning too fast (%d starts in about %g s): next start in %g s",
                    what, RESPAWN_BURST, RESPAWN_WINDOW, delay)
        self.respawn_at = now + delay

    def tick(self, now: float) -> None:
        """Called by the master's loop while serving: start a due respawn."""
        if self.respawn_at is None or now < self.respawn_at or self.running:
            return
        try:
            self.start(now)
        except WrapError as exc:
            # Counted as a fast exit: the back-off spaces the next attempts.
            self.starts.append(now)
            self.started_at = now
            self._schedule_respawn(str(exc), 0.0, now)

    # -- stopping ---------------------------------------------------------------

    def _signal_group(self, signum: int) -> None:
        # Its own session: the whole group, so children it started go too.
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def stop_step(self, now: float) -> bool:
        """Drive stopping from the loop: TERM, then KILL after STOP_GRACE.
        True once the program is gone."""
        self.respawn_at = None
        if not self.running:
            return True
        if self.term_sent_at is None:
            log.info("stopping wrapped program %s (pid %d)", self.name, self.pid)
            self._signal_group(signal.SIGTERM)
            self.term_sent_at = now
        elif not self.killed and now - self.term_sent_at >= STOP_GRACE:
            log.warning("wrapped program %s (pid %d) did not stop within %g s; killing it",
                        self.name, self.pid, STOP_GRACE)
            self._signal_group(signal.SIGKILL)
            self.killed = True
        return False

    def kill_now(self) -> None:
        """Last resort when the master ends: KILL and reap, no waiting on grace."""
        self.respawn_at = None
        if not self.running:
            return
        pid = self.pid
        self._signal_group(signal.SIGKILL)
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            status = 0
        self.exited(status, stopping=True)

    # -- output ------------------------------------------------------------------

    def fds(self) -> List[int]:
        return [self._out_r] if self._out_r >= 0 else []

    def read_output(self) -> None:
        """Log what the program wrote, one line per log line, prefixed with its name."""
        if self._out_r < 0:
            return
        for _ in range(READS_PER_TICK):
            try:
                chunk = os.read(self._out_r, 65536)
            except (BlockingIOError, InterruptedError):
                return
            if not chunk:
                return
            self._log_lines(chunk)

    def _log_lines(self, chunk: bytes) -> None:
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        while len(self._partial) > LINE_MAX:
            lines.append(self._partial[:LINE_MAX])
            self._partial = self._partial[LINE_MAX:]
        for line in lines:
            for start in range(0, len(line), LINE_MAX):
                text = line[start:start + LINE_MAX].rstrip(b"\r").decode("utf-8", "replace")
                log.info("%s: %s", self.name, text)

    def flush_output(self) -> None:
        self.read_output()
        if self._partial:
            log.info("%s: %s", self.name, self._partial.decode("utf-8", "replace"))
            self._partial = b""

    def close(self) -> None:
        """Close the output pipe (in the master at the end, in each worker after fork)."""
        for fd in (self._out_r, self._out_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._out_r = self._out_w = -1
