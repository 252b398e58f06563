"""The arbiter: listener, daemon, workers, signals, timeouts.

No gevent here.  Signal handlers only queue the signal and wake the loop
through a pipe; the loop dispatches to ``handle_<name>``, reaps and
respawns workers, reads their scoreboard slots and enforces --timeout,
--idle-timeout and --run-once. A wrapped program (``-- COMMAND``) is
supervised from the same loop (websockify.wrap).
"""

import errno
import logging
import os
import select
import signal
import sys
import time
from typing import Dict, List, Optional

from websockify import scoreboard as sb
from websockify.errors import ConfigError, EXIT_CONFIG, EXIT_FAILURE, EXIT_LISTEN, EXIT_OK, EXIT_WORKER_BOOT
from websockify.log import log_streams, reopen_log_files, setup_logging
from websockify.sockets import (ListenError, describe_listener, open_listener,
                                raise_nofile_limit, unlink_unix_listener)
from websockify.wrap import WrapError, WrappedProgram

log = logging.getLogger("websockify")

TICK = 0.25
WORKER_STALL_TIMEOUT = 60.0     # a worker that stops reporting this long is killed
EXTRA_STOP_TIME = 8.0           # beyond --graceful-timeout before workers are killed

SIGNALS = {
    signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGQUIT: "quit",
    signal.SIGHUP: "hup", signal.SIGUSR1: "usr1", signal.SIGCHLD: "chld",
}


class WorkerProcess:
    __slots__ = ("pid", "slot", "number", "started", "retiring")

    def __init__(self, pid: int, slot: int, number: int):
        self.pid = pid
        self.slot = slot
        self.number = number
        self.started = time.time()
        self.retiring = False


class Master:
    def __init__(self, settings):
        self.settings = settings
        self.workers: Dict[int, WorkerProcess] = {}
        self.listener = None
        self.board: Optional[sb.Scoreboard] = None
        self.signal_queue: List[int] = []
        self.stopping: Optional[int] = None    # the scoreboard command we stop with
        self.stop_deadline: Optional[float] = None
        self.exit_status = EXIT_OK
        self.started = time.time()
        self.last_busy = self.started
        self.worker_count = settings.workers or os.cpu_count() or 1
        if settings.run_once:
            # One worker, which stops accepting after its first session.
            self.worker_count = 1
        self._wake_r = self._wake_w = -1
        self.pid_file_written = False
        self.wrapped: Optional[WrappedProgram] = None

    # -- start ---------------------------------------------------------------

    def run(self) -> int:
        settings = self.settings
        try:
            setup_logging(settings.verbose, settings.log_file, settings.syslog,
                          settings.legacy_syslog, settings.daemon)
        except OSError as exc:
            sys.stderr.write("websockify: cannot open log file %s: %s\n"
                             % (settings.log_file, exc.strerror))
            return EXIT_CONFIG
        try:
            settings.tokens = self._load_token_plugin()
            self._load_auth_and_tls()
            if settings.record:
                from websockify.record import check_destination
                check_destination(settings.record)
        except ConfigError as exc:
            log.error("%s", exc)
            return EXIT_CONFIG
        nofile = raise_nofile_limit()
        try:
            self.listener = open_listener(settings)
        except ListenError as exc:
            log.error("%s", exc)
            return EXIT_LISTEN
        if settings.wrap_cmd:
            try:
                # Sets the target, before the banner and before any worker fork.
                self.wrapped = WrappedProgram.from_settings(settings, self.listener)
            except WrapError as exc:
                log.error("%s", exc)
                return EXIT_CONFIG
        self._banner(nofile)
        try:
            if settings.daemon:
                self._daemonize()
            self._write_pid_file()
            self._title()
            self.board = sb.Scoreboard(self.worker_count * 2 + 2)
            self._install_signals()
            if self.wrapped is not None and not self._start_wrapped():
                return self.exit_status
            for number in range(1, self.worker_count + 1):
                self.spawn_worker(number)
            self._loop()
        except Exception:
            log.exception("master failed")
            self.exit_status = EXIT_FAILURE
            self._kill_workers(signal.SIGKILL)
            if self.wrapped is not None:
                self.wrapped.kill_now()
        finally:
            self._cleanup()
        return self.exit_status

    def _load_token_plugin(self):
        """Build the token plugin here, before any fork: a bad source fails the start."""
        settings = self.settings
        if not (settings.token_plugin or settings.target_config):
            return None
        from websockify.plugins.tokens import load_resolver
        if settings.target_config and settings.tokens is None:
            log.warning("--target-config is deprecated: use --token-plugin TokenFile "
                        "--token-source %s", settings.target_config)
        return load_resolver(settings)

    def _load_auth_and_tls(self) -> None:
        """The auth plugin and the TLS contexts, before any fork (ConfigError: exit 5)."""
        from websockify.plugins.auth import load_authenticator
        from websockify.tls import TargetContexts, build_server_context
        settings = self.settings
        tls = build_server_context(settings)
        target_tls = TargetContexts(settings) if settings.ssl_target else None
        auth = load_authenticator(settings)
        settings.tls, settings.target_tls, settings.auth = tls, target_tls, auth

    def _reload_auth_and_tls(self) -> None:
        """On SIGHUP: certificates and the auth plugin are read again for the new workers."""
        settings = self.settings
        previous = (settings.tls, settings.target_tls, settings.auth)
        try:
            self._load_auth_and_tls()
        except ConfigError as exc:
            log.error("%s; new workers keep the previous TLS and auth configuration", exc)
            return
        if previous[0] is not None and settings.tls is None:
            # A certificate being renewed may be missing for a moment: never
            # let a reload turn wss:// off.
            settings.tls, settings.target_tls, settings.auth = previous
            log.error("certificate file %s not found; new workers keep the previous TLS "
                      "and auth configuration", settings.cert)
            return
        if settings.tls is not None:
            log.info("TLS certificate %s reloaded", settings.cert)

    def _reload_token_plugin(self) -> None:
        """On SIGHUP: re-read the token source for the new workers, or keep the old one."""
        if self.settings.tokens is None:
            return
        try:
            self.settings.tokens = self._load_token_plugin()
        except ConfigError as exc:
            log.error("%s; new workers keep the previous token configuration", exc)
            return
        log.info("token plugin %s reloaded", self.settings.tokens.name)

    def _banner(self, nofile: int) -> None:
        settings = self.settings
        log.info("WebSocket server settings:")
        if settings.inetd:
            log.info("  - Listen for inetd connections")
        elif settings.unix_listen:
            log.info("  - Listen on unix socket %s", settings.unix_listen)
        elif settings.listen_fds:
            log.info("  - Listen on %s (socket passed by systemd)",
                     describe_listener(self.listener))
        else:
            log.info("  - Listen on %s", describe_listener(self.listener))
        if settings.web:
            log.info("  - Web server%s. Web root: %s",
                     " (no directory listings)" if settings.file_only else "", settings.web)
        else:
            log.info("  - No web server (plain HTTP requests get 405)")
        if settings.tls is None:
            log.info("  - No SSL/TLS support (no cert file)")
        else:
            log.info("  - SSL/TLS support%s, certificate %s%s",
                     " only (plain connections get 403)" if settings.ssl_only
                     else " (ws:// and wss:// on one port)", settings.cert,
                     ", client certificates required" if settings.verify_client else "")
        if settings.ssl_target_no_verify:
            log.warning("  - --ssl-target-no-verify: the target's certificate is NOT "
                        "verified; anyone on the path to the target can read the session")
        elif settings.ssl_target:
            log.info("  - TLS to the target, verified with %s",
                     settings.ssl_target_cafile or "the system CAs")
        if settings.auth is not None:
            log.info("  - Authentication plugin %s%s", settings.auth.name,
                     " (static files too)" if settings.web_auth else "")
        if settings.record:
            log.info("  - Recording to '%s.*'", settings.record)
        if settings.daemon:
            log.info("  - Backgrounding (daemon)")
        if settings.libserver:
            log.warning("  - --libserver has no effect: this server always uses gevent workers")
        log.info("  - %d worker(s), descriptor limit %d", self.worker_count, nofile)
        if settings.tokens is not None:
            log.info("  - %s%s", settings.tokens.describe(),
                     ", token from the Host header" if settings.host_token else "")
        if self.wrapped is not None:
            log.info("  - %s", self.wrapped.describe())
        log.info("  - proxying from %s to %s", settings.listen_description,
                 settings.target_description)

    def _daemonize(self) -> None:
        import daemon  # python-daemon
        settings = self.settings
        streams = log_streams()
        keep = [self.listener.fileno()] + [s.fileno() for s in streams]
        log_stream = next((s for s in streams if getattr(s, "name", "") == settings.log_file),
                          None) if settings.log_file else None
        context = daemon.DaemonContext(
            working_directory=settings.web or "/",
            umask=0o022,
            files_preserve=keep,
            stdout=log_stream,
            stderr=log_stream,
            signal_map={},
            detach_process=True,
        )
        context.open()

    def _write_pid_file(self) -> None:
        path = self.settings.pid_file
        if not path:
            return
        tmp = "%s.%d.tmp" % (path, os.getpid())
        with open(tmp, "w") as handle:
            handle.write("%d\n" % os.getpid())
        os.replace(tmp, path)
        self.pid_file_written = True

    def _title(self) -> None:
        try:
            from setproctitle import setproctitle
        except ImportError:  # pragma: no cover
            return
        setproctitle("websockify master %s -> %s" % (
            self.settings.listen_description, self.settings.target_description))

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        signal.set_wakeup_fd(self._wake_w)
        for signum in SIGNALS:
            signal.signal(signum, self._queue_signal)

    def _queue_signal(self, signum, frame) -> None:
        # Only queue; the loop does the work outside the handler.
        if len(self.signal_queue) < 20:
            self.signal_queue.append(signum)

    # -- workers -----------------------------------------------------------

    def _free_slot(self) -> int:
        used = {worker.slot for worker in self.workers.values()}
        for slot in range(self.board.slots):
            if slot not in used:
                return slot
        raise RuntimeError("no free scoreboard slot")

    def spawn_worker(self, number: int) -> WorkerProcess:
        slot = self._free_slot()
        self.board.reset(slot)
        master_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            status = EXIT_WORKER_BOOT
            try:
                signal.set_wakeup_fd(-1)
                for signum in SIGNALS:
                    signal.signal(signum, signal.SIG_DFL)
                # Until boot installs handlers, a log reopen or reload must not kill us.
                signal.signal(signal.SIGUSR1, signal.SIG_IGN)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                os.close(self._wake_r)
                os.close(self._wake_w)
                if self.wrapped is not None:
                    self.wrapped.close()
                from websockify.worker import run_worker
                status = run_worker(self.settings, self.listener, self.board, slot,
                                    number, master_pid)
            except BaseException:
                log.exception("worker %d failed", number)
            finally:
                from websockify.worker import exit_child
                exit_child(status)
        worker = WorkerProcess(pid, slot, number)
        self.workers[pid] = worker
        log.debug("started worker %d (pid %d)", number, pid)
        return worker

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self._worker_exited(worker, status)
            elif self.wrapped is not None and self.wrapped.owns(pid):
                self._wrapped_exited(status)

    def _worker_exited(self, worker: WorkerProcess, status: int) -> None:
        booted = self.board.read(worker.slot)[5]
        if os.WIFSIGNALED(status):
            how = "killed by signal %d" % os.WTERMSIG(status)
            code = None
        else:
            code = os.WEXITSTATUS(status)
            how = "exited with status %d" % code
        if self.stopping is not None or worker.retiring:
            log.debug("worker %d (pid %d) %s", worker.number, worker.pid, how)
            return
        if code == EXIT_WORKER_BOOT or not booted:
            log.error("worker %d (pid %d) failed to start (%s); stopping the server",
                      worker.number, worker.pid, how)
            self.exit_status = EXIT_WORKER_BOOT
            self.stop(sb.FAST)
            return
        log.warning("worker %d (pid %d) %s; starting a new one",
                    worker.number, worker.pid, how)
        self.spawn_worker(worker.number)

    def _kill_workers(self, signum: int) -> None:
        for pid in list(self.workers):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    # -- the loop --------------------------------------------------------------

    def _loop(self) -> None:
        wrapped = self.wrapped
        while True:
            try:
                select.select([self._wake_r] + (wrapped.fds() if wrapped else []), [], [],
                              TICK)
            except InterruptedError:
                pass
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
            if wrapped is not None:
                wrapped.read_output()
            while self.signal_queue:
                signum = self.signal_queue.pop(0)
                getattr(self, "handle_" + SIGNALS[signum])()
            self._reap()
            if self.stopping is not None:
                # The program is stopped last: draining sessions still use it.
                if not self.workers and (wrapped is None or wrapped.stop_step(time.time())):
                    return
                if self.stop_deadline is not None and time.time() > self.stop_deadline:
                    log.warning("workers did not stop in time; killing them")
                    self._kill_workers(signal.SIGKILL)
                    self.stop_deadline = None
                continue
            self._check_workers()
            self._check_timeouts()
            if wrapped is not None and self.stopping is None:
                wrapped.tick(time.time())

    def stop(self, command: int) -> None:
        """Tell every worker to stop with ``command`` (escalating only)."""
        if self.stopping is not None and command <= self.stopping:
            return
        self.stopping = command
        if command == sb.DRAIN:
            self.stop_deadline = None
        elif command == sb.GRACEFUL:
            self.stop_deadline = time.time() + self.settings.graceful_timeout + EXTRA_STOP_TIME
        else:
            self.stop_deadline = time.time() + EXTRA_STOP_TIME
        for worker in self.workers.values():
            self.board.command(worker.slot, command)
        # No new worker will be forked: let the kernel refuse new clients.
        if self.listener is not None:
            try:
                self.listener.close()
            except OSError:
                pass

    # -- the wrapped program -------------------------------------------------

    def _start_wrapped(self) -> bool:
        try:
            self.wrapped.start()
        except WrapError as exc:
            log.error("%s", exc)
            self.exit_status = EXIT_CONFIG
            return False
        return True

    def _wrapped_exited(self, status: int) -> None:
        code = self.wrapped.exited(status, stopping=self.stopping is not None)
        if code is not None:
            # --wrap-mode exit: websockify ends with the program's status.
            self.exit_status = code
            self.stop(sb.GRACEFUL)

    def _check_workers(self) -> None:
        now = time.time()
        for worker in list(self.workers.values()):
            pid, heartbeat, live, connections, done, booted, command = self.board.read(worker.slot)
            if booted and now - heartbeat > WORKER_STALL_TIMEOUT:
                log.error("worker %d (pid %d) stopped reporting for %.0fs; killing it",
                          worker.number, worker.pid, now - heartbeat)
                try:
                    os.kill(worker.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.board.reset(worker.slot)

    def totals(self) -> tuple:
        live = done = 0
        for worker in self.workers.values():
            row = self.board.read(worker.slot)
            live += row[2]
            done += row[4]
        return live, done

    def _check_timeouts(self) -> None:
        settings = self.settings
        now = time.time()
        live, done = self.totals()
        if live:
            self.last_busy = now
        if settings.run_once and done >= 1:
            log.info("exiting due to --run-once")
            self.stop(sb.GRACEFUL)
        elif settings.timeout and now - self.started >= settings.timeout:
            log.info("listener exit due to --timeout %g", settings.timeout)
            self.stop(sb.DRAIN)
        elif settings.idle_timeout and now - self.last_busy >= settings.idle_timeout:
            log.info("listener exit due to --idle-timeout %g", settings.idle_timeout)
            self.stop(sb.GRACEFUL)

    # -- signals -----------------------------------------------------------------

    def handle_term(self) -> None:
        log.info("got SIGTERM: stopping gracefully")
        self.stop(sb.GRACEFUL)

    def handle_int(self) -> None:
        log.info("got SIGINT: stopping gracefully")
        self.stop(sb.GRACEFUL)

    def handle_quit(self) -> None:
        log.info("got SIGQUIT: stopping now")
        self.stop(sb.FAST)

    def handle_hup(self) -> None:
        if self.stopping is not None:
            return
        log.info("got SIGHUP: replacing workers")
        self._reload_token_plugin()
        self._reload_auth_and_tls()
        old = [worker for worker in self.workers.values() if not worker.retiring]
        for worker in old:
            worker.retiring = True
        for worker in old:
            self.spawn_worker(worker.number)
            self.board.command(worker.slot, sb.GRACEFUL)

    def handle_usr1(self) -> None:
        # Reopen first, so that this line reaches a syslog server that came back.
        reopen_log_files()
        log.info("got SIGUSR1: reopening log files")
        self._kill_workers(signal.SIGUSR1)

    def handle_chld(self) -> None:
        self._reap()

    # -- end -----------------------------------------------------------------

    def _cleanup(self) -> None:
        if self.wrapped is not None:
            # Normally already stopped by the loop; never leave it behind.
            self.wrapped.kill_now()
            self.wrapped.flush_output()
            self.wrapped.close()
        if self.listener is not None:
            try:
                self.listener.close()
            except OSError:
                pass
        if not self.settings.inetd:
            unlink_unix_listener(self.settings.unix_listen)
        if self.pid_file_written:
            try:
                os.unlink(self.settings.pid_file)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("cannot remove pid file: %s", exc.strerror)
        log.info("websockify stopped")
