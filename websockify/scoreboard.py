"""Per-worker counters in shared memory: how workers report to the master.

The master maps an anonymous shared region before forking; each worker
writes only its own slot, the master reads them all and writes the command
field.  No locks: every field is one aligned 8-byte word.
"""

import mmap
import struct
import time

_SLOT = struct.Struct("<qdqqqqq")   # pid, heartbeat, live, connections, done, booted, command
SLOT_SIZE = _SLOT.size

# Commands from the master, in increasing urgency.
RUN = 0
DRAIN = 1       # stop accepting, let sessions end on their own (--timeout)
GRACEFUL = 2    # stop accepting, close what is left after --graceful-timeout
FAST = 3        # close every session now (SIGQUIT)

_PID, _HEARTBEAT, _LIVE, _CONNECTIONS, _DONE, _BOOTED, _COMMAND = range(7)


class Scoreboard:
    def __init__(self, slots: int):
        self.slots = slots
        self._map = mmap.mmap(-1, max(SLOT_SIZE * slots, mmap.PAGESIZE))

    def _offset(self, slot: int, field: int) -> int:
        return slot * SLOT_SIZE + field * 8

    def _get(self, slot: int, field: int):
        fmt = "<d" if field == _HEARTBEAT else "<q"
        return struct.unpack_from(fmt, self._map, self._offset(slot, field))[0]

    def _set(self, slot: int, field: int, value) -> None:
        fmt = "<d" if field == _HEARTBEAT else "<q"
        struct.pack_into(fmt, self._map, self._offset(slot, field), value)

    # -- master side ----------------------------------------------------
    def reset(self, slot: int) -> None:
        _SLOT.pack_into(self._map, slot * SLOT_SIZE, 0, time.time(), 0, 0, 0, 0, RUN)

    def command(self, slot: int, command: int) -> None:
        if command > self._get(slot, _COMMAND):
            self._set(slot, _COMMAND, command)

    def read(self, slot: int) -> tuple:
        """(pid, heartbeat, live, connections, done, booted, command)"""
        return _SLOT.unpack_from(self._map, slot * SLOT_SIZE)

    # -- worker side ----------------------------------------------------
    def report(self, slot: int, live: int, connections: int, done: int) -> None:
        self._set(slot, _HEARTBEAT, time.time())
        self._set(slot, _LIVE, live)
        self._set(slot, _CONNECTIONS, connections)
        self._set(slot, _DONE, done)

    def mark_booted(self, slot: int, pid: int) -> None:
        self._set(slot, _PID, pid)
        self._set(slot, _BOOTED, 1)

    def pending_command(self, slot: int) -> int:
        return self._get(slot, _COMMAND)
