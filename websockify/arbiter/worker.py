"""A worker process: after fork, patch gevent, serve the shared listener.

The worker reports to the master through its scoreboard slot (heartbeat,
open sessions, sessions done) and obeys the command the master
writes there; it never decides on its own that the whole server exits.
"""

import faulthandler
import logging
import os
import signal
import sys
import time

from websockify.arbiter import scoreboard as sb
from websockify.errors import EXIT_OK, EXIT_WORKER_BOOT

log = logging.getLogger("websockify")

REPORT_INTERVAL = 0.2


def run_worker(config, runtime, listener, board, slot: int, number: int,
               master_pid: int) -> int:
    """Entry point in the forked child; returns the process exit status."""
    try:
        from gevent import monkey
        monkey.patch_all()
        from websockify.metrics import counters
        counters.attach(board.counters(slot))
        worker = Worker(config, runtime, listener, board, slot, number, master_pid)
        worker.boot()
    except Exception:
        log.exception("worker %d failed to start", number)
        return EXIT_WORKER_BOOT
    try:
        worker.serve()
    except Exception:
        log.exception("worker %d crashed", number)
        return 1
    return EXIT_OK


class Worker:
    def __init__(self, config, runtime, listener, board, slot, number, master_pid):
        self.config = config
        self.runtime = runtime
        self.listener = listener
        self.board = board
        self.slot = slot
        self.number = number
        self.master_pid = master_pid
        self.command = sb.RUN
        self.server = None
        self.service = None
        self.tunnels = None

    def boot(self) -> None:
        import gevent
        from gevent.event import Event

        from websockify.log import TRAFFIC_LEGEND, traffic_printer
        from websockify.server.proxy import ProxyService
        from websockify.server.bridge import BridgeServer
        from websockify.server.web import StaticFiles, method_not_allowed

        try:
            from setproctitle import setproctitle
            setproctitle("websockify worker %d" % self.number)
        except ImportError:  # pragma: no cover - setproctitle is a dependency
            pass

        self._stop_event = Event()
        loop = gevent.get_hub().loop
        config, runtime = self.config, self.runtime
        traffic = traffic_printer() if config.traffic else None
        if traffic:
            traffic(TRAFFIC_LEGEND)
        service_class = ProxyService
        if config.echo:
            from websockify.server.echo import EchoService
            service_class = EchoService
        elif runtime.hooks is not None:
            # A library caller's handler overrides hooks: its sessions run
            # them (decided once, here: otherwise the relay's path is untouched).
            from websockify.server.hooks import HookedService
            service_class = HookedService
        self.service = service_class(config, runtime, loop, on_session_start=self._session_started,
                                     on_session_end=self._session_ended, traffic=traffic)
        application = (StaticFiles(config.web, config.file_only) if config.web
                       else method_not_allowed)
        connections = config.worker_connections or _default_connections()
        self.server = BridgeServer(self.listener, application, self.service,
                                   max_connections=connections,
                                   run_once=config.run_once, tls_context=runtime.tls,
                                   ssl_only=bool(config.ssl_only),
                                   handshake_timeout=config.handshake_timeout,
                                   web_auth=runtime.auth if config.web_auth else None,
                                   web_auth_target=(config.target_host, config.target_port),
                                   trusted_proxy=config.trusted_proxy)
        if runtime.tunnel_host is not None:
            from websockify.allocator import keep_read_buffers_on_the_heap
            from websockify.tunnel.hub import TunnelHub
            keep_read_buffers_on_the_heap()
            self.tunnels = TunnelHub(runtime.tunnel_host, config, runtime, self.server, loop,
                                     self.number)
            self.server.tunnels = self.tunnels
        # TERM/INT from an operator (or a terminal's Ctrl-C reaching the whole
        # process group) mean the same as the master's graceful command.
        gevent.signal_handler(signal.SIGTERM, self._signalled, sb.GRACEFUL)
        gevent.signal_handler(signal.SIGINT, self._signalled, sb.GRACEFUL)
        gevent.signal_handler(signal.SIGQUIT, self._signalled, sb.FAST)
        gevent.signal_handler(signal.SIGUSR1, self._reopen_logs)
        self._reopen_logs()   # a rotation may have happened while we booted
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.server.start()
        self.board.mark_booted(self.slot)
        self._report()
        log.debug("worker %d (pid %d) serving, up to %d connections",
                  self.number, os.getpid(), connections)

    def _reopen_logs(self) -> None:
        from websockify.log import reopen_log_files
        reopen_log_files()
        enable_fault_traceback()

    def _signalled(self, command: int) -> None:
        self._obey(command)

    def _session_started(self) -> None:
        self.server.session_started()

    def _session_ended(self) -> None:
        self.server.release()
        self._report()

    def _report(self) -> None:
        live = len(self.service.relays)
        if self.tunnels is not None:
            # Agents and their TCP users keep the server busy too (--idle-timeout).
            live += len(self.tunnels.links) + len(self.tunnels.users)
        self.board.report(self.slot, live, self.service.sessions_done)

    def _obey(self, command: int) -> None:
        if command > self.command:
            self.command = command
            self._stop_event.set()

    def serve(self) -> None:
        import gevent
        reporter = gevent.spawn(self._report_loop)
        self._stop_event.wait()
        self.drain()
        reporter.kill()
        self._report()

    def _report_loop(self) -> None:
        import gevent
        while True:
            self._report()
            command = self.board.pending_command(self.slot)
            if command != sb.RUN:
                self._obey(command)
            if os.getppid() != self.master_pid:
                log.warning("worker %d: master is gone, stopping", self.number)
                self._obey(sb.GRACEFUL)
            gevent.sleep(REPORT_INTERVAL)

    def drain(self) -> None:
        """Stop accepting, then end the sessions as the command says."""
        server, service = self.server, self.service
        server.stop_accepting_for_good()
        server.close_listener()
        tunnels = self.tunnels
        if tunnels is not None:
            tunnels.drain()
        if self.command == sb.DRAIN:
            # --timeout: open sessions carry on until they end, unless the
            # master escalates to a graceful or fast stop meanwhile.
            while server.connections and self.command == sb.DRAIN:
                self._stop_event.clear()
                self._stop_event.wait(0.5)
        if self.command == sb.GRACEFUL:
            deadline = time.time() + self.config.graceful_timeout
            while server.connections and time.time() < deadline and self.command == sb.GRACEFUL:
                self._stop_event.clear()
                self._stop_event.wait(min(0.2, max(0.0, deadline - time.time())))
        server.kill_handshakes()
        if tunnels is not None and tunnels.busy:
            log.info("worker %d: closing %d agent tunnel(s)", self.number, len(tunnels.links))
            tunnels.shutdown(1001, "Server shutting down")
            deadline = time.time() + 3.0
            while tunnels.links and time.time() < deadline:
                self._stop_event.clear()
                self._stop_event.wait(0.05)
        if service.relays:
            log.info("worker %d: closing %d open session(s)", self.number, len(service.relays))
            service.shutdown_all(1001, "Server shutting down")
            service.wait_empty(2.0 if self.command == sb.FAST else 6.0)
        server.close()
        if tunnels is not None:
            tunnels.close()
        service.finish_recordings(2.0 if self.command == sb.FAST else 10.0)


def enable_fault_traceback() -> None:
    """Where a stuck worker's stack goes when the watchdog sends SIGABRT.

    faulthandler writes from its C signal handler, so it works even while
    the event loop is blocked in a plugin's C call: the log file if there
    is one (reopened files are picked up again on SIGUSR1), else stderr.
    """
    from websockify.log import log_file_stream
    stream = log_file_stream() or sys.stderr
    try:
        faulthandler.enable(file=stream, all_threads=True)
    except (ValueError, OSError, AttributeError):
        pass   # no usable stream (stderr closed by a daemon without a log file)


def _default_connections() -> int:
    import resource
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Two descriptors per session, and some spare for logs, DNS, plugins.
    return max(1, (soft - 64) // 2)


def exit_child(status: int) -> None:
    """Leave the forked child without running the master's cleanup."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status)
