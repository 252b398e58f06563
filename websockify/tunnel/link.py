"""One agent's WebSocket on the server side, driven by the event loop.

After the 101 an agent's connection needs no greenlet (as server/relay.py):
a read and a write watcher on the worker's loop and a liveness timer.  The
agent's masked frames go through protocol/frames.py's parser; each binary
message is handed to the mux ``Connection(role="server")``
(protocol/mux.py), whose events go to the stream's user (tunnel/faces.py's
``StreamUser``, through the ``StreamSink`` methods).  DATA reaches the users
uncopied, as views of the worker's one read buffer, written to their sockets
when the read's events are all handed out; what a socket does not take then
is copied (``Link.keep``) before the next read.  What the connection
queues is sent as unmasked binary messages, pulled from it only while the
socket has little queued, so control frames never wait behind bulk data.

The codec is protocol/mux.py's ``Connection`` or, for websocktunnel's
clients, protocol/wsmux.py's ``WsmuxConnection`` (the same operations and
events; it pings with WebSocket pings, having no ping frame of its own).

A protocol error (WebSocket or mux) closes this agent only, with its close
code (1002 for a malformed mux frame) and one log line; a silent agent is
dead after ``dead_after`` seconds: its streams are reset, their users
closed, and the WebSocket closed with 1011.
"""

import logging
import os
import time
from collections import deque
from typing import Callable, Deque, Dict, Optional

from websockify.errors import ProtocolError, WebSocketError
from websockify.net.sendqueue import send_some
from websockify.protocol.frames import (OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, FrameParser,
                                        binary_header, close_payload, encode_frame,
                                        parse_close_payload)
from websockify.protocol.mux import (DataReceived, DataViewsReceived, GoAwayReceived,
                                     Liveness, ResetCode, SendWindowOpened, StreamAccepted,
                                     StreamClosed, StreamEnded, StreamLimitError, StreamReset,
                                     tunnel_connection)

log = logging.getLogger("websockify")

READ_CHUNK = 1024 * 1024
#: Bytes queued on the socket past which nothing more is taken from the mux.
SOCKET_BACKLOG = 64 * 1024
CLOSE_TIMEOUT = 2.0

_READ = 1
_WRITE = 2

# One read buffer for every link of the worker: what a read brings is
# handed out (and written to the users, as far as their sockets take it)
# before the next read, so views of it never outlive the read (Link.keep).
_receive_buffer = bytearray(READ_CHUNK)


def liveness_settings() -> tuple:
    """(ping interval, dead after) in seconds: 15 and 45, or the test overrides.

    WEBSOCKIFY_TUNNEL_PING and WEBSOCKIFY_TUNNEL_DEAD (undocumented for
    users: the end-to-end tests set them so a dead agent is found in seconds).
    """
    ping = float(os.environ.get("WEBSOCKIFY_TUNNEL_PING", "15"))
    dead = float(os.environ.get("WEBSOCKIFY_TUNNEL_DEAD", "45"))
    return ping, dead


class StreamSink:
    """What a stream's user side must answer (tunnel/faces.py implements it)."""

    #: True: DATA may come as views of the read buffer (``data_views``).
    takes_views = False

    def accepted(self) -> None: ...
    def data(self, data: bytes) -> None: ...
    def data_views(self, views: list, size: int) -> None: ...
    def window_opened(self) -> None: ...
    def ended(self) -> None: ...
    def reset(self, code: int, reason: str) -> None: ...
    def closed(self) -> None: ...
    def assigned(self, stream_id: int) -> None: ...
    def write_deferred(self) -> None: ...


class Link:
    """An agent's WebSocket: the frames, the mux connection and its streams' users."""

    def __init__(self, loop, sock, *, agent_id: str, peer: str, serial: int,
                 on_finish: Callable[["Link"], None], ping_interval: float = 15.0,
                 dead_after: float = 45.0, token_expiry: Optional[float] = None,
                 codec=None, max_message: Optional[int] = None):
        self.loop = loop
        self.sock = sock
        self.agent_id = agent_id
        self.peer = peer
        self.serial = serial
        self.label = "agent %s (%s)" % (agent_id, peer)
        self.on_finish = on_finish
        self.token_expiry = token_expiry
        self.connected_since = time.time()
        # Our protocol's Connection, or another codec with its operations and
        # events (protocol/wsmux.py's, for websocktunnel's clients).
        self.conn = codec if codec is not None else tunnel_connection("server", None)
        # The largest message accepted from the agent: what the 101 announced
        # (MESSAGE_HEADER), else what the codec sends (the protocol's default).
        self.max_message = max_message or self.conn.max_message
        self.parser = FrameParser(self._on_data, self._on_control,
                                  max_frame_size=self.max_message, require_mask=True,
                                  on_message_end=self._on_message_end)
        # The current message's pieces: views of the read buffer while a
        # read is being parsed, copied (``_own_message``) before the next read.
        self._parts = []
        self._size = 0
        self.sinks: Dict[int, StreamSink] = {}
        # Users past the agent's unanswered-open limit wait here (in arrival
        # order) for an answer to free a place, instead of being refused: a
        # burst of users is served, only past max_streams is anyone refused.
        self.waiting: Deque[tuple] = deque()
        fd = sock.fileno()
        self.reader = loop.io(fd, _READ)
        self.writer = loop.io(fd, _WRITE)
        self.out = []
        self.out_bytes = 0
        self.plain = not getattr(sock, "encrypted", False)
        now = time.monotonic()
        self.liveness = Liveness(ping_interval=ping_interval, dead_after=dead_after, now=now)
        tick = max(0.05, min(1.0, ping_interval / 4.0, dead_after / 8.0))
        self._tick = loop.timer(tick, tick)
        self._close_timer = None
        self._dispatching = False
        self._deferred = {}         # sinks given data during the current read, in order
        self.closing = False        # our close frame is queued or sent
        self.finished = False
        self.going_away = False     # the agent sent GOAWAY: no new streams
        self.close_code: Optional[int] = None
        self.close_reason = ""
        self._pings = 0

    # -- running -------------------------------------------------------------

    def start(self, early: bytes = b"") -> None:
        self._tick.start(self._guard, self._on_tick)
        if early:
            buf = bytearray(early)
            self._guard(self._consume, buf, len(buf))
        else:
            self._guard(self._update)

    def _guard(self, func, *args) -> None:
        try:
            func(*args)
        except Exception:
            log.exception("%s: internal error", self.label)
            self._finish()

    def defer(self, sink) -> bool:
        """While a read's events are handed out: note ``sink`` to be told
        (``write_deferred``) once they all are, so that what one read brings
        a user is written in one system call; False otherwise (the sink
        writes now)."""
        if not self._dispatching:
            return False
        self._deferred[sink] = None
        return True

    @staticmethod
    def keep(out: list) -> None:
        """Copy, in place in ``out``, the views of the read buffer: a sink
        given ``data_views`` calls this with what it could not write before
        the read is over (the buffer's next read would overwrite them)."""
        for index, part in enumerate(out):
            if type(part) is memoryview and part.obj is _receive_buffer:
                out[index] = bytes(part)

    def _update_deferred(self) -> None:
        deferred, self._deferred = self._deferred, {}
        for sink in deferred:
            sink.write_deferred()

    def kick(self) -> None:
        """Something was queued in the mux connection: send it (once per read
        when it happens while that read's events are handed out)."""
        if not self.finished and not self._dispatching:
            self._update()

    def _update(self) -> None:
        if self.finished:
            return
        conn = self.conn
        if not self.closing and self.out_bytes < SOCKET_BACKLOG and conn.has_data_to_send():
            for payload in conn.data_to_send(max_bytes=SOCKET_BACKLOG):
                # Header and payload leave together through sendmsg, uncopied.
                self._queue(binary_header(len(payload)))
                self._queue(payload)
        try:
            flushed = self._flush()
        except OSError as exc:
            self._lost("connection error: %s" % (exc.strerror or exc))
            return
        if flushed:
            if self.writer.active:
                self.writer.stop()
            if self.closing and self._close_timer is None:
                self._arm_close_timer()
        elif not self.writer.active:
            self.writer.start(self._guard, self._update)
        # Read while pongs and close replies do not pile up behind a stuck agent.
        if self.out_bytes < SOCKET_BACKLOG * 2:
            if not self.reader.active:
                self.reader.start(self._guard, self._on_readable)
            if not self.plain and self.sock.buffered():
                self.loop.run_callback(self._guard, self._on_readable)
        elif self.reader.active:
            self.reader.stop()
        if not self.closing and conn.has_data_to_send() and self.out_bytes < SOCKET_BACKLOG:
            # More than one batch was waiting: take the next one on the next turn.
            self.loop.run_callback(self._guard, self._update)

    def _queue(self, data: bytes) -> None:
        self.out.append(data)
        self.out_bytes += len(data)

    def _flush(self) -> bool:
        out = self.out
        sock = self.sock
        while out:
            try:
                sent = send_some(sock, out, self.plain)
            except (BlockingIOError, InterruptedError):
                return False
            self.out_bytes -= sent
        if not self.plain:
            return sock.flush()
        return True

    # -- from the agent ----------------------------------------------------------

    def _on_readable(self) -> None:
        if self.finished:
            return
        try:
            n = self.sock.recv_into(_receive_buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost("connection error: %s" % (exc.strerror or exc))
            return
        if not n:
            self._lost("the agent closed the connection" if not self.closing
                       else None)
            return
        self.liveness.heard(time.monotonic())
        self._consume(_receive_buffer, n)

    def _consume(self, buf: bytearray, n: int) -> None:
        self._dispatching = True
        try:
            self.parser.feed_buffer(buf, n)
            if self._parts:
                self._own_message()
        except WebSocketError as exc:
            self._dispatching = False
            log.info("%s: protocol error: %s (closing %d)", self.label, exc.reason,
                     exc.close_code)
            self.close(exc.close_code, exc.reason)
            return
        finally:
            self._dispatching = False
            if self._deferred:
                self._update_deferred()
        self._update()

    def _on_data(self, chunk, opcode: int) -> None:
        if self.closing:
            return
        if opcode != OP_BINARY:
            raise ProtocolError("text message on a tunnel (mux frames are binary)")
        self._size += len(chunk)
        if self._size > self.max_message:
            raise ProtocolError("message of more than %d bytes" % self.max_message)
        self._parts.append(chunk)

    def _own_message(self) -> None:
        """A message continues in the next read: keep its pieces out of the
        buffer, in one bytearray that the rest of the message is added to."""
        parts = self._parts
        if len(parts) == 1 and type(parts[0]) is bytearray:
            return
        message = bytearray()
        for part in parts:
            message += part
        self._parts = [message]

    def _on_message_end(self, opcode: int) -> None:
        parts, self._parts, self._size = self._parts, [], 0
        if self.closing or not parts:
            if not parts and not self.closing:
                raise ProtocolError("empty message on a tunnel")
            return
        # Usually one frame, one view: the mux parses it in place (no copy).
        # A message begun in an earlier read is a bytearray: the rest joins it.
        payload = parts[0]
        if len(parts) > 1:
            if type(payload) is bytearray:
                for part in parts[1:]:
                    payload += part
            else:
                payload = b"".join(parts)
        # Borrowed: DATA comes as views of the read buffer, written to the
        # users at the read's end; only what a user's socket did not take
        # is copied (Link.keep).
        for event in self.conn.receive_message(payload, borrow=True):
            self._dispatch(event)
        if self.waiting:
            self._admit_waiting()

    def _dispatch(self, event) -> None:
        kind = type(event)
        if kind is DataViewsReceived:
            sink = self.sinks.get(event.stream_id)
            if sink is None:
                self.conn.consumed(event.stream_id, event.size)
            elif sink.takes_views:
                sink.data_views(event.views, event.size)
            else:
                sink.data(b"".join(event.views))
        elif kind is DataReceived:
            sink = self.sinks.get(event.stream_id)
            if sink is not None:
                sink.data(event.data)
            else:
                self.conn.consumed(event.stream_id, len(event.data))
        elif kind is SendWindowOpened:
            sink = self.sinks.get(event.stream_id)
            if sink is not None:
                sink.window_opened()
        elif kind is StreamAccepted:
            sink = self.sinks.get(event.stream_id)
            if sink is not None:
                sink.accepted()
        elif kind is StreamEnded:
            sink = self.sinks.get(event.stream_id)
            if sink is not None:
                sink.ended()
        elif kind is StreamReset:
            sink = self.sinks.pop(event.stream_id, None)
            if sink is not None:
                sink.reset(event.code, event.reason)
        elif kind is StreamClosed:
            sink = self.sinks.pop(event.stream_id, None)
            if sink is not None:
                sink.closed()
        elif kind is GoAwayReceived:
            log.info("%s: agent is going away (%s %s)", self.label, event.code, event.reason)
            self.going_away = True

    def _on_control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            if not self.closing:
                self._queue(encode_frame(OP_PONG, payload))
        elif opcode == OP_CLOSE:
            code, reason = parse_close_payload(payload)
            if not self.closing:
                log.info("%s: agent closed the tunnel (%s%s)", self.label,
                         code if code is not None else "-", " " + reason if reason else "")
                self.close_code, self.close_reason = code, reason
                self._drop_streams("agent closed the tunnel")
                self._queue(encode_frame(OP_CLOSE, close_payload(code, "")))
                self.closing = True
            try:
                self._flush()
            except OSError:
                pass
            self._finish()

    # -- streams (the faces call these) ------------------------------------------

    def open_stream(self, meta: dict, sink: StreamSink) -> int:
        """Open a stream for a user: its id, or 0 when the user waits for a place
        among the unanswered opens (``sink.assigned(id)`` follows); raises the
        mux StreamLimitError past the stream limit."""
        if self.closing or self.going_away:
            raise StreamLimitError("the agent's tunnel is closing", ResetCode.GOING_AWAY)
        conn = self.conn
        if self.waiting or conn.pending_opens >= conn.max_pending_opens:
            if conn.open_streams + len(self.waiting) >= conn.max_streams:
                raise StreamLimitError("stream limit (%d) reached" % conn.max_streams)
            self.waiting.append((meta, sink))
            return 0
        stream_id = conn.open_stream(meta)
        self.sinks[stream_id] = sink
        self.kick()
        return stream_id

    def cancel_waiting(self, sink: StreamSink) -> None:
        """A waiting user left (or timed out) before its stream was opened."""
        for index, (_, waiting_sink) in enumerate(self.waiting):
            if waiting_sink is sink:
                del self.waiting[index]
                return

    def _admit_waiting(self) -> None:
        conn = self.conn
        admitted = False
        while (self.waiting and conn.pending_opens < conn.max_pending_opens
               and not (self.closing or self.going_away)):
            meta, sink = self.waiting.popleft()
            try:
                stream_id = conn.open_stream(meta)
            except StreamLimitError as exc:
                sink.reset(exc.code, str(exc))
                continue
            self.sinks[stream_id] = sink
            sink.assigned(stream_id)
            admitted = True
        if admitted:
            self.kick()

    def send(self, stream_id: int, data) -> int:
        taken = self.conn.send_data(stream_id, data)
        return taken

    def send_window(self, stream_id: int) -> int:
        return self.conn.send_window(stream_id)

    def consumed(self, stream_id: int, n: int) -> None:
        if n and not self.closing:
            self.conn.consumed(stream_id, n)

    def end(self, stream_id: int) -> None:
        if not self.closing:
            self.conn.end_stream(stream_id)

    def reset(self, stream_id: int, code: int = 1, reason: str = "") -> None:
        """The user side is gone (or refused): reset the stream and forget its user."""
        self.sinks.pop(stream_id, None)
        if not self.closing:
            try:
                self.conn.reset_stream(stream_id, ResetCode(code), reason)
            except Exception:       # already closed on the mux side
                log.debug("%s: reset of stream %d ignored", self.label, stream_id,
                          exc_info=True)
            if self.waiting:
                self._admit_waiting()

    def forget(self, stream_id: int) -> None:
        self.sinks.pop(stream_id, None)

    @property
    def open_streams(self) -> int:
        return self.conn.open_streams

    @property
    def bytes_out(self) -> int:
        return self.conn.bytes_out

    @property
    def bytes_in(self) -> int:
        return self.conn.bytes_in

    # -- liveness and closing ----------------------------------------------------

    def _on_tick(self) -> None:
        if self.finished:
            return
        verdict = self.liveness.poll(time.monotonic())
        if verdict == "ping":
            self._pings += 1
            if getattr(self.conn, "websocket_pings", False):
                self._queue(encode_frame(OP_PING, self._pings.to_bytes(8, "big")))
            else:
                self.conn.ping(self._pings.to_bytes(8, "big"))
            self._update()
        elif verdict == "dead":
            log.info("%s: no message for %g s: the agent is dead; closing its tunnel",
                     self.label, self.liveness.dead_after)
            self._drop_streams("agent is dead")
            self.close(1011, "agent silent too long")
            # A dead peer reads nothing: do not wait for its close reply.
            self._finish()

    def _drop_streams(self, why: str) -> None:
        sinks, self.sinks = self.sinks, {}
        waiting, self.waiting = self.waiting, deque()
        for sink in list(sinks.values()) + [sink for _, sink in waiting]:
            try:
                sink.reset(ResetCode.GOING_AWAY, why)
            except Exception:
                log.exception("%s: closing a user failed", self.label)

    def go_away(self, code: int, reason: str) -> None:
        """Announce the end (no new streams), then close: the streams are reset."""
        if self.closing or self.finished:
            return
        self.conn.go_away(ResetCode.GOING_AWAY if code is None else code, reason)
        for payload in self.conn.data_to_send():
            self._queue(encode_frame(OP_BINARY, payload))

    def close(self, code: int, reason: str) -> None:
        """Close the tunnel: users are closed, a close frame is sent, then the socket."""
        if self.closing or self.finished:
            return
        self.close_code, self.close_reason = code, reason
        self._drop_streams(reason)
        self.closing = True
        self._queue(encode_frame(OP_CLOSE, close_payload(code, reason)))
        self._guard(self._update)

    def _arm_close_timer(self) -> None:
        if self._close_timer is None and not self.finished:
            self._close_timer = self.loop.timer(CLOSE_TIMEOUT)
            self._close_timer.start(self._guard, self._finish)

    def _lost(self, why: Optional[str]) -> None:
        if why and not self.closing:
            log.info("%s: %s", self.label, why)
            self.close_code, self.close_reason = 1006, why
        self._drop_streams(why or "tunnel closed")
        self._finish()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self._drop_streams("tunnel closed")
        for watcher in (self.reader, self.writer, self._tick, self._close_timer):
            if watcher is not None:
                watcher.stop()
                watcher.close()
        self._close_timer = None
        try:
            self.sock.close()
        except OSError:
            pass
        self.on_finish(self)
