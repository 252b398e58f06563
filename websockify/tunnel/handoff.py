"""Worker-to-worker hand-off of a user's connection over Unix sockets (SCM_RIGHTS).

Each worker listens on ``<directory>/<pid>.sock`` (the directory is the
master's, mode 0700, removed at exit).  A worker that accepted a user for
an agent another worker holds sends it one SOCK_SEQPACKET message: a JSON
header (what the connection is: ``kind``, the agent ID, the peer), the
bytes already read from it, and the descriptor itself; the receiver
carries on as if it had accepted the connection.  The same channel carries
``drop`` (a replacing link took an agent over: close yours).

A TLS connection cannot move (its state lives in the accepting process):
that worker keeps the TLS stream and hands over one end of a socketpair
instead, pumping plaintext between the two (``Pipe``).
"""

import json
import logging
import os
import socket
import struct
from typing import Callable, Dict, Optional, Tuple

import gevent

log = logging.getLogger("websockify")

_LENGTH = struct.Struct("!I")
#: A header, a request head (16 KiB at most) and what followed it in its reads.
MAX_MESSAGE = 64 * 1024
PIPE_CHUNK = 64 * 1024


def encode_message(header: dict, data: bytes = b"") -> bytes:
    """One hand-off message: the JSON header's length, the header, the bytes read."""
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    message = _LENGTH.pack(len(raw)) + raw + data
    if len(message) > MAX_MESSAGE:
        raise ValueError("hand-off message of %d bytes exceeds %d" % (len(message), MAX_MESSAGE))
    return message


def decode_message(message: bytes) -> Tuple[dict, bytes]:
    if len(message) < _LENGTH.size:
        raise ValueError("hand-off message too short")
    (size,) = _LENGTH.unpack_from(message)
    if _LENGTH.size + size > len(message):
        raise ValueError("hand-off header cut short")
    header = json.loads(message[_LENGTH.size:_LENGTH.size + size].decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("hand-off header is not an object")
    return header, bytes(message[_LENGTH.size + size:])


def socket_path(directory: str, pid: int) -> str:
    return os.path.join(directory, "%d.sock" % pid)


class HandoffListener:
    """A worker's hand-off socket: each message goes to ``on_message(header, data, fd)``.

    ``fd`` is the received descriptor (-1 for messages without one); the
    callback owns it.
    """

    def __init__(self, directory: str, on_message: Callable[[dict, bytes, int], None]):
        self.path = socket_path(directory, os.getpid())
        self.on_message = on_message
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(self.path)
        self.sock.listen(64)
        self._greenlets = set()
        self._acceptor = gevent.spawn(self._accept_loop)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            greenlet = gevent.spawn(self._serve, conn)
            self._greenlets.add(greenlet)
            greenlet.link(self._greenlets.discard)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    message, fds, flags, _ = socket.recv_fds(conn, MAX_MESSAGE, 1)
                except OSError:
                    return
                if not message and not fds:
                    return
                fd = fds[0] if fds else -1
                for extra in fds[1:]:
                    os.close(extra)
                if flags & getattr(socket, "MSG_CTRUNC", 8):
                    log.warning("hand-off: control data truncated, message dropped")
                    if fd >= 0:
                        os.close(fd)
                    continue
                try:
                    header, data = decode_message(message)
                except ValueError as exc:
                    log.warning("hand-off: malformed message dropped: %s", exc)
                    if fd >= 0:
                        os.close(fd)
                    continue
                try:
                    self.on_message(header, data, fd)
                except Exception:
                    log.exception("hand-off: handling a %s message failed", header.get("kind"))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        self._acceptor.kill(block=False)
        for greenlet in list(self._greenlets):
            greenlet.kill(block=False)
        try:
            os.unlink(self.path)
        except OSError:
            pass


class HandoffSender:
    """Connections to the other workers' hand-off sockets, opened on first use."""

    def __init__(self, directory: str):
        self.directory = directory
        self._peers: Dict[int, socket.socket] = {}

    def send(self, pid: int, header: dict, data: bytes = b"", fd: int = -1) -> bool:
        """Send one message (cooperatively); False when worker ``pid`` cannot be reached.

        The caller still owns ``fd`` and closes its copy afterwards.
        """
        message = encode_message(header, data)
        for attempt in (1, 2):
            sock = self._peers.get(pid)
            try:
                if sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                    try:
                        sock.connect(socket_path(self.directory, pid))
                    except OSError:
                        sock.close()
                        raise
                    self._peers[pid] = sock
                socket.send_fds(sock, [message], [fd] if fd >= 0 else [])
                return True
            except OSError as exc:
                self._drop(pid)
                if attempt == 2 or sock is None:
                    log.debug("hand-off to worker pid %d failed: %s", pid, exc)
                    return False
        return False

    def _drop(self, pid: int) -> None:
        sock = self._peers.pop(pid, None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        for pid in list(self._peers):
            self._drop(pid)


class Pipe:
    """Plaintext between a TLS stream and a plain socket, on event-loop watchers.

    Each direction holds at most one read chunk: a side is read only while
    the other side's queue is empty.
    """

    def __init__(self, loop, a, b, on_finish: Optional[Callable[["Pipe"], None]] = None,
                 half_close: bool = False):
        self.loop = loop
        self.ends = [_End(loop, a), _End(loop, b)]
        self.on_finish = on_finish
        self.finished = False
        #: TCP's half-close carried through (a FIN from one side becomes a FIN to the
        #: other; over when both sides ended), for plain TCP streams.
        self.half_close = half_close

    def start(self, early: bytes = b"") -> None:
        if early:
            self.ends[1].out = bytearray(early)
        self._update()

    def _update(self) -> None:
        if self.finished:
            return
        for index, end in enumerate(self.ends):
            other = self.ends[1 - index]
            try:
                flushed = end.flush()
            except OSError:
                self.close()
                return
            if flushed:
                end.stop_writer()
            else:
                end.start_writer(self._update)
        if self._is_over():
            self.close()
            return
        if self.half_close:
            for index, end in enumerate(self.ends):
                other = self.ends[1 - index]
                if end.eof and not other.out and not other.shut:
                    other.shut = True
                    try:
                        other.sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
            if all(end.eof for end in self.ends) and not any(end.out for end in self.ends):
                self.close()
                return
        # A WebSocket carried through needs no half-close: once one side has
        # ended and what it sent is delivered, the pipe is over.
        elif any(end.eof for end in self.ends) and not any(end.out for end in self.ends):
            self.close()
            return
        for index, end in enumerate(self.ends):
            other = self.ends[1 - index]
            if not end.eof and not other.out and self._may_read(index):
                end.start_reader(self._readable, index)
                if getattr(end.sock, "buffered", None) is not None and end.sock.buffered():
                    self.loop.run_callback(self._readable, index)
            else:
                end.stop_reader()

    def _readable(self, index: int) -> None:
        if self.finished:
            return
        end, other = self.ends[index], self.ends[1 - index]
        if other.out or end.eof:
            return
        buf = bytearray(PIPE_CHUNK)
        try:
            n = end.sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            if self.half_close:
                # A reset is not an end of stream: the other side goes too.
                self.close()
                return
            n = 0
        try:
            if not n:
                end.eof = True
                other.out = bytearray(self._carry(index, b"", True))
            else:
                other.out = bytearray(self._carry(index, memoryview(buf)[:n], False))
            self._update()
        except Exception:
            log.exception("hand-off pipe failed")
            self.close()

    # -- what a subclass may change ------------------------------------------------

    def _carry(self, index: int, data, eof: bool):
        """What goes to the other end for ``data`` read from end ``index`` (at EOF: b"")."""
        return data

    def _may_read(self, index: int) -> bool:
        return True

    def _is_over(self) -> bool:
        """Over before both ends ended (the default: never)."""
        return False

    def close(self) -> None:
        if self.finished:
            return
        self.finished = True
        for end in self.ends:
            end.close()
        if self.on_finish is not None:
            self.on_finish(self)


class _End:
    __slots__ = ("sock", "reader", "writer", "out", "eof", "shut")

    def __init__(self, loop, sock):
        self.sock = sock
        self.reader = loop.io(sock.fileno(), 1)
        self.writer = loop.io(sock.fileno(), 2)
        self.out = bytearray()
        self.eof = False
        self.shut = False

    def flush(self) -> bool:
        while self.out:
            try:
                sent = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                return False
            del self.out[:sent]
        flush = getattr(self.sock, "flush", None)
        return flush() if flush is not None else True

    def start_reader(self, callback, *args) -> None:
        if not self.reader.active:
            self.reader.start(callback, *args)

    def stop_reader(self) -> None:
        if self.reader.active:
            self.reader.stop()

    def start_writer(self, callback) -> None:
        if not self.writer.active:
            self.writer.start(callback)

    def stop_writer(self) -> None:
        if self.writer.active:
            self.writer.stop()

    def close(self) -> None:
        self.reader.stop()
        self.writer.stop()
        self.reader.close()
        self.writer.close()
        try:
            self.sock.close()
        except OSError:
            pass
