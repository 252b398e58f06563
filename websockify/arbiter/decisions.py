"""The arbiter's decisions: which workers run, when they are replaced, reloaded, stopped.

No system calls here.  Workers are started, signalled and reaped through a
``Processes`` object and time comes from a clock, so every decision (reap,
respawn, back-off, reload, stop, the watchdog) can be driven by tests with
fake processes and a fake clock; websockify.arbiter.master supplies the real ones.

The rules:

- A worker has *failed to boot* only if it exits before it reported ready
  in its scoreboard slot.  In the first generation that stops the server
  (EXIT_WORKER_BOOT: the configuration cannot work); in a reload it fails
  the reload and the previous workers keep serving; for a replacement it is
  retried with back-off.
- A worker that exits after boot, for any reason (a signal, the watchdog,
  a crash), is replaced.  Replacements that keep dying within a second of
  boot are started with a back-off of 1, 2, 4 ... 30 seconds.
- A reload starts a new generation beside the serving one; when all its
  workers are ready, the older generations drain under --graceful-timeout.
  A HUP that arrives while a reload is under way is remembered and runs
  as one more reload when that one is done, so reloads coalesce instead
  of piling up half-booted generations.
- The watchdog: a booted worker whose heartbeat is older than
  --worker-timeout gets SIGABRT (its faulthandler writes where it was
  stuck), then SIGKILL if it is still there ABORT_GRACE later.
"""

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from websockify.arbiter import scoreboard as sb
from websockify.errors import EXIT_OK, EXIT_WORKER_BOOT

log = logging.getLogger("websockify")

EXTRA_STOP_TIME = 8.0      # beyond --graceful-timeout before draining workers are killed
ABORT_GRACE = 2.0          # after the watchdog's SIGABRT, before SIGKILL
QUICK_DEATH = 1.0          # dying this soon after boot counts towards the back-off
BACKOFF_MAX = 30.0
BOOT_TIMEOUT_FLOOR = 30.0  # a worker gets at least this long to boot under the watchdog


@dataclass
class Policy:
    """What the arbiter is asked to keep up (from the command line)."""

    workers: int = 1
    graceful_timeout: float = 30.0
    worker_timeout: float = 60.0     # 0: no watchdog
    run_once: bool = False
    timeout: float = 0.0             # --timeout: stop accepting after this long
    idle_timeout: float = 0.0


class Processes:
    """How the arbiter acts on the system (the master forks; tests fake it)."""

    def spawn(self, number: int, slot: sb.Slot) -> int:
        """Start worker ``number`` reporting in ``slot``; its pid (OSError if it cannot)."""
        raise NotImplementedError

    def signal(self, pid: int, signum: int) -> None:
        raise NotImplementedError

    def reap(self) -> List[Tuple[int, int]]:
        """(pid, wait status) of every child that has exited since the last call."""
        raise NotImplementedError


class WorkerProcess:
    __slots__ = ("pid", "number", "generation", "slot", "started", "booted_at",
                 "retiring", "retire_deadline", "abort_sent", "killed")

    def __init__(self, pid: int, number: int, generation: int, slot: sb.Slot, started: float):
        self.pid = pid
        self.number = number
        self.generation = generation
        self.slot = slot
        self.started = started
        self.booted_at: Optional[float] = None
        self.retiring = False
        self.retire_deadline: Optional[float] = None
        self.abort_sent: Optional[float] = None
        self.killed = False

    @property
    def booted(self) -> bool:
        return self.booted_at is not None

    def __repr__(self) -> str:
        return "<worker %d pid %d gen %d%s%s>" % (
            self.number, self.pid, self.generation, " booted" if self.booted else "",
            " retiring" if self.retiring else "")


@dataclass
class _Reload:
    generation: int
    undo: Optional[Callable[[], None]]
    started: float


@dataclass
class _Spawn:
    due: float
    number: int
    generation: int


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return "killed by signal %d" % os.WTERMSIG(status)
    return "exited with status %d" % os.WEXITSTATUS(status)


class Arbiter:
    """Keeps ``policy.workers`` workers serving through deaths, reloads and stops."""

    def __init__(self, policy: Policy, processes: Processes, slots: sb.SlotPool, *,
                 clock: Callable[[], float] = time.time,
                 reload_config: Optional[Callable[[], Optional[Callable[[], None]]]] = None,
                 on_stop: Optional[Callable[[], None]] = None,
                 on_other_exit: Optional[Callable[[int, int], None]] = None):
        self.policy = policy
        self.processes = processes
        self.slots = slots
        self.clock = clock
        #: Re-reads the configuration for new workers; returns how to undo it.
        self.reload_config = reload_config
        self.on_stop = on_stop
        self.on_other_exit = on_other_exit
        self.workers: Dict[int, WorkerProcess] = {}
        self.generation = 0            # the serving generation
        self.serving = False           # the first generation has booted
        self.reloading: Optional[_Reload] = None
        self.reload_pending = False
        self.pending: List[_Spawn] = []
        self.quick_deaths: Dict[int, int] = {}
        self.stopping: Optional[int] = None
        self.stop_deadline: Optional[float] = None
        self.exit_status = EXIT_OK
        self.started = clock()
        self.last_busy = self.started
        # Counters for operators.
        self.restarts = 0
        self.reloads = 0
        self.failed_reloads = 0

    # -- start and spawn -------------------------------------------------

    def start(self) -> None:
        self.generation = 1
        for number in range(1, self.policy.workers + 1):
            self._spawn(number, self.generation)

    def _spawn(self, number: int, generation: int) -> Optional[WorkerProcess]:
        now = self.clock()
        slot = self.slots.allocate(now)
        try:
            pid = self.processes.spawn(number, slot)
        except OSError as exc:
            # fork() can fail for a moment (EAGAIN, ENOMEM): try again later.
            self.slots.release(slot)
            delay = self._backoff(number, failed=True)
            log.error("cannot start worker %d: %s; trying again in %g s",
                      number, exc.strerror or exc, delay)
            self.pending.append(_Spawn(now + delay, number, generation))
            return None
        worker = WorkerProcess(pid, number, generation, slot, now)
        self.workers[pid] = worker
        log.debug("started worker %d (pid %d, generation %d)", number, pid, generation)
        return worker

    def _backoff(self, number: int, failed: bool) -> float:
        """Seconds before the next start of ``number``: 0, then 1, 2, 4 ... 30."""
        if failed:
            self.quick_deaths[number] = self.quick_deaths.get(number, 0) + 1
        count = self.quick_deaths.get(number, 0)
        if count <= 1:
            return 0.0
        return min(BACKOFF_MAX, 2.0 ** (count - 2))

    # -- the periodic step -------------------------------------------------

    def tick(self) -> None:
        now = self.clock()
        self._observe(now)
        if self.stopping is not None:
            if self.stop_deadline is not None and now > self.stop_deadline:
                log.warning("workers did not stop in time; killing them")
                self.kill_all(signal.SIGKILL)
                self.stop_deadline = None
            return
        self._progress_reload(now)
        self._run_pending(now)
        self._check_timeouts(now)

    def _observe(self, now: float) -> None:
        """Boots, heartbeats and deadlines, read from the scoreboard."""
        timeout = self.policy.worker_timeout
        for worker in list(self.workers.values()):
            if not worker.booted:
                if worker.slot.booted:
                    worker.booted_at = now
                    log.debug("worker %d (pid %d) is ready", worker.number, worker.pid)
                elif timeout and not worker.killed and \
                        now - worker.started > max(timeout, BOOT_TIMEOUT_FLOOR):
                    log.error("worker %d (pid %d) did not start within %.0f s; killing it",
                              worker.number, worker.pid, now - worker.started)
                    self._kill(worker)
                continue
            if now - worker.booted_at > QUICK_DEATH:
                self.quick_deaths.pop(worker.number, None)
            if worker.retiring and worker.retire_deadline is not None \
                    and now > worker.retire_deadline and not worker.killed:
                log.warning("worker %d (pid %d) did not finish draining in time; killing it",
                            worker.number, worker.pid)
                self._kill(worker)
            if timeout and not worker.killed:
                # Never silent for longer than it has been serving: a heartbeat read as
                # 0 (seen once under load) must not abort a worker that just booted.
                silent = now - max(worker.slot.heartbeat, worker.booted_at)
                if worker.abort_sent is None and silent > timeout:
                    log.error("worker %d (pid %d) has not reported for %.0f s "
                              "(--worker-timeout %g); aborting it", worker.number,
                              worker.pid, silent, timeout)
                    worker.abort_sent = now
                    self.processes.signal(worker.pid, signal.SIGABRT)
                elif worker.abort_sent is not None and now - worker.abort_sent > ABORT_GRACE:
                    log.error("worker %d (pid %d) still there %g s after SIGABRT; killing it",
                              worker.number, worker.pid, ABORT_GRACE)
                    self._kill(worker)
        if not self.serving and self.workers and self.stopping is None and all(
                w.booted for w in self.workers.values() if w.generation == 1):
            self.serving = True

    def _kill(self, worker: WorkerProcess) -> None:
        worker.killed = True
        self.processes.signal(worker.pid, signal.SIGKILL)

    def _run_pending(self, now: float) -> None:
        due, keep = [], []
        for spawn in self.pending:
            if spawn.generation < self.generation:
                continue        # its generation has been replaced meanwhile
            if spawn.due > now or (self.reloading is not None
                                   and spawn.generation != self.reloading.generation):
                # Not yet, or the old generation's while a reload is unsettled.
                keep.append(spawn)
            else:
                due.append(spawn)
        self.pending = keep
        for spawn in due:
            self._spawn(spawn.number, spawn.generation)

    # -- reaping -----------------------------------------------------------

    def reap(self) -> None:
        for pid, status in self.processes.reap():
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self._exited(worker, status)
            elif self.on_other_exit is not None:
                self.on_other_exit(pid, status)

    def _exited(self, worker: WorkerProcess, status: int) -> None:
        now = self.clock()
        # A boot the last tick has not seen yet still counts.
        booted = worker.booted or worker.slot.booted
        self.slots.release(worker.slot)
        how = describe_status(status)
        if self.stopping is not None or worker.retiring:
            log.debug("worker %d (pid %d) %s", worker.number, worker.pid, how)
            return
        if not booted:
            self._boot_failed(worker, how, now)
            return
        lived = now - (worker.booted_at if worker.booted_at is not None else now)
        if lived < QUICK_DEATH:
            delay = self._backoff(worker.number, failed=True)
        else:
            self.quick_deaths.pop(worker.number, None)
            delay = 0.0
        self.restarts += 1
        if delay:
            log.warning("worker %d (pid %d) %s %.1f s after it started, %d times in a row; "
                        "starting a new one in %g s", worker.number, worker.pid, how, lived,
                        self.quick_deaths[worker.number], delay)
        else:
            log.warning("worker %d (pid %d) %s; starting a new one",
                        worker.number, worker.pid, how)
        self._replace(worker, now + delay)

    def _replace(self, worker: WorkerProcess, due: float) -> None:
        self.pending.append(_Spawn(due, worker.number, worker.generation))
        self._run_pending(self.clock())

    def _boot_failed(self, worker: WorkerProcess, how: str, now: float) -> None:
        reload = self.reloading
        if reload is not None and worker.generation == reload.generation:
            self._reload_failed(worker, how)
        elif not self.serving:
            log.error("worker %d (pid %d) failed to start (%s); stopping the server",
                      worker.number, worker.pid, how)
            self.exit_status = EXIT_WORKER_BOOT
            self.stop(sb.FAST)
        else:
            delay = self._backoff(worker.number, failed=True)
            log.error("worker %d (pid %d) failed to start (%s); trying again in %g s",
                      worker.number, worker.pid, how, delay)
            self._replace(worker, now + delay)

    # -- reloads -------------------------------------------------------------

    def request_reload(self) -> None:
        if self.stopping is not None:
            log.info("got SIGHUP while stopping: ignored")
            return
        if self.reloading is not None:
            if not self.reload_pending:
                log.info("got SIGHUP during a reload: one more reload follows it")
            self.reload_pending = True
            return
        self._begin_reload()

    def _begin_reload(self) -> None:
        now = self.clock()
        log.info("got SIGHUP: replacing workers (generation %d)", self._next_generation())
        generation = self._next_generation()
        undo = self.reload_config() if self.reload_config is not None else None
        self.reloading = _Reload(generation, undo, now)
        self.reloads += 1
        for number in range(1, self.policy.workers + 1):
            self._spawn(number, generation)

    def _next_generation(self) -> int:
        return max([self.generation] + [w.generation for w in self.workers.values()]) + 1

    def _progress_reload(self, now: float) -> None:
        reload = self.reloading
        if reload is None:
            return
        new = [w for w in self.workers.values() if w.generation == reload.generation]
        if len(new) < self.policy.workers or not all(w.booted for w in new):
            return
        old = [w for w in self.workers.values()
               if w.generation != reload.generation and not w.retiring]
        for worker in old:
            self._retire(worker, now)
        self.generation = reload.generation
        self.reloading = None
        log.info("reload done: %d new worker(s) serving, %d draining",
                 len(new), sum(1 for w in self.workers.values() if w.retiring))
        if self.reload_pending:
            self.reload_pending = False
            self._begin_reload()

    def _retire(self, worker: WorkerProcess, now: float) -> None:
        worker.retiring = True
        worker.retire_deadline = now + self.policy.graceful_timeout + EXTRA_STOP_TIME
        worker.slot.command(sb.GRACEFUL)

    def _reload_failed(self, failed: WorkerProcess, how: str) -> None:
        reload = self.reloading
        self.failed_reloads += 1
        log.error("reload failed: worker %d (pid %d) of the new generation %s before it "
                  "was ready; the previous workers keep serving", failed.number,
                  failed.pid, how)
        now = self.clock()
        for worker in list(self.workers.values()):
            if worker.generation != reload.generation:
                continue
            if worker.slot.booted:
                self._retire(worker, now)
            else:
                worker.retiring = True
                self._kill(worker)
        self.reloading = None
        self.reload_pending = False
        self.pending = [s for s in self.pending if s.generation != reload.generation]
        if reload.undo is not None:
            reload.undo()

    # -- stopping ----------------------------------------------------------------

    def stop(self, command: int) -> None:
        """Tell every worker to stop with ``command`` (escalating only)."""
        if self.stopping is not None and command <= self.stopping:
            return
        self.stopping = command
        now = self.clock()
        if command == sb.DRAIN:
            self.stop_deadline = None
        elif command == sb.GRACEFUL:
            self.stop_deadline = now + self.policy.graceful_timeout + EXTRA_STOP_TIME
        else:
            self.stop_deadline = now + EXTRA_STOP_TIME
        for worker in self.workers.values():
            worker.slot.command(command)
        self.pending.clear()
        self.reloading = None
        self.reload_pending = False
        if self.on_stop is not None:
            self.on_stop()

    @property
    def stopped(self) -> bool:
        return self.stopping is not None and not self.workers

    def kill_all(self, signum: int) -> None:
        for pid in list(self.workers):
            self.processes.signal(pid, signum)

    # -- --run-once, --timeout, --idle-timeout ----------------------------------

    def totals(self) -> Tuple[int, int]:
        """(open sessions, sessions done) over the workers alive."""
        live = done = 0
        for worker in self.workers.values():
            live += worker.slot.live
            done += worker.slot.done
        return live, done

    def _check_timeouts(self, now: float) -> None:
        policy = self.policy
        live, done = self.totals()
        if live:
            self.last_busy = now
        if policy.run_once and done >= 1:
            log.info("exiting due to --run-once")
            self.stop(sb.GRACEFUL)
        elif policy.timeout and now - self.started >= policy.timeout:
            log.info("listener exit due to --timeout %g", policy.timeout)
            self.stop(sb.DRAIN)
        elif policy.idle_timeout and now - self.last_busy >= policy.idle_timeout:
            log.info("listener exit due to --idle-timeout %g", policy.idle_timeout)
            self.stop(sb.GRACEFUL)
