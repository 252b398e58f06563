"""The master process: plugins, listener, signals, forking, the loop.

No gevent here.  Signal handlers only queue the signal and wake the loop
through a pipe; the loop dispatches to ``handle_<name>`` and lets the
arbiter (websockify.arbiter) decide about workers: this module gives it
real processes (fork, kill, waitpid) and the configuration it reloads.  A
wrapped program (``-- COMMAND``) is supervised from the same loop
(websockify.arbiter.wrap).

A library caller (websockify.library) runs the master in its own process,
maybe in a thread that is not the main one: then the caller's logging is
left alone, only our own children are reaped, signal handlers are put back
when the master returns, and without the main thread no signal is taken at
all (``request_stop`` stops it instead).
"""

import logging
import os
import select
import signal
import sys
import threading
import time
from typing import Callable, List, Optional, Tuple

from websockify.addr import format_host_port
from websockify.arbiter import scoreboard as sb
from websockify.arbiter.daemon import PidFile, daemonize
from websockify.arbiter.decisions import Arbiter, Policy, Processes
from websockify.arbiter.wrap import WrapError, WrappedProgram
from websockify.config import Config
from websockify.errors import ConfigError, EXIT_CONFIG, EXIT_FAILURE, EXIT_LISTEN, EXIT_WORKER_BOOT
from websockify.log import library_logging, log_streams, reopen_log_files, setup_logging
from websockify.net.sockets import (ListenError, describe_listener, open_listener,
                                    raise_nofile_limit, tcp_listener, unlink_unix_listener)
from websockify.runtime import Runtime
from websockify.tunnel.config import TunnelConfigError, load_tunnel_config

log = logging.getLogger("websockify")

TICK = 0.25

SIGNALS = {
    signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGQUIT: "quit",
    signal.SIGHUP: "hup", signal.SIGUSR1: "usr1", signal.SIGCHLD: "chld",
}


class ForkedWorkers(Processes):
    """The arbiter's real processes: workers forked from the master."""

    def __init__(self, master: "Master", own_only: bool = False):
        self.master = master
        #: Reap only the workers and the wrapped program, not every child of
        #: the process (a library caller's own children are its business).
        self.own_only = own_only

    def spawn(self, number: int, slot: sb.Slot) -> int:
        master = self.master
        master_pid = os.getpid()
        tokens = master.runtime.tokens
        slot.token_plugin = tokens.name if tokens is not None else ""
        pid = os.fork()
        if pid == 0:
            status = EXIT_WORKER_BOOT
            try:
                if master.metrics is not None:
                    master.metrics.close()     # the master's listener, not ours
                signal.set_wakeup_fd(-1)
                for signum in SIGNALS:
                    signal.signal(signum, signal.SIG_DFL)
                # Until boot installs handlers, a log reopen or reload must not kill us.
                signal.signal(signal.SIGUSR1, signal.SIG_IGN)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                os.close(master._wake_r)
                os.close(master._wake_w)
                if master.wrapped is not None:
                    master.wrapped.close()
                from websockify.arbiter.worker import run_worker
                status = run_worker(master.config, master.runtime, master.listener,
                                    slot.board, slot.index, number, master_pid)
            except BaseException:
                log.exception("worker %d failed", number)
            finally:
                from websockify.arbiter.worker import exit_child
                exit_child(status)
        return pid

    def signal(self, pid: int, signum: int) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def reap(self) -> List[Tuple[int, int]]:
        if self.own_only:
            return self._reap_own()
        exited = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            exited.append((pid, status))
        self.master.workers_exited(exited)
        return exited

    def _reap_own(self) -> List[Tuple[int, int]]:
        master = self.master
        pids = list(master.arbiter.workers)
        if master.wrapped is not None and master.wrapped.pid is not None:
            pids.append(master.wrapped.pid)
        exited = []
        for pid in pids:
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if done:
                exited.append((done, status))
        self.master.workers_exited(exited)
        return exited


class Master:
    """The master process for one configuration, from start to exit status."""

    def __init__(self, config: Config, runtime: Optional[Runtime] = None,
                 library: bool = False):
        self.config = config
        self.runtime = runtime if runtime is not None else Runtime()
        #: Run inside a library caller's process (websockify.library).
        self.library = library
        self._previous_signals: dict = {}
        self._previous_wakeup_fd: Optional[int] = None
        self.listener = None
        #: The --metrics listener (metrics/endpoint.py), served from the loop.
        self.metrics = None
        self.started = time.time()
        self.signal_queue: List[int] = []
        self.worker_count = config.workers or os.cpu_count() or 1
        if config.run_once:
            # One worker, which stops accepting after its first session.
            self.worker_count = 1
        self._wake_r = self._wake_w = -1
        self.pid_file = PidFile(config.pid_file)
        self.wrapped: Optional[WrappedProgram] = None
        self.arbiter = Arbiter(
            Policy(workers=self.worker_count, graceful_timeout=config.graceful_timeout,
                   worker_timeout=config.worker_timeout, run_once=bool(config.run_once),
                   timeout=config.timeout, idle_timeout=config.idle_timeout),
            ForkedWorkers(self, own_only=library), sb.SlotPool(self.worker_count * 2 + 2),
            reload_config=self._reload_config, on_stop=self._close_listener,
            on_other_exit=self._other_exited)

    @property
    def exit_status(self) -> int:
        return self.arbiter.exit_status

    @exit_status.setter
    def exit_status(self, value: int) -> None:
        self.arbiter.exit_status = value

    # -- start ---------------------------------------------------------------

    def run(self) -> int:
        config = self.config
        try:
            if self.library:
                library_logging(config.verbose)
            else:
                setup_logging(config.verbose, config.log_file, config.syslog,
                              config.legacy_syslog, config.daemon)
        except OSError as exc:
            sys.stderr.write("websockify: cannot open log file %s: %s\n"
                             % (config.log_file, exc.strerror))
            return EXIT_CONFIG
        try:
            if config.target_config:
                log.warning("--target-config is deprecated: use --token-plugin TokenFile "
                            "--token-source %s", config.target_config)
            self.runtime.tokens = self._load_token_plugin()
            self._load_auth_and_tls()
            if config.record:
                from websockify.record import check_destination
                check_destination(config.record)
            self._load_tunnels()
            self._start_tunnel_host()
        except ConfigError as exc:
            log.error("%s", exc)
            self._close_tunnel_listeners()
            return EXIT_CONFIG
        nofile = raise_nofile_limit()
        try:
            self.listener = open_listener(config)
        except ListenError as exc:
            log.error("%s", exc)
            self._close_tunnel_listeners()
            return EXIT_LISTEN
        if config.metrics is not None:
            try:
                self._open_metrics()
            except ListenError as exc:
                log.error("%s", exc)
                self.listener.close()
                self._close_tunnel_listeners()
                return EXIT_LISTEN
        if config.wrap_cmd:
            try:
                self.wrapped = WrappedProgram.from_config(config, self.listener)
            except WrapError as exc:
                log.error("%s", exc)
                return EXIT_CONFIG
            # The program is the target, before the banner and before any fork.
            self.config = config = config.replace(target_host=self.wrapped.target_host,
                                                  target_port=self.wrapped.target_port)
        try:
            if not config.daemon:
                # Before the banner: a signal sent once its last line is out (a
                # reload right after the start) is queued, not its default
                # action, which for SIGHUP is to end the process.
                self._install_signals()
            self._banner(nofile)
            if config.daemon:
                self._daemonize()
                self._install_signals()
            self.pid_file.write()
            self._title()
            if self.wrapped is not None and not self._start_wrapped():
                return self.exit_status
            self.arbiter.start()
            self._loop()
        except Exception:
            log.exception("master failed")
            self.exit_status = EXIT_FAILURE
            self.arbiter.kill_all(signal.SIGKILL)
            if self.wrapped is not None:
                self.wrapped.kill_now()
        finally:
            self._cleanup()
        return self.exit_status

    def _load_token_plugin(self):
        """Build the token plugin here, before any fork: a bad source fails the start."""
        config = self.config
        if not (config.token_plugin or config.target_config):
            return None
        if self.runtime.token_object is not None:
            # A library caller's plugin object: wrapped, not built again.
            from websockify.plugins.tokens import TokenResolver
            return TokenResolver(self.runtime.token_object, config.token_plugin,
                                 config.token_source, bool(config.host_token))
        from websockify.plugins.tokens import load_resolver
        return load_resolver(config)

    def _load_auth_and_tls(self) -> None:
        """The auth plugin and the TLS contexts, before any fork (ConfigError: exit 5)."""
        from websockify.plugins.auth import load_authenticator
        from websockify.net.tls import TargetContexts, build_server_context
        config, runtime = self.config, self.runtime
        tls = build_server_context(config)
        target_tls = TargetContexts(config) if config.ssl_target else None
        auth = load_authenticator(config, runtime.auth_object)
        runtime.tls, runtime.target_tls, runtime.auth = tls, target_tls, auth

    def _open_metrics(self) -> None:
        from websockify.metrics.endpoint import MetricsEndpoint
        host, port = self.config.metrics
        self.metrics = MetricsEndpoint(host, port, self.serving, self._render_metrics)
        log.info("metrics on http://%s/metrics (and /healthz)", self.metrics.address)

    def _serving_workers(self) -> int:
        return sum(1 for worker in self.arbiter.workers.values()
                   if worker.booted and not worker.retiring)

    def serving(self) -> bool:
        """Whether at least one booted worker is accepting (/healthz)."""
        return self.arbiter.stopping is None and self._serving_workers() > 0

    def _render_metrics(self) -> bytes:
        from websockify.metrics.counters import LOOKUP_RESULTS
        from websockify.metrics.exposition import Snapshot, render
        arbiter = self.arbiter
        words, lookups = arbiter.slots.totals.sum(arbiter.slots.live_counters())
        tokens = self.runtime.tokens
        if tokens is not None:
            # The configured plugin is listed from the start, with zeros.
            lookups.setdefault(tokens.name, [0] * len(LOOKUP_RESULTS))
        tunnels = None
        if self.runtime.tunnel_host is not None:
            rows = self.runtime.tunnel_host.registry.snapshot()
            tunnels = (sum(1 for row in rows if row["connected"]),
                       sum(row["open_streams"] for row in rows))
        return render(Snapshot(
            words=words, lookups=lookups,
            workers_serving=self._serving_workers(),
            worker_restarts=arbiter.restarts, reloads=arbiter.reloads,
            reload_failures=arbiter.failed_reloads, start_time=self.started,
            tunnels=tunnels))

    def _start_tunnel_host(self) -> None:
        """--tunnel-config: the agents' registry and the hand-off directory, before any fork."""
        if self.runtime.tunnels is None:
            return
        from websockify.tunnel.host import TunnelHost
        self.runtime.tunnel_host = TunnelHost(self.runtime.tunnels)

    def _sync_tunnel_host(self) -> None:
        """After a reload (or its undo): the registry follows the configuration's agents."""
        host = self.runtime.tunnel_host
        if host is not None and self.runtime.tunnels is not None \
                and self.runtime.tunnels is not host.config:
            host.reload(self.runtime.tunnels)

    def workers_exited(self, exited) -> None:
        """Reaped processes: a worker's agents are nobody's any more."""
        host = self.runtime.tunnel_host
        if host is not None:
            for pid, _ in exited:
                host.worker_exited(pid)

    def _reload_auth_and_tls(self) -> None:
        """On SIGHUP: certificates and the auth plugin are read again for the new workers."""
        runtime = self.runtime
        previous = runtime.snapshot()
        try:
            self._load_auth_and_tls()
        except ConfigError as exc:
            log.error("%s; new workers keep the previous TLS and auth configuration", exc)
            return
        if previous[2] is not None and runtime.tls is None:
            # A certificate being renewed may be missing for a moment: never
            # let a reload turn wss:// off.
            runtime.restore(previous)
            log.error("certificate file %s not found; new workers keep the previous TLS "
                      "and auth configuration", self.config.cert)
            return
        if runtime.tls is not None:
            log.info("TLS certificate %s reloaded", self.config.cert)

    def _reload_config(self) -> Callable[[], None]:
        """On SIGHUP: plugins and certificates read again for the new workers.

        Returns the undo the arbiter calls if the new workers fail to boot, so
        that replacements of the old workers are forked with the old setup.
        """
        previous = self.runtime.snapshot()
        self._reload_token_plugin()
        self._reload_auth_and_tls()
        self._reload_tunnels()
        self._sync_tunnel_host()

        def undo() -> None:
            newer = self.runtime.tunnel_listeners
            self.runtime.restore(previous)
            self._undo_tunnel_listeners(newer)
            self._sync_tunnel_host()
        return undo

    def _reload_token_plugin(self) -> None:
        """On SIGHUP: re-read the token source for the new workers, or keep the old one."""
        if self.runtime.tokens is None:
            return
        try:
            self.runtime.tokens = self._load_token_plugin()
        except ConfigError as exc:
            log.error("%s; new workers keep the previous token configuration", exc)
            return
        log.info("token plugin %s reloaded", self.runtime.tokens.name)

    # -- reverse tunnels (--tunnel-config) ------------------------------------------

    def _load_tunnels(self) -> None:
        """The tunnel configuration and its agents' TCP faces, before any fork (exit 5)."""
        if not self.config.tunnel_config:
            return
        tunnels = load_tunnel_config(self.config.tunnel_config)
        self.runtime.tunnel_listeners = self._bind_tunnel_listeners(tunnels, {})
        self.runtime.tunnels = tunnels

    def _bind_tunnel_listeners(self, tunnels, bound: dict) -> dict:
        """A listening socket for each agent's listen address and for the node address:
        kept from ``bound`` when there, else bound now.  TunnelConfigError if one cannot
        be (none left open)."""
        listeners: dict = {}
        new = []
        try:
            # The agents' TCP faces, and the internal link's node address.
            wanted = [(agent.listen, "agent %s" % agent.agent_id)
                      for agent in tunnels.agents.values() if agent.listen is not None]
            if tunnels.node is not None:
                wanted.append((tunnels.node, "node"))
            for address, what in wanted:
                sock = bound.get(address)
                if sock is None or sock.fileno() < 0:
                    try:
                        sock = tcp_listener(address[0], address[1], self.config.prefer_ipv6)
                    except ListenError as exc:
                        raise TunnelConfigError("%s: %s" % (what, exc),
                                                tunnels.source) from None
                    new.append(sock)
                listeners[address] = sock
        except TunnelConfigError:
            for sock in new:
                sock.close()
            raise
        return listeners

    def _reload_tunnels(self) -> None:
        """On SIGHUP: the tunnel file read again and the TCP faces matched to it, or
        everything kept as it was (one log line)."""
        runtime = self.runtime
        if runtime.tunnels is None:
            return
        try:
            tunnels = load_tunnel_config(self.config.tunnel_config)
            listeners = self._bind_tunnel_listeners(tunnels, runtime.tunnel_listeners)
        except ConfigError as exc:
            log.error("%s; new workers keep the previous tunnel configuration", exc)
            return
        for address, sock in runtime.tunnel_listeners.items():
            if listeners.get(address) is not sock:
                # The old workers keep their copies until they have drained.
                sock.close()
        runtime.tunnels, runtime.tunnel_listeners = tunnels, listeners
        log.info("tunnel configuration reloaded: %s", tunnels.describe())

    def _undo_tunnel_listeners(self, newer: dict) -> None:
        """A reload was undone: the previous TCP faces back (bound again where it closed
        them), and the ones only the reload opened closed."""
        runtime = self.runtime
        if runtime.tunnels is not None:
            reusable = dict(runtime.tunnel_listeners)
            reusable.update(newer)
            try:
                runtime.tunnel_listeners = self._bind_tunnel_listeners(runtime.tunnels, reusable)
            except TunnelConfigError as exc:
                log.error("%s; that agent has no TCP face until the next reload", exc)
        kept = {id(sock) for sock in runtime.tunnel_listeners.values()}
        for sock in newer.values():
            if id(sock) not in kept:
                sock.close()

    def _close_tunnel_listeners(self) -> None:
        for sock in self.runtime.tunnel_listeners.values():
            try:
                sock.close()
            except OSError:
                pass

    def _banner(self, nofile: int) -> None:
        config, runtime = self.config, self.runtime
        log.info("WebSocket server settings:")
        if config.inetd:
            log.info("  - Listen for inetd connections")
        elif config.unix_listen:
            log.info("  - Listen on unix socket %s", config.unix_listen)
        elif config.listen_fds:
            log.info("  - Listen on %s (socket passed by systemd)",
                     describe_listener(self.listener))
        else:
            log.info("  - Listen on %s", describe_listener(self.listener))
        if config.web:
            log.info("  - Web server%s. Web root: %s",
                     " (no directory listings)" if config.file_only else "", config.web)
        else:
            log.info("  - No web server (plain HTTP requests get 405)")
        if runtime.tls is None:
            log.info("  - No SSL/TLS support (no cert file)")
        else:
            log.info("  - SSL/TLS support%s, certificate %s%s",
                     " only (plain connections get 403)" if config.ssl_only
                     else " (ws:// and wss:// on one port)", config.cert,
                     ", client certificates required" if config.verify_client else "")
        if config.ssl_target_no_verify:
            log.warning("  - --ssl-target-no-verify: the target's certificate is NOT "
                        "verified; anyone on the path to the target can read the session")
        elif config.ssl_target:
            log.info("  - TLS to the target, verified with %s",
                     config.ssl_target_cafile or "the system CAs")
        if runtime.auth is not None:
            log.info("  - Authentication plugin %s%s", runtime.auth.name,
                     " (static files too)" if config.web_auth else "")
        if config.record:
            log.info("  - Recording to '%s.*'", config.record)
        if config.daemon:
            log.info("  - Backgrounding (daemon)")
        if config.libserver:
            log.warning("  - --libserver has no effect: this server always uses gevent workers")
        log.info("  - %d worker(s), descriptor limit %d", self.worker_count, nofile)
        if runtime.hooks is not None:
            handler_class = runtime.hooks.handler_class
            log.info("  - request handler %s.%s: its %s run in the sessions",
                     handler_class.__module__, handler_class.__qualname__,
                     ", ".join(runtime.hooks.overridden))
        if runtime.tokens is not None:
            log.info("  - %s%s", runtime.tokens.describe(),
                     ", token from the Host header" if config.host_token else "")
        if self.wrapped is not None:
            log.info("  - %s", self.wrapped.describe())
        tunnels = runtime.tunnels
        if tunnels is not None:
            log.info("  - Reverse tunnels: %s", tunnels.describe())
            if tunnels.http_server_endpoint is not None:
                log.info("  - http_server_endpoint %s in %s is not used: websockify listens "
                         "on %s", format_host_port(*tunnels.http_server_endpoint),
                         tunnels.source, config.listen_description)
        target = config.target_description
        if runtime.hooks is not None and target == format_host_port("", None):
            target = "the targets the request handler picks"
        log.info("  - proxying from %s to %s", config.listen_description, target)

    def _daemonize(self) -> None:
        config = self.config
        streams = log_streams()
        log_stream = next((s for s in streams if getattr(s, "name", "") == config.log_file),
                          None) if config.log_file else None
        daemonize([self.listener.fileno()] + [s.fileno() for s in streams]
                  + [s.fileno() for s in self.runtime.tunnel_listeners.values()], log_stream,
                  config.web or "/")

    def _title(self) -> None:
        if self.library:
            return      # the caller's process keeps its name
        try:
            from setproctitle import setproctitle
        except ImportError:  # pragma: no cover
            return
        setproctitle("websockify master %s -> %s" % (
            self.config.listen_description, self.config.target_description))

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        if threading.current_thread() is not threading.main_thread():
            # Python delivers signals to the main thread only: the caller
            # stops us (request_stop), and children are reaped every tick.
            log.info("  - not in the main thread: signals are the caller's business "
                     "(stop the server with terminate())")
            return
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._wake_w)
        for signum in SIGNALS:
            self._previous_signals[signum] = signal.signal(signum, self._queue_signal)

    def _restore_signals(self) -> None:
        """Give a library caller its own handlers back."""
        for signum, handler in self._previous_signals.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_signals = {}
        if self._previous_wakeup_fd is not None:
            signal.set_wakeup_fd(self._previous_wakeup_fd)
            self._previous_wakeup_fd = None

    def request_stop(self) -> None:
        """Stop gracefully, as on SIGTERM; callable from any thread."""
        self._queue_signal(signal.SIGTERM, None)
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"t")
            except OSError:
                pass

    def _queue_signal(self, signum, frame) -> None:
        # Only queue; the loop does the work outside the handler.
        if len(self.signal_queue) < 20:
            self.signal_queue.append(signum)

    # -- the loop --------------------------------------------------------------

    def _loop(self) -> None:
        wrapped = self.wrapped
        metrics = self.metrics
        while True:
            readers, writers = metrics.poll_fds() if metrics is not None else ([], [])
            readable = writable = ()
            try:
                readable, writable, _ = select.select(
                    [self._wake_r] + (wrapped.fds() if wrapped else []) + readers, writers, [],
                    TICK)
            except InterruptedError:
                pass
            if metrics is not None:
                metrics.service(readable, writable)
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
            arbiter = self.arbiter
            arbiter.reap()
            arbiter.tick()
            if arbiter.stopping is not None:
                # The program is stopped last: draining sessions still use it.
                if not arbiter.workers and (wrapped is None or wrapped.stop_step(time.time())):
                    return
                continue
            if wrapped is not None:
                wrapped.tick(time.time())

    def stop(self, command: int) -> None:
        self.arbiter.stop(command)

    def _close_listener(self) -> None:
        # No new worker will be forked: let the kernel refuse new clients.
        if self.listener is not None:
            try:
                self.listener.close()
            except OSError:
                pass
        self._close_tunnel_listeners()

    def _other_exited(self, pid: int, status: int) -> None:
        if self.wrapped is not None and self.wrapped.owns(pid):
            self._wrapped_exited(status)

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
        code = self.wrapped.exited(status, stopping=self.arbiter.stopping is not None)
        if code is not None:
            # --wrap-mode exit: websockify ends with the program's status.
            self.exit_status = code
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
        self.arbiter.request_reload()

    def handle_usr1(self) -> None:
        # Reopen first, so that this line reaches a syslog server that came back.
        reopen_log_files()
        log.info("got SIGUSR1: reopening log files")
        self.arbiter.kill_all(signal.SIGUSR1)

    def handle_chld(self) -> None:
        self.arbiter.reap()

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
        self._close_tunnel_listeners()
        if self.metrics is not None:
            self.metrics.close()
        if not self.config.inetd:
            unlink_unix_listener(self.config.unix_listen)
        if self.runtime.tunnel_host is not None:
            self.runtime.tunnel_host.close()
        self.pid_file.remove()
        self._restore_signals()
        fds, (self._wake_r, self._wake_w) = (self._wake_r, self._wake_w), (-1, -1)
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        log.info("websockify stopped")
