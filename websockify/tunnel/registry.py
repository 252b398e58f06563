"""Which worker holds which agent: entries in shared memory every worker reads.

The master maps the region before it forks (as arbiter/scoreboard.py) and
writes one entry per configured agent ID; a worker that accepts an agent's
WebSocket claims the entry (its pid), publishes the link's figures there
for the status page, and clears it when the link ends.  A worker that
accepts a user for an agent looks the holder up here and hands the user to
it (tunnel/handoff.py).  The master clears the entries of a worker that
died, and marks the entries of agents a reload removed, which their holders
then close.

Every field is one aligned 8-byte word (or a byte string only its writer
changes), so readers never need a lock; claims, which must not race (two
WebSockets of one agent arriving at two workers at once), take an flock on
a file in the master's private directory.
"""

import fcntl
import mmap
import os
import struct
import time
from typing import Dict, Iterable, List, Optional, Tuple

# state, holder pid, holder worker number, link serial, connected since,
# connects, open streams, bytes to the agent, bytes from the agent, token expiry,
# id length, peer length, id, peer, HTTP viewers now, HTTP requests served
_ENTRY = struct.Struct("<qqqqdqqqqdqq128s64sqq")
ENTRY_SIZE = _ENTRY.size
_HEADER = struct.Struct("<qq")          # version (bumped by the master), entries used
_HEADER_SIZE = 64
#: In the header: 1 while the cluster registry (Redis) is unreachable.
_REGISTRY_DOWN_OFFSET = 16

FREE = 0
CONFIGURED = 1
REMOVED = 2
#: Made by a worker for an ID that registered without a config entry (``open = true``).
OPEN = 3
_SERVED = (CONFIGURED, OPEN)

_STATE, _PID, _WORKER, _SERIAL, _SINCE, _CONNECTS, _STREAMS, _OUT, _IN, _EXPIRY = range(10)
# Words after the two strings (12 words + 192 bytes in).
_VIEWERS, _REQUESTS = 36, 37
_PEER_OFFSET = 12 * 8 + 128
_FLOAT_FIELDS = (_SINCE, _EXPIRY)
MAX_ID = 128
MAX_PEER = 64


class Claim:
    """What claiming an entry found: whether it is ours now, and who held it."""

    __slots__ = ("taken", "serial", "previous_pid", "previous_peer")

    def __init__(self, taken: bool, serial: int, previous_pid: int, previous_peer: str):
        self.taken = taken
        self.serial = serial
        self.previous_pid = previous_pid
        self.previous_peer = previous_peer


class Registry:
    """Agent ID -> holding worker, in a region shared by the master and its workers."""

    def __init__(self, capacity: int, lock_path: Optional[str] = None):
        self.capacity = max(1, capacity)
        self._map = mmap.mmap(-1, _HEADER_SIZE + ENTRY_SIZE * self.capacity)
        self.lock_path = lock_path
        self._lock_fd = -1
        self._lock_pid = 0
        self._index: Dict[str, int] = {}
        self._version = -1

    # -- raw access --------------------------------------------------------

    def _offset(self, index: int, field: int = 0) -> int:
        return _HEADER_SIZE + index * ENTRY_SIZE + field * 8

    def _get(self, index: int, field: int):
        fmt = "<d" if field in _FLOAT_FIELDS else "<q"
        return struct.unpack_from(fmt, self._map, self._offset(index, field))[0]

    def _set(self, index: int, field: int, value) -> None:
        fmt = "<d" if field in _FLOAT_FIELDS else "<q"
        struct.pack_into(fmt, self._map, self._offset(index, field), value)

    def _header(self) -> Tuple[int, int]:
        return _HEADER.unpack_from(self._map, 0)

    def _entry(self, index: int) -> tuple:
        return _ENTRY.unpack_from(self._map, self._offset(index))

    def _entry_id(self, index: int) -> str:
        fields = self._entry(index)
        return fields[12][:fields[10]].decode("utf-8")

    # -- the master ----------------------------------------------------------

    def configure(self, agent_ids: Iterable[str], keep_open: bool = False) -> List[str]:
        """Make the configured IDs exactly ``agent_ids``; returns those that did not fit.

        An ID kept keeps its entry (holder, counters); a removed one is
        marked REMOVED, so its holder closes the link; a new one takes a free
        or released entry.  Openly registered IDs stay while ``keep_open``.
        """
        wanted = list(dict.fromkeys(agent_ids))
        fd = self._lock()
        try:
            return self._configure(wanted, keep_open)
        finally:
            self._unlock(fd)

    def _configure(self, wanted: List[str], keep_open: bool) -> List[str]:
        version, used = self._header()
        known = {}
        for index in range(used):
            if self._get(index, _STATE) != FREE:
                known[self._entry_id(index)] = index
        for agent_id, index in known.items():
            if agent_id not in wanted and not (keep_open and
                                               self._get(index, _STATE) == OPEN):
                self._set(index, _STATE, REMOVED)
        left_out = []
        for agent_id in wanted:
            index = known.get(agent_id)
            if index is None:
                index = self._free_entry(used)
                if index is None:
                    left_out.append(agent_id)
                    continue
                used = max(used, index + 1)
                self._new_entry(index, agent_id, FREE, 0.0)
            self._set(index, _STATE, CONFIGURED)
        _HEADER.pack_into(self._map, 0, version + 1, used)
        return left_out

    def _free_entry(self, used: int) -> Optional[int]:
        """A free or released entry; when none is left, the openly registered
        entry whose agent left longest ago (its ID becomes unknown again)."""
        recyclable, since = None, None
        for index in range(used):
            state = self._get(index, _STATE)
            if state == FREE or (state == REMOVED and not self._get(index, _PID)):
                return index
            if state == OPEN and not self._get(index, _PID):
                left = self._get(index, _SINCE)
                if since is None or left < since:
                    recyclable, since = index, left
        if used < self.capacity:
            return used
        return recyclable

    def register_open(self, agent_id: str) -> bool:
        """Make an entry for an ID with no config entry (``open = true``); False when full.

        A worker calls it after the agent's token verified, so only holders
        of a valid token make entries.
        """
        fd = self._lock()
        try:
            index = self.index_of(agent_id)
            if index is not None and self._get(index, _STATE) in _SERVED:
                return True
            version, used = self._header()
            if index is not None:
                # Removed from the file, perhaps still held: it stays that link's
                # entry (a new claim replaces the link as for any duplicate).
                self._set(index, _STATE, OPEN)
            else:
                index = self._free_entry(used)
                if index is None:
                    return False
                self._new_entry(index, agent_id, OPEN, time.time())
            _HEADER.pack_into(self._map, 0, version + 1, max(used, index + 1))
            return True
        finally:
            self._unlock(fd)

    def _new_entry(self, index: int, agent_id: str, state: int, since: float) -> None:
        """Entry ``index`` made afresh for ``agent_id``: no holder, no figures."""
        raw = agent_id.encode("utf-8")[:MAX_ID]
        _ENTRY.pack_into(self._map, self._offset(index), state, 0, 0, 0, since, 0, 0, 0, 0,
                         0.0, len(raw), 0, raw, b"", 0, 0)

    def is_open(self, agent_id: str) -> bool:
        """Whether ``agent_id`` registered openly (has an OPEN entry)."""
        index = self.index_of(agent_id)
        return index is not None and self._get(index, _STATE) == OPEN

    def worker_exited(self, pid: int) -> List[str]:
        """Clear the entries a dead worker held; returns their IDs."""
        cleared = []
        for index in range(self._header()[1]):
            if self._get(index, _PID) == pid:
                self._clear(index)
                cleared.append(self._entry_id(index))
        return cleared

    def _clear(self, index: int) -> None:
        if self._get(index, _STATE) == OPEN:
            self._set(index, _SINCE, time.time())      # when it left: the recycling order
        self._set(index, _PID, 0)
        self._set(index, _WORKER, 0)
        self._set(index, _STREAMS, 0)

    # -- workers ---------------------------------------------------------------

    def index_of(self, agent_id: str) -> Optional[int]:
        version = self._header()[0]
        if version != self._version:
            used = self._header()[1]
            self._index = {self._entry_id(i): i for i in range(used)
                           if self._get(i, _STATE) != FREE}
            self._version = version
        return self._index.get(agent_id)

    def configured(self, agent_id: str) -> bool:
        index = self.index_of(agent_id)
        return index is not None and self._get(index, _STATE) == CONFIGURED

    def known(self, agent_id: str) -> bool:
        """Configured, or registered openly."""
        index = self.index_of(agent_id)
        return index is not None and self._get(index, _STATE) in _SERVED

    def removed(self, agent_id: str) -> bool:
        index = self.index_of(agent_id)
        return index is None or self._get(index, _STATE) not in _SERVED

    def holder(self, agent_id: str) -> int:
        """The pid of the worker holding ``agent_id``'s link, 0 for none."""
        index = self.index_of(agent_id)
        if index is None:
            return 0
        return self._get(index, _PID)

    def holder_peer(self, agent_id: str) -> str:
        index = self.index_of(agent_id)
        if index is None:
            return ""
        fields = self._entry(index)
        return fields[13][:fields[11]].decode("utf-8", "replace")

    def serial(self, agent_id: str) -> int:
        index = self.index_of(agent_id)
        return 0 if index is None else self._get(index, _SERIAL)

    def _lock(self) -> int:
        # Opened after fork: an flock shared through an inherited descriptor
        # would not exclude anyone.
        if self.lock_path is None:
            return -1
        if self._lock_pid != os.getpid():
            self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._lock_pid = os.getpid()
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        return self._lock_fd

    def _unlock(self, fd: int) -> None:
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def claim(self, agent_id: str, pid: int, worker: int, peer: str, expiry: float,
              refuse: bool, now: Optional[float] = None) -> Claim:
        """Take ``agent_id``'s entry for a new link (unless ``refuse`` and it is held)."""
        index = self.index_of(agent_id)
        if index is None or self._get(index, _STATE) not in _SERVED:
            return Claim(False, 0, 0, "")
        fd = self._lock()
        try:
            if self._entry_id(index) != agent_id or self._get(index, _STATE) not in _SERVED:
                return Claim(False, 0, 0, "")      # recycled for another ID meanwhile
            previous = self._get(index, _PID)
            previous_peer = self.holder_peer(agent_id) if previous else ""
            if previous and refuse:
                return Claim(False, 0, previous, previous_peer)
            serial = self._get(index, _SERIAL) + 1
            raw_peer = peer.encode("utf-8")[:MAX_PEER]
            struct.pack_into("<q", self._map, self._offset(index, 11), len(raw_peer))
            struct.pack_into("64s", self._map, self._offset(index) + _PEER_OFFSET, raw_peer)
            self._set(index, _SERIAL, serial)
            self._set(index, _SINCE, time.time() if now is None else now)
            self._set(index, _CONNECTS, self._get(index, _CONNECTS) + 1)
            self._set(index, _STREAMS, 0)
            self._set(index, _EXPIRY, expiry)
            self._set(index, _WORKER, worker)
            self._set(index, _PID, pid)
            return Claim(True, serial, previous, previous_peer)
        finally:
            self._unlock(fd)

    def release(self, agent_id: str, pid: int, serial: int) -> bool:
        """Clear the entry if it is still this link's (a replacement may own it now)."""
        index = self.index_of(agent_id)
        if index is None:
            return False
        fd = self._lock()
        try:
            if self._get(index, _PID) != pid or self._get(index, _SERIAL) != serial:
                return False
            self._clear(index)
            return True
        finally:
            self._unlock(fd)

    def note_registry(self, down: bool) -> bool:
        """Record whether Redis answers; True for the one caller that changed it (who logs)."""
        if self.registry_down() == down:
            return False
        fd = self._lock()
        try:
            if self.registry_down() == down:
                return False
            struct.pack_into("<q", self._map, _REGISTRY_DOWN_OFFSET, 1 if down else 0)
            return True
        finally:
            self._unlock(fd)

    def registry_down(self) -> bool:
        return struct.unpack_from("<q", self._map, _REGISTRY_DOWN_OFFSET)[0] == 1

    def publish(self, agent_id: str, serial: int, streams: int, bytes_out: int,
                bytes_in: int) -> None:
        """The link's figures, for the status page (written by the holder only)."""
        index = self.index_of(agent_id)
        if index is None or self._get(index, _SERIAL) != serial:
            return
        self._set(index, _STREAMS, streams)
        self._set(index, _OUT, bytes_out)
        self._set(index, _IN, bytes_in)

    def add_viewers(self, counts: Dict[str, tuple]) -> None:
        """Add HTTP viewers' figures, ID -> (viewers opened minus closed, requests served);
        any worker may, so under the lock."""
        fd = self._lock()
        try:
            for agent_id, (viewers, requests) in counts.items():
                index = self.index_of(agent_id)
                if index is None:
                    continue
                self._set(index, _VIEWERS, max(0, self._get(index, _VIEWERS) + viewers))
                self._set(index, _REQUESTS, self._get(index, _REQUESTS) + requests)
        finally:
            self._unlock(fd)

    def snapshot(self) -> List[dict]:
        """Every configured or open agent's entry as plain values (the status page's input)."""
        rows = []
        for index in range(self._header()[1]):
            fields = self._entry(index)
            if fields[_STATE] not in _SERVED:
                continue
            rows.append({
                "id": fields[12][:fields[10]].decode("utf-8"),
                "open": fields[_STATE] == OPEN,
                "connected": bool(fields[_PID]),
                "worker_pid": fields[_PID],
                "worker": fields[_WORKER],
                "peer": fields[13][:fields[11]].decode("utf-8", "replace") if fields[_PID]
                else None,
                "connected_since": fields[_SINCE] if fields[_PID] else None,
                "connects": fields[_CONNECTS],
                "open_streams": fields[_STREAMS] if fields[_PID] else 0,
                "bytes_to_agent": fields[_OUT],
                "bytes_from_agent": fields[_IN],
                "token_expires": fields[_EXPIRY] if fields[_PID] and fields[_EXPIRY] else None,
                "viewers": fields[14],
                "requests": fields[15],
            })
        return rows
