"""The arbiter's decisions, driven with fake processes and a fake clock.

No process is forked here: FakeProcesses hands out pids and plays the
workers' side of the scoreboard (boot, heartbeat, obeying commands) the
way websockify.arbiter.worker does, and the test moves the clock.
"""

import signal

import pytest

from websockify.arbiter import scoreboard as sb
from websockify.arbiter.decisions import (ABORT_GRACE, BACKOFF_MAX, BOOT_TIMEOUT_FLOOR,
                                EXTRA_STOP_TIME, Arbiter, Policy, Processes)
from websockify.errors import EXIT_OK, EXIT_WORKER_BOOT


def exited(code: int) -> int:
    """A wait status for a normal exit with ``code``."""
    return code << 8


def killed(signum: int) -> int:
    return signum


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeProcesses(Processes):
    def __init__(self, clock: Clock):
        self.clock = clock
        self.next_pid = 100
        self.slots = {}             # pid -> Slot
        self.numbers = {}           # pid -> worker number
        self.signals = []           # (pid, signum) in order
        self.exits = []             # (pid, status) waiting to be reaped
        self.fail_fork = 0          # how many spawns raise OSError

    def spawn(self, number, slot):
        if self.fail_fork:
            self.fail_fork -= 1
            raise OSError(11, "Resource temporarily unavailable")
        self.next_pid += 1
        self.slots[self.next_pid] = slot
        self.numbers[self.next_pid] = number
        return self.next_pid

    def signal(self, pid, signum):
        self.signals.append((pid, signum))

    def reap(self):
        exits, self.exits = self.exits, []
        return exits

    # -- the workers' side -------------------------------------------------
    def boot(self, pid):
        slot = self.slots[pid]
        slot.board.mark_booted(slot.index)
        self.beat(pid)

    def beat(self, pid, live=0, done=0):
        slot = self.slots[pid]
        slot.board.report(slot.index, live, done, now=self.clock())

    def exit(self, pid, status):
        self.exits.append((pid, status))

    def command(self, pid):
        return self.slots[pid].board.pending_command(self.slots[pid].index)


def make(workers=2, **policy):
    clock = Clock()
    procs = FakeProcesses(clock)
    reloads = []

    def reload_config():
        reloads.append("reload")
        return lambda: reloads.append("undo")

    stops = []
    arbiter = Arbiter(Policy(workers=workers, **policy), procs, sb.SlotPool(workers * 2 + 2),
                      clock=clock, reload_config=reload_config,
                      on_stop=lambda: stops.append(clock()))
    arbiter.reloads_seen = reloads
    arbiter.stops_seen = stops
    return arbiter, procs, clock


def started(workers=2, **policy):
    """An arbiter whose first generation has booted."""
    arbiter, procs, clock = make(workers, **policy)
    arbiter.start()
    for pid in list(arbiter.workers):
        procs.boot(pid)
    arbiter.tick()
    assert arbiter.serving
    return arbiter, procs, clock


def pids(arbiter, generation=None, retiring=None):
    return sorted(w.pid for w in arbiter.workers.values()
                  if (generation is None or w.generation == generation)
                  and (retiring is None or w.retiring == retiring))


def boot_all(arbiter, procs):
    for worker in arbiter.workers.values():
        if not worker.slot.booted:
            procs.boot(worker.pid)


# -- start and boot failures ---------------------------------------------------------

def test_start_spawns_the_workers_numbered_from_one():
    arbiter, procs, _ = make(3)
    arbiter.start()
    assert sorted(procs.numbers.values()) == [1, 2, 3]
    assert not arbiter.serving
    boot_all(arbiter, procs)
    arbiter.tick()
    assert arbiter.serving and arbiter.stopping is None


def test_first_generation_boot_failure_stops_the_server_with_exit_3(caplog):
    arbiter, procs, _ = make(2)
    arbiter.start()
    first, second = pids(arbiter)
    procs.boot(second)
    procs.exit(first, exited(EXIT_WORKER_BOOT))
    arbiter.reap()
    assert arbiter.exit_status == EXIT_WORKER_BOOT
    assert arbiter.stopping == sb.FAST
    assert procs.command(second) == sb.FAST
    assert len(procs.numbers) == 2            # nothing respawned
    assert len([r for r in caplog.records if "stopping the server" in r.getMessage()]) == 1


def test_killed_by_a_signal_before_boot_is_a_boot_failure_too():
    arbiter, procs, _ = make(1)
    arbiter.start()
    (pid,) = pids(arbiter)
    procs.exit(pid, killed(signal.SIGKILL))
    arbiter.reap()
    assert arbiter.exit_status == EXIT_WORKER_BOOT


def test_boot_seen_only_in_the_slot_counts_at_reap():
    # The worker reported ready and died before the master's next tick.
    arbiter, procs, _ = make(1)
    arbiter.start()
    (pid,) = pids(arbiter)
    procs.boot(pid)
    procs.exit(pid, exited(1))
    arbiter.reap()
    assert arbiter.exit_status == EXIT_OK and arbiter.stopping is None
    assert len(arbiter.workers) == 1 and pids(arbiter) != [pid]


# -- deaths after boot ---------------------------------------------------------------

@pytest.mark.parametrize("status", [killed(signal.SIGKILL), killed(signal.SIGABRT),
                                    exited(0), exited(1), exited(EXIT_WORKER_BOOT)])
def test_any_death_after_boot_is_replaced_and_the_rest_carry_on(status):
    arbiter, procs, clock = started(2)
    clock.advance(5)
    victim, other = pids(arbiter)
    procs.exit(victim, status)
    arbiter.reap()
    assert arbiter.stopping is None and arbiter.exit_status == EXIT_OK
    assert victim not in arbiter.workers and other in arbiter.workers
    assert len(arbiter.workers) == 2
    (new,) = set(arbiter.workers) - {other}
    assert procs.numbers[new] == procs.numbers[victim]
    assert arbiter.restarts == 1
    assert procs.command(other) == sb.RUN


def test_two_workers_killed_at_once_are_both_replaced():
    arbiter, procs, clock = started(2)
    clock.advance(5)
    old = pids(arbiter)
    for pid in old:
        procs.exit(pid, killed(signal.SIGKILL))
    arbiter.reap()
    assert len(arbiter.workers) == 2 and not set(old) & set(arbiter.workers)
    assert sorted(procs.numbers[p] for p in arbiter.workers) == [1, 2]
    assert arbiter.stopping is None


def test_replacements_dying_right_after_boot_back_off_1_2_4_up_to_30():
    arbiter, procs, clock = started(1)
    clock.advance(10)
    delays = []
    for _ in range(9):
        (pid,) = pids(arbiter)
        procs.boot(pid)
        arbiter.tick()
        clock.advance(0.1)
        procs.exit(pid, exited(1))
        arbiter.reap()
        waited = 0.0
        while not arbiter.workers:
            clock.advance(0.5)
            waited += 0.5
            arbiter.tick()
            assert waited <= BACKOFF_MAX + 1
        delays.append(waited)
    # The first died after a long life: at once. Then quick deaths: the first of
    # those at once too, the next ones 1, 2, 4 ... (rounded up to the 0.5 s ticks).
    assert delays == [0.0, 0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert arbiter.stopping is None


def test_a_worker_that_lives_resets_the_back_off():
    arbiter, procs, clock = started(1)
    for _ in range(4):
        (pid,) = pids(arbiter)
        procs.boot(pid)
        arbiter.tick()
        clock.advance(0.1)
        procs.exit(pid, exited(1))
        arbiter.reap()
        while not arbiter.workers:
            clock.advance(0.5)
            arbiter.tick()
    (pid,) = pids(arbiter)
    procs.boot(pid)
    arbiter.tick()
    clock.advance(5)
    arbiter.tick()
    procs.exit(pid, exited(1))
    arbiter.reap()
    assert len(arbiter.workers) == 1      # at once again


def test_replacement_that_never_boots_is_retried_with_back_off_not_fatal():
    arbiter, procs, clock = started(2)
    clock.advance(5)
    victim, other = pids(arbiter)
    procs.exit(victim, killed(signal.SIGKILL))
    arbiter.reap()
    waits = []
    for _ in range(4):
        (new,) = set(arbiter.workers) - {other}
        procs.exit(new, exited(EXIT_WORKER_BOOT))
        arbiter.reap()
        assert arbiter.stopping is None and other in arbiter.workers
        waited = 0.0
        while len(arbiter.workers) < 2:
            clock.advance(0.5)
            waited += 0.5
            arbiter.tick()
        waits.append(waited)
    assert waits == [0.0, 1.0, 2.0, 4.0]


def test_fork_failure_is_retried_later():
    arbiter, procs, clock = started(1)
    clock.advance(5)
    (pid,) = pids(arbiter)
    procs.fail_fork = 2
    procs.exit(pid, killed(signal.SIGKILL))
    arbiter.reap()
    assert not arbiter.workers and arbiter.stopping is None
    for _ in range(10):
        clock.advance(0.5)
        arbiter.tick()
    assert len(arbiter.workers) == 1


# -- the watchdog --------------------------------------------------------------------

def test_silent_worker_gets_sigabrt_then_sigkill_and_is_replaced():
    arbiter, procs, clock = started(2, worker_timeout=2)
    stuck, fine = pids(arbiter)
    for _ in range(8):
        clock.advance(0.25)
        procs.beat(fine)
        arbiter.tick()
    assert procs.signals == []                     # exactly 2 s silent: not yet
    clock.advance(0.25)
    procs.beat(fine)
    arbiter.tick()
    assert procs.signals == [(stuck, signal.SIGABRT)]
    clock.advance(ABORT_GRACE)
    procs.beat(fine)
    arbiter.tick()
    assert procs.signals == [(stuck, signal.SIGABRT)]
    clock.advance(0.25)
    procs.beat(fine)
    arbiter.tick()
    assert procs.signals == [(stuck, signal.SIGABRT), (stuck, signal.SIGKILL)]
    arbiter.tick()
    assert len(procs.signals) == 2                  # once each
    procs.exit(stuck, killed(signal.SIGKILL))
    arbiter.reap()
    assert arbiter.stopping is None and fine in arbiter.workers and len(arbiter.workers) == 2
    assert procs.command(fine) == sb.RUN


def test_watchdog_off_with_zero():
    arbiter, procs, clock = started(1, worker_timeout=0)
    clock.advance(3600)
    arbiter.tick()
    assert procs.signals == []


def test_worker_that_never_boots_is_killed_after_the_boot_timeout():
    arbiter, procs, clock = make(1, worker_timeout=2)
    arbiter.start()
    (pid,) = pids(arbiter)
    clock.advance(BOOT_TIMEOUT_FLOOR)
    arbiter.tick()
    assert procs.signals == []
    clock.advance(1)
    arbiter.tick()
    assert procs.signals == [(pid, signal.SIGKILL)]


# -- reloads -------------------------------------------------------------------------

def test_reload_keeps_the_old_generation_until_the_new_one_is_ready():
    arbiter, procs, clock = started(2)
    old = pids(arbiter)
    arbiter.request_reload()
    assert arbiter.reloads_seen == ["reload"]
    new = pids(arbiter, generation=2)
    assert len(new) == 2
    arbiter.tick()
    assert [procs.command(p) for p in old] == [sb.RUN, sb.RUN]
    procs.boot(new[0])
    arbiter.tick()
    assert [procs.command(p) for p in old] == [sb.RUN, sb.RUN]
    procs.boot(new[1])
    arbiter.tick()
    assert [procs.command(p) for p in old] == [sb.GRACEFUL, sb.GRACEFUL]
    assert [procs.command(p) for p in new] == [sb.RUN, sb.RUN]
    assert arbiter.generation == 2 and arbiter.reloading is None
    for pid in old:
        procs.exit(pid, exited(0))
    arbiter.reap()
    assert pids(arbiter) == new


def test_reload_whose_new_worker_fails_to_boot_keeps_the_old_generation():
    arbiter, procs, clock = started(2)
    old = pids(arbiter)
    arbiter.request_reload()
    new = pids(arbiter, generation=2)
    procs.boot(new[0])
    arbiter.tick()
    procs.exit(new[1], exited(EXIT_WORKER_BOOT))
    arbiter.reap()
    assert arbiter.stopping is None and arbiter.exit_status == EXIT_OK
    assert arbiter.reloads_seen == ["reload", "undo"]
    assert [procs.command(p) for p in old] == [sb.RUN, sb.RUN]
    # The booted one of the failed generation drains; nothing new is started.
    assert procs.command(new[0]) == sb.GRACEFUL
    assert arbiter.failed_reloads == 1 and arbiter.generation == 1
    procs.exit(new[0], exited(0))
    arbiter.reap()
    clock.advance(60)
    arbiter.tick()
    assert pids(arbiter) == old
    # And the next HUP is a fresh try.
    arbiter.request_reload()
    assert len(pids(arbiter, generation=2)) == 2


def test_unbooted_workers_of_a_failed_reload_are_killed():
    arbiter, procs, clock = started(3)
    arbiter.request_reload()
    new = pids(arbiter, generation=2)
    procs.exit(new[0], exited(EXIT_WORKER_BOOT))
    arbiter.reap()
    assert sorted(procs.signals) == [(new[1], signal.SIGKILL), (new[2], signal.SIGKILL)]


def test_hups_during_a_reload_coalesce_into_one_more():
    arbiter, procs, clock = started(2)
    arbiter.request_reload()
    for _ in range(9):
        arbiter.request_reload()
    assert arbiter.reloads_seen == ["reload"]
    assert len(arbiter.workers) == 4
    boot_all(arbiter, procs)
    arbiter.tick()
    # One follow-up reload for the nine, reading the configuration again.
    assert arbiter.reloads_seen == ["reload", "reload"]
    assert len(pids(arbiter, generation=3)) == 2
    boot_all(arbiter, procs)
    arbiter.tick()
    assert arbiter.reloading is None and arbiter.generation == 3
    assert len(pids(arbiter, retiring=True)) == 4
    assert len(pids(arbiter, retiring=False)) == 2


def test_hup_storm_never_runs_out_of_slots():
    # 50 reloads, each generation still draining its sessions: the pool grows.
    arbiter, procs, clock = started(4)
    for _ in range(50):
        arbiter.request_reload()
        boot_all(arbiter, procs)
        arbiter.tick()
        clock.advance(0.5)
    assert arbiter.stopping is None
    assert len(arbiter.workers) == 4 * 51
    assert arbiter.slots.in_use == 4 * 51
    slots = {(id(w.slot.board), w.slot.index) for w in arbiter.workers.values()}
    assert len(slots) == 4 * 51                 # no slot shared
    assert len(pids(arbiter, retiring=False)) == 4


def test_slots_are_reused_after_workers_exit():
    arbiter, procs, clock = started(2)
    for _ in range(20):
        old = pids(arbiter)
        arbiter.request_reload()
        boot_all(arbiter, procs)
        arbiter.tick()
        for pid in old:
            procs.exit(pid, exited(0))
        arbiter.reap()
    assert len(arbiter.slots.regions) == 1


def test_draining_worker_past_its_deadline_is_killed():
    arbiter, procs, clock = started(1, graceful_timeout=5)
    (old,) = pids(arbiter)
    arbiter.request_reload()
    boot_all(arbiter, procs)
    arbiter.tick()
    assert procs.command(old) == sb.GRACEFUL
    clock.advance(5 + EXTRA_STOP_TIME)
    procs.beat(old)
    arbiter.tick()
    assert (old, signal.SIGKILL) not in procs.signals
    clock.advance(0.5)
    procs.beat(old)
    arbiter.tick()
    assert (old, signal.SIGKILL) in procs.signals


def test_old_worker_dying_during_a_reload_is_replaced_by_the_reload():
    arbiter, procs, clock = started(2)
    clock.advance(5)
    old = pids(arbiter)
    arbiter.request_reload()
    procs.exit(old[0], killed(signal.SIGKILL))
    arbiter.reap()
    arbiter.tick()
    # No old-generation fork while the new generation boots ...
    assert pids(arbiter, generation=1) == [old[1]] and len(arbiter.workers) == 3
    boot_all(arbiter, procs)
    arbiter.tick()
    clock.advance(5)
    arbiter.tick()
    # ... and once it serves, the old worker's place is not refilled.
    assert len(pids(arbiter, retiring=False)) == 2


def test_old_worker_dying_during_a_failed_reload_is_replaced_afterwards():
    arbiter, procs, clock = started(2)
    clock.advance(5)
    old = pids(arbiter)
    arbiter.request_reload()
    procs.exit(old[0], killed(signal.SIGKILL))
    arbiter.reap()
    new = pids(arbiter, generation=2)
    for pid in new:
        procs.exit(pid, exited(EXIT_WORKER_BOOT))
    arbiter.reap()
    arbiter.tick()
    assert arbiter.reloads_seen == ["reload", "undo"]
    assert len(pids(arbiter, generation=1, retiring=False)) == 2


# -- stopping ------------------------------------------------------------------------

def test_term_drains_then_kills_what_is_left_after_the_deadline():
    arbiter, procs, clock = started(2, graceful_timeout=3)
    arbiter.stop(sb.GRACEFUL)
    assert arbiter.stops_seen == [clock()]
    assert [procs.command(p) for p in pids(arbiter)] == [sb.GRACEFUL, sb.GRACEFUL]
    clock.advance(3 + EXTRA_STOP_TIME + 0.1)
    arbiter.tick()
    assert sorted(s for _, s in procs.signals) == [signal.SIGKILL, signal.SIGKILL]
    for pid in pids(arbiter):
        procs.exit(pid, killed(signal.SIGKILL))
    arbiter.reap()
    assert arbiter.stopped and arbiter.exit_status == EXIT_OK


def test_hup_during_terms_drain_is_ignored():
    arbiter, procs, clock = started(2)
    arbiter.stop(sb.GRACEFUL)
    arbiter.request_reload()
    assert arbiter.reloads_seen == [] and len(arbiter.workers) == 2


def test_term_during_a_reload_stops_both_generations_and_forks_nothing_more():
    arbiter, procs, clock = started(2)
    arbiter.request_reload()
    arbiter.request_reload()            # a pending one too
    arbiter.stop(sb.GRACEFUL)
    assert [procs.command(p) for p in pids(arbiter)] == [sb.GRACEFUL] * 4
    forked = len(procs.numbers)
    boot_all(arbiter, procs)
    for _ in range(4):
        arbiter.tick()
    for pid in pids(arbiter):
        procs.exit(pid, exited(0))
    arbiter.reap()
    arbiter.tick()
    assert len(procs.numbers) == forked and arbiter.stopped
    assert arbiter.exit_status == EXIT_OK


def test_deaths_while_stopping_are_not_replaced():
    arbiter, procs, clock = started(2)
    arbiter.stop(sb.FAST)
    procs.exit(pids(arbiter)[0], killed(signal.SIGKILL))
    arbiter.reap()
    assert len(arbiter.workers) == 1 and len(procs.numbers) == 2


def test_stop_only_escalates():
    arbiter, procs, clock = started(1)
    arbiter.stop(sb.FAST)
    arbiter.stop(sb.GRACEFUL)
    assert arbiter.stopping == sb.FAST
    assert arbiter.stops_seen == [clock()]


# -- --run-once, --timeout, --idle-timeout --------------------------------------------

def test_timeout_drains_at_the_deadline_from_start():
    arbiter, procs, clock = started(1, timeout=2)
    clock.advance(1.9)
    arbiter.tick()
    assert arbiter.stopping is None
    clock.advance(0.1)
    arbiter.tick()
    assert arbiter.stopping == sb.DRAIN


def test_idle_timeout_counts_from_the_last_open_session():
    arbiter, procs, clock = started(1, idle_timeout=5)
    (pid,) = pids(arbiter)
    clock.advance(4)
    procs.beat(pid, live=1)
    arbiter.tick()
    procs.beat(pid, live=0)
    clock.advance(4.9)
    arbiter.tick()
    assert arbiter.stopping is None
    clock.advance(0.1)
    arbiter.tick()
    assert arbiter.stopping == sb.GRACEFUL


def test_run_once_stops_after_the_first_session():
    arbiter, procs, clock = started(1, run_once=True)
    (pid,) = pids(arbiter)
    arbiter.tick()
    assert arbiter.stopping is None
    procs.beat(pid, done=1)
    arbiter.tick()
    assert arbiter.stopping == sb.GRACEFUL


# -- the slot pool -------------------------------------------------------------------

def test_slot_pool_grows_by_regions_and_reuses_freed_slots():
    pool = sb.SlotPool(2)
    slots = [pool.allocate() for _ in range(5)]
    assert len(pool.regions) == 3 and pool.in_use == 5
    assert [s.index for s in slots] == [0, 1, 0, 1, 0]
    pool.release(slots[1])
    again = pool.allocate()
    assert again is slots[1] and len(pool.regions) == 3
    # A reused slot starts clean.
    slots[0].board.mark_booted(0)
    slots[0].board.report(0, 3, 7)
    pool.release(slots[0])
    _, live, done, booted, command = pool.allocate().read()
    assert (live, done, booted, command) == (0, 0, 0, sb.RUN)


def test_a_heartbeat_read_as_zero_counts_from_the_boot_not_from_1970():
    arbiter, procs, clock = started(1, worker_timeout=2)
    (pid,) = pids(arbiter)
    worker = arbiter.workers[pid]
    worker.slot.board.report(worker.slot.index, 0, 0, now=0.0)
    arbiter.tick()
    assert procs.signals == []                 # booted just now: not silent for 56 years
    clock.advance(2.25)
    arbiter.tick()
    assert procs.signals == [(pid, signal.SIGABRT)]   # still silent past the timeout: aborted
