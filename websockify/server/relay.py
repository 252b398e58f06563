"""The two pumps of one session, driven by the event loop.

After the 101 the session needs no greenlet: each socket gets a read and a
write watcher on the worker's gevent loop and the callbacks move bytes
directly.  That keeps an idle session at a few KiB (two greenlets would
cost about 16 KiB) and avoids a greenlet switch per chunk.

Flow control: a side is only read while the opposite side has nothing
queued, so each direction holds at most one read chunk (plus a few control
frames) in memory, and a client that stops reading makes us stop reading
the target.

What the client's frames look like is the session's codec (protocol.codec):
the default one is HyBi with target bytes sent as binary frames (the fast
path, which may splice); protocol.legacy has the base64 subprotocol and
Hixie-75/76.  When a close frame has gone either way, what may still flow
is decided by the session state (protocol.session).
"""

import fcntl
import logging
import os
import socket
import time
from typing import Callable, List, Optional

from websockify.errors import WebSocketError
from websockify.metrics import counters as metrics
from websockify.net.sendqueue import send_some
from websockify.protocol.codec import HYBI, Codec
from websockify.protocol.frames import (OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, binary_header,
                                        encode_frame, frame_header, parse_close_payload)
from websockify.protocol.session import SessionState
from websockify.record import SessionRecording

log = logging.getLogger("websockify")

READ_CHUNK = 256 * 1024
SPLICE_PIPE_SIZE = 1024 * 1024   # Linux's default pipe-max-size
BULK_READ = 32 * 1024      # a target read this large switches to splice(2)
# Pongs and other control frames may queue for a client that does not read;
# past this many bytes we stop reading its pings.
CONTROL_BACKLOG = 64 * 1024
CLOSE_TIMEOUT = 5.0        # seconds to wait for the client's close reply

_READ = 1
_WRITE = 2

_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = 1031
_F_GETPIPE_SZ = 1032


class SplicePipe:
    """A pipe per worker process through which target bytes reach clients."""

    def __init__(self):
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # A large pipe lets one splice move what a fast target has sent since
        # the last wake-up: fewer, larger frames (and system calls) per byte.
        for size in (SPLICE_PIPE_SIZE, READ_CHUNK):
            try:
                fcntl.fcntl(self.write_fd, _F_SETPIPE_SZ, size)
                break
            except OSError:
                continue
        self.size = fcntl.fcntl(self.write_fd, _F_GETPIPE_SZ)
        self.pid = os.getpid()

    def drain(self, count: int) -> bytes:
        """Read ``count`` bytes back out of the pipe (the slow path)."""
        parts = []
        while count > 0:
            chunk = os.read(self.read_fd, count)
            if not chunk:
                break
            parts.append(chunk)
            count -= len(chunk)
        return b"".join(parts)


_splice_pipe: Optional[SplicePipe] = None


def splice_pipe() -> Optional[SplicePipe]:
    """This process's splice pipe (made after fork), or None without splice(2)."""
    global _splice_pipe
    if not hasattr(os, "splice"):
        return None
    if _splice_pipe is None or _splice_pipe.pid != os.getpid():
        try:
            _splice_pipe = SplicePipe()
        except OSError:
            return None
    return _splice_pipe


# One receive buffer per process: every read lands here, is unmasked in
# place and is sent on from here; whatever cannot be sent at once is copied
# out (_Leg.own) before the callback returns, so the next read can reuse it.
_receive_buffer = bytearray(READ_CHUNK)


def _start(watcher, *args) -> None:
    if not watcher.active:
        watcher.start(*args)


def _stop(watcher) -> None:
    if watcher.active:
        watcher.stop()


class _Leg:
    """One socket of the session with its watchers and its output queue."""

    __slots__ = ("sock", "reader", "writer", "out", "out_bytes", "open", "plain")

    def __init__(self, loop, sock: socket.socket):
        self.sock = sock
        fd = sock.fileno()
        self.reader = loop.io(fd, _READ)
        self.writer = loop.io(fd, _WRITE)
        self.out: List[bytes] = []
        self.out_bytes = 0
        self.open = True
        # sendmsg gathers header and payload without a copy and splice moves
        # bytes in the kernel; a TLS stream (tls.TLSStream) can do neither.
        self.plain = not getattr(sock, "encrypted", False)

    def queue(self, data) -> None:
        if data:
            self.out.append(data)
            self.out_bytes += len(data)

    def own(self) -> None:
        """Copy queued views so the shared receive buffer can be reused."""
        self.out = [bytes(item) if type(item) is memoryview else item for item in self.out]

    def flush(self) -> bool:
        """Send what is queued; True when the queue is empty."""
        out = self.out
        sock = self.sock
        while out:
            try:
                sent = send_some(sock, out, self.plain)
            except (BlockingIOError, InterruptedError):
                return False
            self.out_bytes -= sent
        if not self.plain:
            return sock.flush()     # TLS: encrypted bytes may still be waiting
        return True

    def close(self) -> None:
        if not self.open:
            return
        self.open = False
        self.reader.stop()
        self.writer.stop()
        self.reader.close()
        self.writer.close()
        self.out = []
        self.out_bytes = 0
        try:
            self.sock.close()
        except OSError:
            pass




class _NoWatcher:
    active = False

    def start(self, *args) -> None:
        raise RuntimeError("a session without a target has nothing to watch")

    def stop(self) -> None:
        pass


class _NoLeg:
    """Stands in for the target of a session that has none (the echo service)."""

    __slots__ = ()
    reader = writer = _NoWatcher()
    sock = None
    open = False
    plain = False
    out: List[bytes] = []
    out_bytes = 0

    def close(self) -> None:
        pass


class SessionStats:
    """What the session log line reports (the close code is the session state's)."""

    __slots__ = ("started", "from_client", "to_client")

    def __init__(self):
        self.started = time.time()
        self.from_client = 0      # payload bytes received from the browser
        self.to_client = 0        # payload bytes sent to the browser


class Relay:
    """Bridge a WebSocket client socket and a TCP target socket.

    The bytes are moved here; what may still flow once a close frame went
    either way is the session state's decision (protocol.session).
    """

    #: Whether ``_client_message_end`` must hear of message boundaries.
    wants_message_end = False
    #: Whether what this class sends the client is framed by the session's
    #: codec, so that legacy codecs (base64, Hixie) can be used with it.  A
    #: subclass that queues HyBi frames of its own must set this to False.
    codec_framing = True

    __slots__ = ("loop", "client", "target", "parser", "stats", "on_finish",
                 "traffic", "label", "session", "finished", "_close_timer", "_heartbeat",
                 "_pong_deadline", "splice", "bulk", "backlog_limit", "codec", "_downstream",
                 "encrypted", "recorder")

    def __init__(self, loop, client_sock: socket.socket, target_sock: Optional[socket.socket],
                 *, label: str, on_finish: Callable[["Relay"], None],
                 max_frame_size: int, heartbeat: float = 0, heartbeat_timeout: float = 0,
                 traffic: Optional[Callable[[str], None]] = None,
                 codec: Optional[Codec] = None,
                 recorder: Optional[SessionRecording] = None):
        self.loop = loop
        self.client = _Leg(loop, client_sock)
        self.target = _Leg(loop, target_sock) if target_sock is not None else _NoLeg()
        self.codec = codec = codec or HYBI
        # --record (record.SessionRecording): chosen here, once, so that an
        # unrecorded session runs exactly the code it runs without the option.
        self.recorder = recorder
        self.parser = codec.parser(
            self._client_data if recorder is None else self._record_client_data,
            self._client_control,
            self._client_message_end if self.wants_message_end else None,
            max_frame_size)
        # Bound once: the binary path calls its copy directly, others encode.
        self._downstream = self._copy_to_client if codec.binary else self._encode_to_client
        if recorder is not None:
            self._downstream = self._record_downstream
        self.stats = SessionStats()
        self.on_finish = on_finish
        self.traffic = traffic
        self.label = label
        self.session = SessionState(codec.awaits_close_reply)
        self.finished = False
        # Zero-copy downstream when both legs are plain sockets (and recorded
        # bytes must pass through this process).
        self.splice = (splice_pipe() if recorder is None and codec.splice and self.client.plain
                       and self.target.plain else None)
        self.bulk = False
        # A TLS leg can hold readable bytes its socket's watcher does not see.
        self.encrypted = not (self.client.plain and self.target.plain)
        # Bytes queued for the client past which its frames are not read.
        self.backlog_limit = CONTROL_BACKLOG
        self._close_timer = None
        self._heartbeat = None
        self._pong_deadline = None
        if heartbeat > 0 and codec.pings:
            self._heartbeat = loop.timer(heartbeat, heartbeat)
            if heartbeat_timeout > 0:
                self._pong_deadline = loop.timer(heartbeat_timeout)

    def start(self, early_data: bytes = b"") -> None:
        """Begin pumping; ``early_data`` is what the client sent after its request."""
        if self._heartbeat is not None:
            self._heartbeat.start(self._guard, self._send_heartbeat)
        if early_data:
            self._guard(self._consume_client, bytearray(early_data), len(early_data))
        else:
            self._guard(self._update)

    # -- plumbing ------------------------------------------------------

    def _guard(self, func, *args) -> None:
        """Run a callback; an unexpected error ends this session only (1011)."""
        try:
            func(*args)
        except Exception:
            log.exception("%s: internal error", self.label)
            try:
                self._fail(1011, "Internal error")
            except Exception:
                self._finish()

    def _update(self) -> None:
        """Flush both queues, then choose which watchers run."""
        if self.finished:
            return
        client, target = self.client, self.target
        session = self.session
        traffic = self.traffic
        if traffic:
            self._trace_flushes(traffic)
        if target.open:
            try:
                flushed = target.flush()
            except OSError as exc:
                self._target_lost(exc)
                flushed = True
            if flushed:
                _stop(target.writer)
                if session.closing:
                    # What the client sent before its close has reached the target.
                    target.close()
            else:
                _start(target.writer, self._guard, self._on_target_writable)
        try:
            flushed = client.flush()
        except OSError as exc:
            self._abort("client connection error: %s" % (exc.strerror or exc))
            return
        if flushed:
            _stop(client.writer)
            if session.exchanged and not target.open:
                self._finish()
                return
        else:
            _start(client.writer, self._guard, self._on_client_writable)
        # Read the target only while the client's queue is empty.
        if target.open and session.is_open and not client.out:
            _start(target.reader, self._guard, self._on_target_readable)
        elif target.open:
            _stop(target.reader)
        # Read the client while the target keeps up and pongs don't pile up.
        if (session.client_readable and not target.out
                and client.out_bytes < self.backlog_limit):
            _start(client.reader, self._guard, self._on_client_readable)
        else:
            _stop(client.reader)
        if client.out:
            client.own()
        if target.out:
            target.own()
        if self.encrypted:
            self._poll_tls()

    def _poll_tls(self) -> None:
        """Read again, from the loop, a TLS leg holding bytes its watcher cannot report."""
        for leg, on_readable in ((self.client, self._on_client_readable),
                                 (self.target, self._on_target_readable)):
            if not leg.plain and leg.open and leg.reader.active and leg.sock.buffered():
                self.loop.run_callback(self._guard, self._read_tls_leg, leg, on_readable)

    def _read_tls_leg(self, leg: _Leg, on_readable: Callable[[], None]) -> None:
        # The session may have moved on since the callback was scheduled.
        if not self.finished and leg.open and leg.reader.active:
            on_readable()

    def _trace_flushes(self, traffic: Callable[[str], None]) -> None:
        """--traffic: report sends before _update does them (full or partial)."""
        for leg, mark in ((self.target, ">"), (self.client, "<")):
            if leg.open and leg.out:
                try:
                    done = leg.flush()
                except OSError:
                    return          # _update meets the error again and handles it
                traffic(mark if done else mark + ".")

    def _target_lost(self, exc: OSError) -> None:
        log.info("%s: target connection error: %s", self.label, exc.strerror or exc)
        self.target.close()
        self._send_close(self.session.close(1011, "Target connection lost"))
        self._arm_close_timer()

    # -- client -> target ----------------------------------------------

    def _on_client_readable(self) -> None:
        buf = _receive_buffer
        try:
            n = self.client.sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._abort("client connection error: %s" % (exc.strerror or exc))
            return
        if not n:
            self._abort("client closed the connection without a close frame")
            return
        self._consume_client(buf, n)

    def _consume_client(self, buf: bytearray, n: int) -> None:
        if self.traffic:
            self.traffic("}")
        try:
            self.parser.feed_buffer(buf, n)
        except WebSocketError as exc:
            log.info("%s: protocol error from client: %s (closing %d)",
                     self.label, exc.reason, exc.close_code)
            self._fail(exc.close_code, exc.reason)
            return
        self._update()

    def _client_data(self, chunk: bytes, opcode: int) -> None:
        if not self.session.client_readable or not self.target.open:
            return
        self.stats.from_client += len(chunk)
        metrics.words[metrics.BYTES_FROM_CLIENT] += len(chunk)
        self.target.queue(chunk)

    def _record_client_data(self, chunk, opcode: int) -> None:
        self.recorder.from_client(chunk)
        self._client_data(chunk, opcode)

    def _client_message_end(self, opcode: int) -> None:
        """Message boundaries mean nothing to a TCP target."""

    def _client_control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            if self.session.is_open:
                self.client.queue(encode_frame(OP_PONG, payload))
        elif opcode == OP_PONG:
            if self._pong_deadline is not None:
                self._pong_deadline.stop()
        elif opcode == OP_CLOSE:
            code, reason = parse_close_payload(payload)
            self.client.reader.stop()
            self.target.reader.stop()
            self._send_close(self.session.peer_closed(code, reason))
            self._arm_close_timer()

    # -- target -> client ----------------------------------------------

    def _on_target_readable(self) -> None:
        # splice(2) saves two copies per byte but costs a third system call:
        # worth it for bulk transfers, not for the small reads of an
        # interactive session, so it follows the size of the last read.
        if self.bulk:
            n = self._splice_to_client()
        else:
            n = self._downstream()
        if n is not None and self.splice is not None:
            self.bulk = n >= BULK_READ
        if n is None:
            return
        if not n:
            self.target.close()
            self._send_close(self.session.close(1000, "Target closed"))
            self._arm_close_timer()
            self._update()
            return
        self.stats.to_client += n
        metrics.words[metrics.BYTES_TO_CLIENT] += n
        if self.traffic:
            self.traffic("{")
        self._update()

    def _read_target(self) -> Optional[int]:
        """Read into the shared buffer: bytes read, 0 at EOF or error, None if none ready."""
        try:
            return self.target.sock.recv_into(_receive_buffer)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            log.info("%s: target connection error: %s", self.label, exc.strerror or exc)
            return 0

    def _copy_to_client(self) -> Optional[int]:
        """Read target bytes and queue them as one binary frame."""
        n = self._read_target()
        if n:
            self.client.queue(binary_header(n))
            self.client.queue(memoryview(_receive_buffer)[:n])
        return n

    def _encode_to_client(self) -> Optional[int]:
        """Read target bytes and queue them framed by the session's codec."""
        n = self._read_target()
        if n:
            self.client.queue(self.codec.frame(memoryview(_receive_buffer)[:n]))
        return n

    def _record_downstream(self) -> Optional[int]:
        """Queue target bytes for the client as usual, then record them."""
        n = self._copy_to_client() if self.codec.binary else self._encode_to_client()
        if n:
            self.recorder.to_client(memoryview(_receive_buffer)[:n])
        return n

    def _splice_to_client(self) -> Optional[int]:
        """Move target bytes to the client inside the kernel, framed.

        The bytes go target -> pipe -> client with splice(2), so they are
        never copied into this process; the frame header for them is sent
        in between.  Whatever the client cannot take at once is read out of
        the pipe into the queue, so the pipe is empty again on return.
        """
        pipe = self.splice
        try:
            n = os.splice(self.target.sock.fileno(), pipe.write_fd, pipe.size,
                          flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            log.info("%s: target connection error: %s", self.label, exc.strerror or exc)
            return 0
        if not n:
            return 0
        client = self.client
        header = binary_header(n)
        sent = moved = 0
        try:
            # MSG_MORE: the header leaves in one segment with the payload spliced next.
            sent = client.sock.send(header, socket.MSG_MORE)
            if sent == len(header):
                while moved < n:
                    step = os.splice(pipe.read_fd, client.sock.fileno(), n - moved,
                                     flags=_SPLICE_FLAGS)
                    if not step:
                        break
                    moved += step
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            pipe.drain(n - moved)
            self._abort("client connection error: %s" % (exc.strerror or exc))
            return None
        if sent < len(header):
            client.queue(header[sent:])
        if moved < n:
            client.queue(pipe.drain(n - moved))
        return n

    def _queue_to_client(self, data, opcode: int = OP_BINARY, fin: bool = True) -> None:
        """Queue data this session produces itself (not read from the target).

        HyBi codecs frame it as given (a fragment when ``fin`` is false, a
        continuation frame by ``opcode``); legacy ones send every non-empty
        piece as a message of its own, as they do with target bytes.  A
        subclass that frames through this sets ``codec_framing = True``.
        """
        if self.recorder is not None and data:
            self.recorder.to_client(data)
        codec = self.codec
        if codec.binary:
            self.client.queue(frame_header(len(data), opcode, fin))
            self.client.queue(data)
        elif data:
            self.client.queue(codec.frame(data))

    def _on_target_writable(self) -> None:
        self._update()

    def _on_client_writable(self) -> None:
        self._update()

    # -- closing -------------------------------------------------------

    def _send_close(self, frame) -> None:
        """Queue the close frame the session state asked for (None: nothing to send)."""
        if frame is None:
            return
        self.client.queue(self.codec.close_frame(*frame))
        if not self.session.client_readable:
            self.client.reader.stop()

    def _arm_close_timer(self) -> None:
        if self._close_timer is None:
            self._close_timer = self.loop.timer(CLOSE_TIMEOUT)
            self._close_timer.start(self._guard, self._finish)

    def _fail(self, code: int, reason: str) -> None:
        """Close after an error: drop the target, tell the client why."""
        self.target.close()
        self._send_close(self.session.fail(code, reason))
        self.client.reader.stop()
        self._arm_close_timer()
        self._update()

    def shutdown(self, code: int = 1001, reason: str = "Server shutting down") -> None:
        """Close the session from the server side (graceful stop)."""
        if self.finished:
            return
        self.target.close()
        self._send_close(self.session.close(code, reason))
        self._arm_close_timer()
        self._guard(self._update)

    def _abort(self, why: str) -> None:
        self.session.abort(why)
        self._finish()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self._close_timer is not None:
            self._close_timer.stop()
            self._close_timer = None
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self._pong_deadline is not None:
            self._pong_deadline.stop()
            self._pong_deadline = None
        self.target.close()
        self.client.close()
        self.on_finish(self)

    def _send_heartbeat(self) -> None:
        if not self.session.is_open or self.client.out_bytes >= CONTROL_BACKLOG:
            return
        self.client.queue(encode_frame(OP_PING, b"websockify"))
        deadline = self._pong_deadline
        if deadline is not None and not deadline.active:
            deadline.start(self._guard, self._heartbeat_timed_out)
        self._update()

    def _heartbeat_timed_out(self) -> None:
        """The client answered no ping in time: a dead peer, close it now."""
        log.info("%s: no pong in time after a ping (--heartbeat-timeout); closing",
                 self.label)
        # The timeout is what the log reports, even over a close under way.
        self.session.close_code, self.session.close_reason = 1011, "Heartbeat timeout"
        self.target.close()
        self._send_close(self.session.fail(1011, "Heartbeat timeout"))
        try:
            self.client.flush()
        except OSError:
            pass
        self._finish()
