"""Per-worker counters in shared memory: how workers report to the master.

The master maps anonymous shared regions before forking; each worker
writes only its own slot, the master reads them all and writes the command
field.  No locks: every field is one aligned 8-byte word.

Slots come from a ``SlotPool``: a free list over regions of a fixed size,
grown by one more region when every slot is taken.  A worker keeps the
region it was forked with (it inherited that mapping); a region added later
only reaches the workers forked after it.  So however many generations of
workers drain side by side after reloads, the master never runs out of
bookkeeping.

Beside the slots each region holds one block of --metrics counters per slot
(metrics/counters.py), written by the slot's worker only; when a slot is
released its block is folded into the pool's ``totals`` first, so what a
dead worker counted is never lost.
"""

import mmap
import struct
import time
from typing import Iterator, List, Optional, Tuple

from websockify.metrics import counters

_SLOT = struct.Struct("<dqqqq")   # heartbeat, live, done, booted, command
SLOT_SIZE = _SLOT.size

# Commands from the master, in increasing urgency.
RUN = 0
DRAIN = 1       # stop accepting, let sessions end on their own (--timeout)
GRACEFUL = 2    # stop accepting, close what is left after --graceful-timeout
FAST = 3        # close every session now (SIGQUIT)

_HEARTBEAT, _LIVE, _DONE, _BOOTED, _COMMAND = range(5)


class Scoreboard:
    """One shared region of ``slots`` slots."""

    def __init__(self, slots: int):
        self.slots = slots
        self._map = mmap.mmap(-1, max(SLOT_SIZE * slots, mmap.PAGESIZE))
        self._counters = mmap.mmap(-1, max(counters.BLOCK_SIZE * slots, mmap.PAGESIZE))

    def _offset(self, slot: int, field: int) -> int:
        return slot * SLOT_SIZE + field * 8

    def _get(self, slot: int, field: int):
        fmt = "<d" if field == _HEARTBEAT else "<q"
        return struct.unpack_from(fmt, self._map, self._offset(slot, field))[0]

    def _set(self, slot: int, field: int, value) -> None:
        fmt = "<d" if field == _HEARTBEAT else "<q"
        struct.pack_into(fmt, self._map, self._offset(slot, field), value)

    # -- master side ----------------------------------------------------
    def reset(self, slot: int, now: Optional[float] = None) -> None:
        _SLOT.pack_into(self._map, slot * SLOT_SIZE,
                        time.time() if now is None else now, 0, 0, 0, RUN)

    def counters(self, slot: int) -> memoryview:
        """The slot's --metrics block, as 8-byte signed words."""
        start = slot * counters.BLOCK_SIZE
        return memoryview(self._counters)[start:start + counters.BLOCK_SIZE].cast("q")

    def clear_counters(self, slot: int) -> None:
        start = slot * counters.BLOCK_SIZE
        self._counters[start:start + counters.BLOCK_SIZE] = bytes(counters.BLOCK_SIZE)

    def command(self, slot: int, command: int) -> None:
        if command > self._get(slot, _COMMAND):
            self._set(slot, _COMMAND, command)

    def read(self, slot: int) -> tuple:
        """(heartbeat, live, done, booted, command)"""
        return _SLOT.unpack_from(self._map, slot * SLOT_SIZE)

    # -- worker side ----------------------------------------------------
    def report(self, slot: int, live: int, done: int, now: Optional[float] = None) -> None:
        """Heartbeat, open sessions and sessions done so far."""
        self._set(slot, _HEARTBEAT, time.time() if now is None else now)
        self._set(slot, _LIVE, live)
        self._set(slot, _DONE, done)

    def mark_booted(self, slot: int) -> None:
        self._set(slot, _BOOTED, 1)

    def pending_command(self, slot: int) -> int:
        return self._get(slot, _COMMAND)


class Slot:
    """One worker's place: a region and an index in it."""

    __slots__ = ("board", "index", "token_plugin")

    def __init__(self, board: Scoreboard, index: int):
        self.board = board
        self.index = index
        #: The token plugin the slot's worker was started with (its lookups' label).
        self.token_plugin = ""

    def counters(self) -> memoryview:
        return self.board.counters(self.index)

    def read(self) -> tuple:
        return self.board.read(self.index)

    def command(self, command: int) -> None:
        self.board.command(self.index, command)

    @property
    def booted(self) -> bool:
        return bool(self.board._get(self.index, _BOOTED))

    @property
    def heartbeat(self) -> float:
        return self.board._get(self.index, _HEARTBEAT)

    @property
    def live(self) -> int:
        return self.board._get(self.index, _LIVE)

    @property
    def done(self) -> int:
        return self.board._get(self.index, _DONE)


class SlotPool:
    """Free slots over as many regions as the workers alive at once need."""

    def __init__(self, region_slots: int):
        self.region_slots = max(1, region_slots)
        self.regions: List[Scoreboard] = []
        self._free: List[Slot] = []
        self._used: List[Slot] = []
        #: What released slots' workers counted (--metrics).
        self.totals = counters.Totals()

    def allocate(self, now: Optional[float] = None) -> Slot:
        if not self._free:
            board = Scoreboard(self.region_slots)
            self.regions.append(board)
            # Reversed, so that pop() hands out index 0 first.
            self._free.extend(Slot(board, index) for index in reversed(range(board.slots)))
        slot = self._free.pop()
        slot.board.reset(slot.index, now)
        slot.board.clear_counters(slot.index)
        slot.token_plugin = ""
        self._used.append(slot)
        return slot

    def release(self, slot: Slot) -> None:
        self.totals.fold(slot.counters(), slot.token_plugin)
        slot.board.clear_counters(slot.index)
        self._used.remove(slot)
        self._free.append(slot)

    def live_counters(self) -> Iterator[Tuple[str, memoryview]]:
        """(token plugin, counters) of every slot in use."""
        for slot in self._used:
            yield slot.token_plugin, slot.counters()

    @property
    def capacity(self) -> int:
        return len(self.regions) * self.region_slots

    @property
    def in_use(self) -> int:
        return self.capacity - len(self._free)
