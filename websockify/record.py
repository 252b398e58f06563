"""--record FILE: each session written to ``FILE.<n>`` in noVNC's playback format.

The file is a JavaScript array that noVNC's playback page loads::

    var VNC_frame_data = [
    '{<ms>{<bytes sent to the client>',
    '}<ms>}<bytes received from the client>',
    'EOF'];

``<ms>`` counts milliseconds since the session started; the bytes are the
payload (what the target sent, what the client's frames carried once
unmasked or base64-decoded), escaped for a single-quoted JavaScript string:
printable ASCII as is, ``\\`` and ``'`` backslashed, ``\\t \\n \\r``, every
other byte ``\\xNN``.

Writing never happens on the event loop per chunk: a session appends its
entries to an in-memory buffer and hands it to one native writer thread per
worker, which does the blocking writes, when it holds 64 KiB or when an
entry comes a second after the last hand-off (and at the session's end).
When that thread falls more than MAX_BEHIND bytes behind (a slow or stuck
disk), the session handing over more stops recording, with one log line,
and its file is ended with the footer so it still plays up to that point.
"""

import _queue
import codecs
import errno
import logging
import os
import stat
import time
from typing import Optional

from websockify.errors import ConfigError

log = logging.getLogger("websockify")

HEADER = b"var VNC_frame_data = [\n"
FOOTER = b"'EOF'];\n"
HANDOFF_BYTES = 64 * 1024     # a session's buffer is handed to the writer at this size
HANDOFF_SECONDS = 1.0         # ... or when its oldest entry is this old
MAX_BEHIND = 32 * 1024 * 1024  # bytes the writer may owe, per worker, before we drop
FILE_MODE = 0o600             # recordings hold everything typed, passwords included

# bytes -> the body of a single-quoted JavaScript string.  The C codec behind
# bytes' repr escapes exactly what the format needs (``'`` included, ``"``
# not), in one pass.
_escape = codecs.escape_encode


def check_destination(prefix: str) -> None:
    """Refuse at start a --record prefix whose directory cannot take files."""
    directory = os.path.dirname(prefix) or "."
    try:
        is_dir = stat.S_ISDIR(os.stat(directory).st_mode)
    except FileNotFoundError:
        raise ConfigError("--record %s: directory %s does not exist"
                          % (prefix, directory)) from None
    except OSError as exc:       # a path component that is a file, no search right...
        raise ConfigError("--record %s: directory %s: %s"
                          % (prefix, directory, exc.strerror or exc)) from None
    if not is_dir:
        raise ConfigError("--record %s: %s is not a directory" % (prefix, directory))
    # access(2) also reports a read-only file system; root passes its
    # permission checks, as it would when creating the files.
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError("--record %s: directory %s is not writable" % (prefix, directory))


def _native_start_new_thread():
    """The real thread starter, even after gevent's monkey patching.

    Workers run ``monkey.patch_all()``, which makes ``threading`` and
    ``_thread`` start greenlets; a greenlet doing a blocking write would
    stall the whole worker.  ``get_original`` returns the function from
    before patching (or the current one when nothing was patched).
    """
    try:
        from gevent.monkey import get_original
        return get_original("_thread", "start_new_thread")
    except ImportError:  # pragma: no cover - gevent is a dependency
        import _thread
        return _thread.start_new_thread


class DiskWriter:
    """One native thread per process doing the blocking writes of recordings.

    Jobs go through the C ``_queue.SimpleQueue`` (gevent patches
    ``queue.SimpleQueue``, not the C type), so ``put`` never blocks the loop
    and ``get`` blocks the writer thread only.  The counters are each
    written by one side only (``handed*`` by the loop, ``written*`` by the
    thread), so no lock is needed to read how far behind the thread is.
    """

    def __init__(self):
        self.jobs = _queue.SimpleQueue()
        self.handed_bytes = 0
        self.handed_jobs = 0
        self.written_bytes = 0
        self.written_jobs = 0
        self.thread_id: Optional[int] = None     # native id, set by the thread
        self.pid = os.getpid()
        _native_start_new_thread()(self._run, ())

    @property
    def behind(self) -> int:
        """Bytes handed over and not written yet."""
        return self.handed_bytes - self.written_bytes

    @property
    def idle(self) -> bool:
        return self.written_jobs >= self.handed_jobs

    def write(self, recording: "SessionRecording", data: bytes) -> None:
        self.handed_bytes += len(data)
        self.handed_jobs += 1
        self.jobs.put((recording, data))

    def close(self, recording: "SessionRecording") -> None:
        self.handed_jobs += 1
        self.jobs.put((recording, None))

    def _run(self) -> None:
        import threading
        self.thread_id = threading.get_native_id()
        while True:
            recording, data = self.jobs.get()
            try:
                if data is None:
                    os.close(recording.fd)
                elif recording.error is None:
                    self._write_all(recording.fd, data)
            except OSError as exc:
                # Logging from this thread is not safe under gevent; the
                # loop reports it the next time the session records.
                recording.error = exc
            finally:
                if data is not None:
                    self.written_bytes += len(data)
                self.written_jobs += 1

    @staticmethod
    def _write_all(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]


class SessionRecording:
    """One session's file: entries buffered on the loop, written by the thread."""

    __slots__ = ("path", "fd", "writer", "started", "parts", "size", "handed_at",
                 "active", "error")

    def __init__(self, path: str, fd: int, writer: DiskWriter):
        self.path = path
        self.fd = fd
        self.writer = writer
        self.started = time.monotonic()
        self.parts = [HEADER]
        self.size = len(HEADER)
        self.handed_at = self.started
        self.active = True
        self.error: Optional[OSError] = None     # set by the writer thread

    def to_client(self, data) -> None:
        """Bytes the target sent, as the client receives them (decoded)."""
        if self.active:
            self._add(b"{", data)

    def from_client(self, data) -> None:
        """Payload bytes the client sent, unmasked or decoded."""
        if self.active:
            self._add(b"}", data)

    def _add(self, mark: bytes, data) -> None:
        now = time.monotonic()
        entry = b"'%s%d%s%s',\n" % (mark, int((now - self.started) * 1000), mark,
                                     _escape(bytes(data))[0])
        self.parts.append(entry)
        self.size += len(entry)
        if self.size >= HANDOFF_BYTES or now - self.handed_at >= HANDOFF_SECONDS:
            self._hand_off(now)

    def _hand_off(self, now: float) -> None:
        if self.error is not None:
            self._stop("cannot write %s: %s" % (self.path, self.error.strerror or self.error))
            return
        writer = self.writer
        if writer.behind + self.size > MAX_BEHIND:
            self._stop("recording %s dropped: the disk writer is %d KiB behind"
                       % (self.path, writer.behind // 1024))
            return
        writer.write(self, b"".join(self.parts))
        self.parts = []
        self.size = 0
        self.handed_at = now

    def _stop(self, why: str) -> None:
        """Record nothing more; the file still gets its footer."""
        log.warning("%s", why)
        self.active = False
        self.parts = []
        self.size = 0

    def close(self) -> None:
        """At the end of the session: what is left, the footer, then the close."""
        if self.active:
            self.active = False
            self.parts.append(FOOTER)
            self.size += len(FOOTER)
            if self.error is not None:
                log.warning("cannot write %s: %s", self.path,
                            self.error.strerror or self.error)
            else:
                self.writer.write(self, b"".join(self.parts))
        elif self.error is None:
            self.writer.write(self, FOOTER)
        self.parts = []
        self.writer.close(self)


class Recorder:
    """Per worker: names and opens the session files, owns the writer thread.

    File numbers must be unique across workers, which are separate
    processes.  Each file is created with O_CREAT|O_EXCL: a number another
    worker (or an earlier run) took fails with EEXIST and the next one is
    tried, so no coordination between processes is needed and nothing is
    ever overwritten.  The first number tried follows the highest one
    already in the directory, so a worker does not probe a long history
    file by file.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.next_number: Optional[int] = None
        self._writer: Optional[DiskWriter] = None

    @property
    def writer(self) -> DiskWriter:
        # Started on first use, in the process that records (after fork).
        if self._writer is None or self._writer.pid != os.getpid():
            self._writer = DiskWriter()
        return self._writer

    def _first_free_guess(self) -> int:
        directory, base = os.path.split(self.prefix)
        start = base + "."
        highest = 0
        try:
            with os.scandir(directory or ".") as entries:
                for entry in entries:
                    suffix = entry.name[len(start):]
                    if entry.name.startswith(start) and suffix.isdigit():
                        highest = max(highest, int(suffix))
        except OSError:
            pass
        return highest + 1

    def open(self, label: str) -> Optional[SessionRecording]:
        """Create the next ``PREFIX.<n>``; None (logged) if it cannot be made."""
        if self.next_number is None:
            self.next_number = self._first_free_guess()
        while True:
            number = self.next_number
            self.next_number += 1
            path = "%s.%d" % (self.prefix, number)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             FILE_MODE)
            except OSError as exc:
                if exc.errno == errno.EEXIST:
                    continue
                log.warning("%s: not recorded: cannot create %s: %s",
                            label, path, exc.strerror or exc)
                return None
            log.info("%s: recording to %s", label, path)
            return SessionRecording(path, fd, self.writer)

    def wait_written(self, timeout: float) -> bool:
        """Wait (cooperatively) for the writer to finish; False on timeout."""
        writer = self._writer
        if writer is None or writer.pid != os.getpid():
            return True
        import gevent
        deadline = time.monotonic() + timeout
        while not writer.idle:
            if time.monotonic() >= deadline:
                log.warning("recordings: %d KiB not written to disk in time",
                            writer.behind // 1024)
                return False
            gevent.sleep(0.02)
        return True
