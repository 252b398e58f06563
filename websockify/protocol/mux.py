"""The reverse-tunnel multiplexing protocol (websockify-tunnel.v1), without I/O.

One WebSocket between the server and an agent carries many streams.  Every
binary WebSocket message holds one or more whole frames (a frame never spans
messages) and is at most what its receiver announced in the upgrade
(MESSAGE_HEADER), else DEFAULT_MESSAGE bytes; a frame is a 7-byte header
``!BIH`` (type u8, stream u32, payload length u16) and its payload:

====  ========  ======  ==================================================
type  name      stream  payload
====  ========  ======  ==================================================
0x01  OPEN      new id  UTF-8 JSON object, <= 1024 bytes (``face``, ``peer``)
0x02  OPEN_OK   id      empty
0x03  DATA      id      1..16384 bytes (``MAX_DATA``)
0x04  CREDIT    id      u32 increment (``!I``), > 0
0x05  FIN       id      empty: no more DATA from the sender (half-close)
0x06  RESET     id      u16 code (``ResetCode``) + UTF-8 reason, <= 123 bytes
0x07  PING      0       8 opaque bytes
0x08  PONG      0       the 8 bytes of the PING
0x09  GOAWAY    0       u16 code + UTF-8 reason: no new streams, closing soon
====  ========  ======  ==================================================

Only the server opens streams (users arrive there): odd ids, increasing,
never reused.  The server sends no DATA on a stream before its OPEN_OK.
Each direction of each stream has a credit window (``DEFAULT_WINDOW``,
256 KiB, unless both ends announced theirs in the upgrade: WINDOW_HEADER;
then each receives up to its own ``window`` and sends up to the other's
``peer_window``): a sender has at most that many bytes of DATA unacknowledged, and
the receiver returns CREDIT as its application *consumes* the data (writes
it to its socket), batched once a quarter of the window is consumed, and
may grant more to grow the window (``_credit_due``).  A user who stops
reading therefore stops only their own stream.

Memory bound: ``Connection`` queues at most its window bytes per stream in
each direction (``send_data`` takes no more than the credit it has, and a
peer sending past the window is a protocol error).  A stream's receive
window may grow while its consumer keeps up (``max_window``,
``growth_budget``: see ``Connection._credit_due``), so per agent at most
``2 * (max_streams * window + growth_budget)`` bytes (192 MiB at the
defaults with GROWTH_BUDGET, 576 MiB with LARGE_WINDOW; typical use is far
less, since a window is only full while its reader is stalled).  The
control queue holds what the application asked for plus one PONG: pings
from a peer that does not read are answered once, for the latest.

``Connection`` turns received messages into events and queues the frames the
application asks for; ``data_to_send`` packs them into message payloads:
control frames first, then DATA round-robin across streams, each DATA frame
at most 16 KiB so control frames never wait behind bulk data.  ``Liveness``
decides from the ``now`` its caller passes when to ping and when the peer
is dead.  Violations raise ``MuxProtocolError`` (close code 1002).
"""

import json
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass
from enum import IntEnum
from typing import Deque, Dict, List, Optional, Union

from websockify.errors import ProtocolError

HEADER = struct.Struct("!BIH")
HEADER_SIZE = HEADER.size
MAX_DATA = 16384
DEFAULT_WINDOW = 262144
SUBPROTOCOL = "websockify-tunnel.v1"
#: In an agent's upgrade request: "http" when its service speaks HTTP (websockify-agent --http).
SERVICE_HEADER = "X-Websockify-Service"
#: In the server's 101 to an agent with an HTTP face: the viewers' URL.
VIEWER_URL_HEADER = "X-Websockify-Viewer-URL"
#: In an agent's upgrade and the server's 101: the sender's receive window per
#: stream.  Both present: each side uses its own as its receive window and the
#: other's as its send credit; otherwise both keep DEFAULT_WINDOW.
WINDOW_HEADER = "X-Websockify-Window"
#: The window websockify's agent and server announce (a window round trip
#: between two processes is what limits one stream: 1 MiB carries about 1.6
#: times what 256 KiB does on loopback; more adds nothing there).
LARGE_WINDOW = 1048576
#: In the server's 101 (and an agent's upgrade): the largest message the
#: sender accepts.  Absent: DEFAULT_MESSAGE.  The other side then sends
#: messages up to that size (each still whole frames of at most MAX_DATA).
MESSAGE_HEADER = "X-Websockify-Max-Message"
#: What a receiver that announces nothing accepts: four full DATA frames.
DEFAULT_MESSAGE = 4 * (MAX_DATA + HEADER_SIZE)
#: What websockify's server announces to its agents: sixteen full DATA
#: frames, so a bulk stream costs the agent's masking and the server's
#: parsing a quarter as many messages (the agent reads 1 MiB at a time).
LARGE_MESSAGE = 16 * (MAX_DATA + HEADER_SIZE)
#: The largest message an announcement may name (a sender packs no more).
MAX_MESSAGE = 1048576 + 64 * HEADER_SIZE
#: How far websockify's agent and server let a stream's receive window grow
#: while its consumer keeps up (Connection._credit_due), and by how much all
#: the streams of one connection may have grown together.  Larger reads and
#: fewer CREDIT frames per byte: a bulk stream costs less CPU per byte.
GROWN_WINDOW = 8 * 1048576
GROWTH_BUDGET = 32 * 1048576
MIN_WINDOW = 65536
MAX_WINDOW = 16 * 1048576
MAX_OPEN_META = 1024
MAX_REASON = 123
PING_SIZE = 8
MAX_CREDIT = 2 ** 31 - 1
MAX_STREAM_ID = 2 ** 32 - 1
# A message must hold the largest control frame (an OPEN).
MIN_MESSAGE = HEADER_SIZE + MAX_OPEN_META

_CREDIT = struct.Struct("!I")
_CODE = struct.Struct("!H")

Buffer = Union[bytes, bytearray, memoryview]


class FrameType(IntEnum):
    OPEN = 1
    OPEN_OK = 2
    DATA = 3
    CREDIT = 4
    FIN = 5
    RESET = 6
    PING = 7
    PONG = 8
    GOAWAY = 9


class ResetCode(IntEnum):
    CANCEL = 1       # the user/service side went away
    REFUSED = 2      # the agent's service refused the connection
    TIMEOUT = 3      # the service did not answer in time
    LIMIT = 4        # past max_streams / max_pending_opens
    PROTOCOL = 5
    INTERNAL = 6
    GOING_AWAY = 7


# Plain ints on the per-frame path (IntEnum comparisons are slower).
_OPEN, _OPEN_OK, _DATA, _CREDIT_T, _FIN, _RESET, _PING, _PONG, _GOAWAY = range(1, 10)


class MuxProtocolError(ProtocolError):
    """The peer broke the mux protocol: the WebSocket is closed with 1002."""

    close_code = 1002


class StreamLimitError(Exception):
    """``open_stream`` refused locally; the user's stream gets ``code``."""

    def __init__(self, reason: str, code: ResetCode = ResetCode.LIMIT):
        super().__init__(reason)
        self.reason = reason
        self.code = code


# Events returned by Connection.receive_message.

@dataclass(frozen=True)
class StreamOpened:
    """Agent side: the server asks for a stream (answer accept_stream or reset_stream)."""
    stream_id: int
    meta: dict


@dataclass(frozen=True)
class StreamAccepted:
    """Server side: OPEN_OK arrived; queued DATA now flows."""
    stream_id: int


@dataclass(frozen=True)
class DataReceived:
    """Bytes for the application; it calls ``consumed(stream_id, len)`` once written."""
    stream_id: int
    data: bytes


@dataclass(frozen=True)
class DataViewsReceived:
    """DATA as views of the message given to ``receive_message(..., borrow=True)``:
    one run of a stream's consecutive DATA frames, uncopied (``size`` bytes in
    all).  The views are valid only while that message's buffer is: the
    application copies what it has not written before the buffer is reused."""
    stream_id: int
    views: list
    size: int


@dataclass(frozen=True)
class SendWindowOpened:
    """Credit arrived: the application may send (resume reading its socket)."""
    stream_id: int
    window: int


@dataclass(frozen=True)
class StreamEnded:
    """The peer sent FIN: it sends no more DATA on this stream."""
    stream_id: int


@dataclass(frozen=True)
class StreamReset:
    stream_id: int
    code: ResetCode
    reason: str


@dataclass(frozen=True)
class StreamClosed:
    """The peer's FIN or RESET completed the stream: it is forgotten.

    After a FIN, what the peer sent is still the application's to deliver
    (bytes it has not written yet stay valid; no credit is owed for them).
    When the application's own ``end_stream`` (after the peer's FIN) or
    ``reset_stream`` completes it, no event is reported: it knows.
    """
    stream_id: int


@dataclass(frozen=True)
class PongReceived:
    payload: bytes


@dataclass(frozen=True)
class GoAwayReceived:
    code: int
    reason: str


def encode_frame(frame_type: int, stream_id: int, payload: Buffer = b"") -> bytes:
    """One frame: header and payload (no limits checked: tests build bad ones too)."""
    return HEADER.pack(frame_type, stream_id, len(payload)) + bytes(payload)


def _announced_size(text: Optional[str], low: int, high: int) -> Optional[int]:
    """A byte count announced in a header: ASCII digits for a value in low..high, else None."""
    text = (text or "").strip()
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        return None
    size = int(text)
    return size if low <= size <= high else None


def parse_window(text: Optional[str]) -> Optional[int]:
    """An announced window (WINDOW_HEADER's value): bytes in MIN_WINDOW..MAX_WINDOW, else None."""
    return _announced_size(text, MIN_WINDOW, MAX_WINDOW)


def parse_max_message(text: Optional[str]) -> Optional[int]:
    """An announced message size (MESSAGE_HEADER's value): bytes in
    DEFAULT_MESSAGE..MAX_MESSAGE, else None (the sender keeps DEFAULT_MESSAGE)."""
    return _announced_size(text, DEFAULT_MESSAGE, MAX_MESSAGE)


def parse_frames(message: Buffer) -> List[tuple]:
    """Split one message into (type, stream, payload bytes) without judging them."""
    view = memoryview(message).cast("B")
    frames = []
    pos = 0
    end = len(view)
    while pos < end:
        if end - pos < HEADER_SIZE:
            raise MuxProtocolError("truncated frame header (%d bytes)" % (end - pos))
        frame_type, stream_id, length = HEADER.unpack_from(view, pos)
        start = pos + HEADER_SIZE
        pos = start + length
        if pos > end:
            raise MuxProtocolError("frame of %d bytes runs past the end of its message" % length)
        frames.append((frame_type, stream_id, bytes(view[start:pos])))
    return frames


def _reason_bytes(reason: str) -> bytes:
    encoded = reason.encode("utf-8")[:MAX_REASON]
    # Cut at a character boundary: the peer must be able to decode it.
    return encoded.decode("utf-8", "ignore").encode("utf-8")


def _decode_reason(payload: memoryview, what: str) -> str:
    if len(payload) > MAX_REASON:
        raise MuxProtocolError("%s reason over %d bytes" % (what, MAX_REASON))
    try:
        return str(payload, "utf-8")
    except UnicodeDecodeError:
        raise MuxProtocolError("%s reason is not valid UTF-8" % what) from None


class _Stream:
    """One stream's state inside a Connection."""

    __slots__ = ("id", "established", "credit", "recv_window", "to_credit", "out",
                 "out_offset", "queued", "fin_queued", "fin_sent", "remote_fin", "window",
                 "kept_up")

    def __init__(self, stream_id: int, window: int, established: bool,
                 peer_window: Optional[int] = None):
        self.id = stream_id
        self.established = established  # OPEN_OK sent (agent) or received (server)
        # bytes we may still queue: the peer's receive window
        self.credit = window if peer_window is None else peer_window
        self.recv_window = window       # bytes the peer may still send us
        self.window = window            # our receive window now (it may grow)
        self.kept_up = 0                # bytes returned while the consumer kept up
        self.to_credit = 0              # consumed bytes not yet returned as CREDIT
        self.out: Deque[Buffer] = deque()   # queued DATA, in order
        self.out_offset = 0             # bytes of out[0] already framed
        self.queued = 0                 # bytes in out not yet framed
        self.fin_queued = False         # end_stream called: FIN after the queued data
        self.fin_sent = False
        self.remote_fin = False


class StreamTable:
    """What every tunnel codec keeps of its streams: the table, the unanswered
    opens, the streams ready to send (``_streams``, ``_pending``, ``_ready``,
    set up by the subclass), and the counters the Link reads."""

    _streams: dict
    _pending: set
    _ready: "OrderedDict"

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def pending_opens(self) -> int:
        return len(self._pending)

    def _forget(self, stream) -> None:
        del self._streams[stream.id]
        self._pending.discard(stream.id)
        self._ready.pop(stream.id, None)
        stream.out.clear()

    def _queue_data(self, stream, data: Buffer) -> int:
        """Queue what the stream's credit allows of ``data``; how many bytes."""
        n = len(data)
        credit = stream.credit
        if n > credit:
            n = credit
            data = data[:n]
        if not n:
            return 0
        stream.credit = credit - n
        stream.queued += n
        stream.out.append(data if type(data) is bytes else bytes(data))
        if stream.established:
            self._ready[stream.id] = stream
        return n

    def _credit_due(self, stream, n: int) -> int:
        """``n`` more bytes consumed: the credit to return now (0: batched for later)."""
        return self._take_credit(stream, n, self.window)

    @staticmethod
    def _take_credit(stream, n: int, window: int) -> int:
        """``n`` more bytes consumed of a stream whose receive window is ``window``:
        what they and those before them return once a quarter of it is due, else 0."""
        pending = stream.to_credit + n
        if pending + stream.recv_window > window:
            raise ValueError("consumed %d bytes more than received on stream %d"
                             % (pending + stream.recv_window - window, stream.id))
        if pending < max(1, window >> 2):
            stream.to_credit = pending
            return 0
        stream.recv_window += pending
        stream.to_credit = 0
        return pending

    def _queue_fin(self, stream) -> None:
        stream.fin_queued = True
        if stream.established:
            self._ready[stream.id] = stream


def _data_event(stream_id: int, run: list, size: int, borrow: bool):
    if borrow:
        return DataViewsReceived(stream_id, run, size)
    return DataReceived(stream_id, b"".join(run))


class Connection(StreamTable):
    """One end (``"server"`` or ``"agent"``) of a mux connection, sans I/O."""

    def __init__(self, role: str, window: int = DEFAULT_WINDOW, max_streams: int = 256,
                 max_pending_opens: int = 64, max_message: int = DEFAULT_MESSAGE,
                 peer_window: Optional[int] = None, max_window: Optional[int] = None,
                 growth_budget: int = 0):
        if role not in ("server", "agent"):
            raise ValueError("role must be 'server' or 'agent', not %r" % (role,))
        if not 0 < window <= MAX_CREDIT:
            raise ValueError("window must be in 1..%d" % MAX_CREDIT)
        if max_message < MIN_MESSAGE:
            raise ValueError("max_message must be at least %d bytes" % MIN_MESSAGE)
        self.role = role
        self.is_server = role == "server"
        self.window = window
        #: The peer's receive window: our initial send credit per stream.
        self.peer_window = window if peer_window is None else peer_window
        if not 0 < self.peer_window <= MAX_CREDIT:
            raise ValueError("peer_window must be in 1..%d" % MAX_CREDIT)
        #: A stream's receive window may grow up to this (GROWN_WINDOW), while
        #: the connection's streams together have grown by at most growth_budget.
        self.max_window = window if max_window is None else max_window
        if not window <= self.max_window <= MAX_WINDOW:
            raise ValueError("max_window must be in window..%d" % MAX_WINDOW)
        if growth_budget < 0:
            raise ValueError("growth_budget must not be negative")
        self.growth_budget = growth_budget
        self.grown = 0                  # bytes the open streams' windows have grown by
        self.max_streams = max_streams
        self.max_pending_opens = max_pending_opens
        self.max_message = max_message
        self._frame_max = min(MAX_DATA, max_message - HEADER_SIZE)
        self._streams: Dict[int, _Stream] = {}
        self._pending: set = set()      # ids opened, not yet answered
        self._control: List[bytes] = []
        self._pong: Optional[bytes] = None  # the answer to the latest PING
        # Streams with DATA or a FIN to send, oldest first (round-robin).
        self._ready: "OrderedDict[int, _Stream]" = OrderedDict()
        self._last_id = 0               # highest id opened (server) or seen (agent)
        self.going_away = False         # we sent GOAWAY
        self.peer_going_away = False    # the peer sent GOAWAY
        self.bytes_in = 0               # DATA payload bytes received
        self.bytes_out = 0              # DATA payload bytes framed for sending

    # -- counters ---------------------------------------------------------

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    # -- receive windows ----------------------------------------------------

    def _credit_due(self, stream, n: int) -> int:
        """``n`` more bytes consumed: the credit to return now (0: batched for
        later), including any growth of the stream's window.

        Credit goes back once a quarter of the stream's window is consumed.
        A stream whose consumer keeps up (at most a quarter of its window
        received and not yet consumed each time credit goes back) for a whole
        window doubles its window, up to ``max_window`` and within the
        connection's ``growth_budget``: a bulk stream then needs fewer CREDIT
        frames and wake-ups per byte, while a consumer slower than its sender
        (or stalled) never grows its window.  The growth is plain extra
        credit: a peer sees nothing else.
        """
        window = stream.window
        pending = self._take_credit(stream, n, window)
        if not pending or window >= self.max_window:
            return pending
        if window - stream.recv_window > window >> 2:
            stream.kept_up = 0      # the consumer is behind: no growth
            return pending
        stream.kept_up += pending
        if stream.kept_up < window:
            return pending
        stream.kept_up = 0
        grow = min(window, self.max_window - window, self.growth_budget - self.grown)
        if grow <= 0:
            return pending
        stream.window = window + grow
        stream.recv_window += grow
        self.grown += grow
        return pending + grow

    def _forget(self, stream) -> None:
        self.grown -= stream.window - self.window
        super()._forget(stream)

    # -- receiving --------------------------------------------------------

    def receive_message(self, payload: Buffer, borrow: bool = False) -> list:
        """Handle one binary WebSocket message; returns the events, in order.

        A stream's consecutive DATA frames become one event: DataReceived with
        their bytes joined, or, when ``borrow``, DataViewsReceived with views of
        ``payload`` (no copy; the caller keeps them no longer than the buffer).
        """
        view = memoryview(payload)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        end = len(view)
        if not end:
            raise MuxProtocolError("empty message")
        events: list = []
        streams = self._streams
        unpack = HEADER.unpack_from
        run_id = 0          # consecutive DATA of one stream become one event
        run: list = []
        run_size = 0
        pos = 0
        while pos < end:
            if end - pos < HEADER_SIZE:
                raise MuxProtocolError("truncated frame header (%d bytes)" % (end - pos))
            frame_type, stream_id, length = unpack(view, pos)
            start = pos + HEADER_SIZE
            pos = start + length
            if pos > end:
                raise MuxProtocolError("frame of %d bytes runs past the end of its message"
                                       % length)
            if frame_type == _DATA:
                if length == 0:
                    raise MuxProtocolError("empty DATA frame on stream %d" % stream_id)
                if length > MAX_DATA:
                    raise MuxProtocolError("DATA frame of %d bytes (limit %d) on stream %d"
                                           % (length, MAX_DATA, stream_id))
                stream = streams.get(stream_id)
                if stream is None:
                    self._check_closed(stream_id, "DATA")
                    continue
                if stream.remote_fin:
                    raise MuxProtocolError("DATA after FIN on stream %d" % stream_id)
                if not stream.established:
                    raise MuxProtocolError("DATA before OPEN_OK on stream %d" % stream_id)
                if length > stream.recv_window:
                    raise MuxProtocolError("DATA of %d bytes over the receive window (%d) "
                                           "on stream %d"
                                           % (length, stream.recv_window, stream_id))
                stream.recv_window -= length
                self.bytes_in += length
                if run and run_id != stream_id:
                    events.append(_data_event(run_id, run, run_size, borrow))
                    run = []
                    run_size = 0
                run_id = stream_id
                run.append(view[start:pos])
                run_size += length
                continue
            if run:
                events.append(_data_event(run_id, run, run_size, borrow))
                run = []
                run_size = 0
            self._control_frame(frame_type, stream_id, view[start:pos], events)
        if run:
            events.append(_data_event(run_id, run, run_size, borrow))
        return events

    def _check_closed(self, stream_id: int, what: str) -> None:
        """A frame for a stream not open: ignored if recently closed, else an error."""
        if stream_id == 0:
            raise MuxProtocolError("%s frame on stream 0" % what)
        if stream_id > self._last_id:
            raise MuxProtocolError("%s frame for stream %d, never opened" % (what, stream_id))

    def _control_frame(self, frame_type: int, stream_id: int, payload: memoryview,
                       events: list) -> None:
        length = len(payload)
        if frame_type == _CREDIT_T:
            if length != 4:
                raise MuxProtocolError("CREDIT frame of %d bytes (must be 4)" % length)
            increment = _CREDIT.unpack_from(payload)[0]
            if increment == 0:
                raise MuxProtocolError("CREDIT of 0 on stream %d" % stream_id)
            stream = self._streams.get(stream_id)
            if stream is None:
                self._check_closed(stream_id, "CREDIT")
                return
            credit = stream.credit + increment
            if credit > MAX_CREDIT:
                raise MuxProtocolError("CREDIT overflows the window of stream %d" % stream_id)
            stream.credit = credit
            if not stream.fin_queued:
                events.append(SendWindowOpened(stream_id, credit))
            return
        if frame_type == _PING or frame_type == _PONG:
            name = "PING" if frame_type == _PING else "PONG"
            if stream_id:
                raise MuxProtocolError("%s frame on stream %d (must be 0)" % (name, stream_id))
            if length != PING_SIZE:
                raise MuxProtocolError("%s frame of %d bytes (must be %d)"
                                       % (name, length, PING_SIZE))
            if frame_type == _PING:
                # One answer pending at most (to the latest PING): a peer
                # that pings without reading cannot grow our queue.
                self._pong = HEADER.pack(_PONG, 0, PING_SIZE) + payload
            else:
                events.append(PongReceived(bytes(payload)))
            return
        if frame_type == _OPEN:
            self._receive_open(stream_id, payload, events)
            return
        if frame_type == _OPEN_OK:
            if length:
                raise MuxProtocolError("OPEN_OK frame with a %d-byte payload" % length)
            if not self.is_server:
                raise MuxProtocolError("OPEN_OK from the server (only agents accept streams)")
            stream = self._streams.get(stream_id)
            if stream is None:
                self._check_closed(stream_id, "OPEN_OK")
                return
            if stream.established:
                raise MuxProtocolError("second OPEN_OK on stream %d" % stream_id)
            stream.established = True
            self._pending.discard(stream_id)
            events.append(StreamAccepted(stream_id))
            if stream.out or stream.fin_queued:
                self._ready[stream_id] = stream
            return
        if frame_type == _FIN:
            if length:
                raise MuxProtocolError("FIN frame with a %d-byte payload" % length)
            stream = self._streams.get(stream_id)
            if stream is None:
                self._check_closed(stream_id, "FIN")
                return
            if stream.remote_fin:
                raise MuxProtocolError("second FIN on stream %d" % stream_id)
            if not stream.established:
                raise MuxProtocolError("FIN before OPEN_OK on stream %d" % stream_id)
            stream.remote_fin = True
            events.append(StreamEnded(stream_id))
            if stream.fin_sent:
                self._forget(stream)
                events.append(StreamClosed(stream_id))
            return
        if frame_type == _RESET:
            if length < 2:
                raise MuxProtocolError("RESET frame of %d bytes (needs a code)" % length)
            raw_code = _CODE.unpack_from(payload)[0]
            try:
                code = ResetCode(raw_code)
            except ValueError:
                raise MuxProtocolError("unknown RESET code %d" % raw_code) from None
            reason = _decode_reason(payload[2:], "RESET")
            stream = self._streams.get(stream_id)
            if stream is None:
                self._check_closed(stream_id, "RESET")
                return
            self._forget(stream)
            events.append(StreamReset(stream_id, code, reason))
            events.append(StreamClosed(stream_id))
            return
        if frame_type == _GOAWAY:
            if stream_id:
                raise MuxProtocolError("GOAWAY frame on stream %d (must be 0)" % stream_id)
            if length < 2:
                raise MuxProtocolError("GOAWAY frame of %d bytes (needs a code)" % length)
            code = _CODE.unpack_from(payload)[0]
            reason = _decode_reason(payload[2:], "GOAWAY")
            self.peer_going_away = True
            events.append(GoAwayReceived(code, reason))
            return
        raise MuxProtocolError("unknown frame type %d" % frame_type)

    def _receive_open(self, stream_id: int, payload: memoryview, events: list) -> None:
        if self.is_server:
            raise MuxProtocolError("OPEN from the agent (only the server opens streams)")
        if len(payload) > MAX_OPEN_META:
            raise MuxProtocolError("OPEN frame of %d bytes (limit %d)"
                                   % (len(payload), MAX_OPEN_META))
        if not stream_id & 1:
            raise MuxProtocolError("OPEN with an even stream id %d" % stream_id)
        if stream_id <= self._last_id:
            raise MuxProtocolError("OPEN for stream %d, not above the last id %d"
                                   % (stream_id, self._last_id))
        try:
            meta = json.loads(str(payload, "utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise MuxProtocolError("OPEN payload on stream %d is not UTF-8 JSON"
                                   % stream_id) from None
        if not isinstance(meta, dict):
            raise MuxProtocolError("OPEN payload on stream %d is not a JSON object" % stream_id)
        self._last_id = stream_id
        if self.going_away:
            self._queue_reset(stream_id, ResetCode.GOING_AWAY, "going away")
            return
        if len(self._streams) >= self.max_streams:
            self._queue_reset(stream_id, ResetCode.LIMIT,
                              "agent stream limit (%d) reached" % self.max_streams)
            return
        if len(self._pending) >= self.max_pending_opens:
            self._queue_reset(stream_id, ResetCode.LIMIT,
                              "agent pending-open limit (%d) reached" % self.max_pending_opens)
            return
        self._streams[stream_id] = _Stream(stream_id, self.window, False, self.peer_window)
        self._pending.add(stream_id)
        events.append(StreamOpened(stream_id, meta))

    # -- the application's operations -------------------------------------

    def open_stream(self, meta: dict) -> int:
        """Server: queue an OPEN; returns the new id or raises StreamLimitError."""
        if not self.is_server:
            raise ValueError("only the server opens streams")
        if self.peer_going_away or self.going_away:
            raise StreamLimitError("the tunnel is going away", ResetCode.GOING_AWAY)
        if len(self._streams) >= self.max_streams:
            raise StreamLimitError("stream limit (%d) reached" % self.max_streams)
        if len(self._pending) >= self.max_pending_opens:
            raise StreamLimitError("pending-open limit (%d) reached" % self.max_pending_opens)
        stream_id = self._last_id + 2 if self._last_id else 1
        if stream_id > MAX_STREAM_ID:
            raise StreamLimitError("stream ids exhausted")
        encoded = json.dumps(meta, separators=(",", ":")).encode("utf-8")
        if len(encoded) > MAX_OPEN_META:
            raise ValueError("OPEN metadata of %d bytes (limit %d)"
                             % (len(encoded), MAX_OPEN_META))
        self._last_id = stream_id
        self._streams[stream_id] = _Stream(stream_id, self.window, False, self.peer_window)
        self._pending.add(stream_id)
        self._control.append(HEADER.pack(_OPEN, stream_id, len(encoded)) + encoded)
        return stream_id

    def accept_stream(self, stream_id: int) -> None:
        """Agent: queue OPEN_OK (the service connection is up).

        The server may have reset the stream meanwhile (``StreamReset``):
        check ``is_open`` first; a stream not open is a ValueError.
        """
        if self.is_server:
            raise ValueError("only the agent accepts streams")
        stream = self._streams.get(stream_id)
        if stream is None:
            raise ValueError("stream %d is not open" % stream_id)
        if stream.established:
            raise ValueError("stream %d already accepted" % stream_id)
        stream.established = True
        self._pending.discard(stream_id)
        self._control.append(HEADER.pack(_OPEN_OK, stream_id, 0))
        if stream.out or stream.fin_queued:
            self._ready[stream_id] = stream

    def send_window(self, stream_id: int) -> int:
        """How many bytes ``send_data`` takes now (0 for a closed or ended stream)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.fin_queued:
            return 0
        return stream.credit

    @property
    def frame_max(self) -> int:
        """The largest DATA payload this end sends (MAX_DATA, or less for small messages)."""
        return self._frame_max

    def credit_in_place(self, stream_id: int) -> int:
        """How many bytes of ``stream_id``'s DATA the caller may frame itself now
        (then ``sent_in_place``): the stream's credit when none of its bytes
        wait in the queue (they must not be overtaken); 0 when it is not
        accepted yet, ended, closed or has queued bytes (then ``send_data``)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.fin_queued or stream.out or not stream.established:
            return 0
        return stream.credit

    def sent_in_place(self, stream_id: int, n: int) -> None:
        """The caller framed ``n`` bytes of DATA for ``stream_id`` itself (at most
        ``credit_in_place``): they take the stream's credit.  The caller sends
        that message after everything ``message_parts`` has returned before
        and before anything it returns after (an accepted stream's OPEN_OK is
        queued there, and goes first)."""
        if not 0 < n <= self.credit_in_place(stream_id):
            raise ValueError("%d bytes framed in place on stream %d exceed its credit"
                             % (n, stream_id))
        self._streams[stream_id].credit -= n
        self.bytes_out += n

    def send_data(self, stream_id: int, data: Buffer) -> int:
        """Queue up to ``send_window`` bytes of ``data``; returns how many were taken.

        Before the stream is accepted the bytes wait (the server sends no
        DATA before OPEN_OK).  ``data`` is copied unless it is ``bytes``.
        """
        stream = self._streams.get(stream_id)
        if stream is None:
            raise ValueError("stream %d is not open" % stream_id)
        if stream.fin_queued:
            raise ValueError("stream %d already ended" % stream_id)
        return self._queue_data(stream, data)

    def consumed(self, stream_id: int, n: int) -> None:
        """The application wrote ``n`` received bytes: return credit, batched."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_fin or n <= 0:
            return  # closed, or the peer sends nothing more: no credit needed
        due = self._credit_due(stream, n)
        if due:
            self._control.append(HEADER.pack(_CREDIT_T, stream_id, 4) + _CREDIT.pack(due))

    def end_stream(self, stream_id: int) -> None:
        """Queue FIN after the data already queued (half-close)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.fin_queued:
            return
        self._queue_fin(stream)

    def reset_stream(self, stream_id: int, code: int, reason: str = "") -> None:
        """Queue RESET and forget the stream (its queued data is dropped)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        self._forget(stream)
        self._queue_reset(stream_id, code, reason)

    def _queue_reset(self, stream_id: int, code: int, reason: str) -> None:
        body = _CODE.pack(int(code)) + _reason_bytes(reason)
        self._control.append(HEADER.pack(_RESET, stream_id, len(body)) + body)

    def ping(self, payload: bytes) -> None:
        if len(payload) != PING_SIZE:
            raise ValueError("a PING carries exactly %d bytes" % PING_SIZE)
        self._control.append(HEADER.pack(_PING, 0, PING_SIZE) + bytes(payload))

    def go_away(self, code: int, reason: str = "") -> None:
        """Queue GOAWAY: no new streams (opens are refused from now on)."""
        self.going_away = True
        body = _CODE.pack(int(code)) + _reason_bytes(reason)
        self._control.append(HEADER.pack(_GOAWAY, 0, len(body)) + body)

    # -- sending ----------------------------------------------------------

    def has_data_to_send(self) -> bool:
        return bool(self._control or self._ready or self._pong)

    def data_to_send(self, max_bytes: Optional[int] = None) -> List[bytes]:
        """WebSocket binary message payloads to send, in order (see ``message_parts``)."""
        return [b"".join(parts) for parts, _ in self.message_parts(max_bytes)]

    def message_parts(self, max_bytes: Optional[int] = None) -> List[tuple]:
        """The messages to send as ``(parts, size)``: each message's payload is
        the concatenation of ``parts`` (bytes and views of queued data, valid
        until the next call), ``size`` bytes; for a writer that copies them
        once into its own buffer.

        Control frames come first, then DATA (and each stream's FIN behind
        its data) round-robin across streams, one frame of up to ``MAX_DATA``
        bytes per stream per turn; each message is at most ``max_message``
        bytes.  With ``max_bytes`` it stops once about that many bytes are
        packed (the rest stays queued, so control frames queued meanwhile
        are sent before it).
        """
        messages: List[tuple] = []
        limit = self.max_message
        parts: list = []
        size = 0            # bytes in parts
        sent = 0            # bytes in messages
        if self._pong is not None:
            self._control.insert(0, self._pong)
            self._pong = None
        if self._control:
            for frame in self._control:
                if size + len(frame) > limit:
                    messages.append((parts, size))
                    sent += size
                    parts = []
                    size = 0
                parts.append(frame)
                size += len(frame)
            self._control = []
        ready = self._ready
        frame_max = self._frame_max
        pack = HEADER.pack
        while ready:
            if max_bytes is not None and sent + size >= max_bytes:
                break
            stream_id, stream = ready.popitem(last=False)
            out = stream.out
            if out:
                room = limit - size - HEADER_SIZE
                # Rather than a short frame at the end of a message, a new message.
                if room < frame_max and room < stream.queued:
                    messages.append((parts, size))
                    sent += size
                    parts = []
                    size = 0
                    room = limit - HEADER_SIZE
                take = frame_max if room > frame_max else room
                header_at = len(parts)
                parts.append(b"")
                n = take_queued(stream, take, parts)
                parts[header_at] = pack(_DATA, stream_id, n)
                size += HEADER_SIZE + n
                stream.queued -= n
                self.bytes_out += n
                if out:
                    ready[stream_id] = stream
                    continue
            if stream.fin_queued and not stream.fin_sent:
                if size + HEADER_SIZE > limit:
                    messages.append((parts, size))
                    sent += size
                    parts = []
                    size = 0
                parts.append(pack(_FIN, stream_id, 0))
                size += HEADER_SIZE
                stream.fin_sent = True
                if stream.remote_fin:
                    self._forget(stream)
        if parts:
            messages.append((parts, size))
        return messages


def tunnel_connection(role: str, peer_window: Optional[int],
                      peer_max_message: Optional[int] = None) -> Connection:
    """The Connection websockify's agent and server run: LARGE_WINDOW each way
    when the peer announced its window (``peer_window``, its own), else
    DEFAULT_WINDOW; either way a stream's window grows up to GROWN_WINDOW
    within GROWTH_BUDGET.  Messages sent are at most the peer's announced
    size (``peer_max_message``), else DEFAULT_MESSAGE."""
    window = DEFAULT_WINDOW if peer_window is None else LARGE_WINDOW
    return Connection(role, window=window, peer_window=peer_window,
                      max_window=GROWN_WINDOW, growth_budget=GROWTH_BUDGET,
                      max_message=peer_max_message or DEFAULT_MESSAGE)


def take_queued(stream, take: int, parts: list) -> int:
    """Move up to ``take`` bytes of ``stream.out`` (from ``stream.out_offset``)
    into ``parts`` as bytes or views, uncopied; returns how many."""
    out = stream.out
    n = 0
    while out and n < take:
        chunk = out[0]
        offset = stream.out_offset
        left = len(chunk) - offset
        want = take - n
        if left <= want:
            parts.append(memoryview(chunk)[offset:] if offset else chunk)
            out.popleft()
            stream.out_offset = 0
            n += left
        else:
            parts.append(memoryview(chunk)[offset:offset + want])
            stream.out_offset = offset + want
            n += want
    return n


class Liveness:
    """When to ping the peer and when to declare it dead, from the ``now`` passed in.

    Silence is counted from the last message heard from the peer: a PING
    is due every ``ping_interval`` of silence, and after ``dead_after`` of
    silence the peer is dead.  ``now`` is any monotonic clock, in seconds.
    """

    __slots__ = ("ping_interval", "dead_after", "last_heard", "last_ping")

    def __init__(self, ping_interval: float = 15.0, dead_after: float = 45.0,
                 now: float = 0.0):
        if ping_interval <= 0 or dead_after <= 0:
            raise ValueError("ping_interval and dead_after must be positive")
        self.ping_interval = ping_interval
        self.dead_after = dead_after
        self.last_heard = now
        self.last_ping: Optional[float] = None   # our last PING since last_heard

    def heard(self, now: float) -> None:
        """Any message from the peer."""
        self.last_heard = now
        self.last_ping = None

    def _next_ping(self) -> float:
        base = self.last_heard if self.last_ping is None else self.last_ping
        return base + self.ping_interval

    def poll(self, now: float) -> Optional[str]:
        """``"dead"``, ``"ping"`` (send one now: counted as sent) or None."""
        if now - self.last_heard >= self.dead_after:
            return "dead"
        if now >= self._next_ping():
            self.last_ping = now
            return "ping"
        return None

    def next_deadline(self, now: float) -> float:
        """When ``poll`` has something to say next (never before ``now``)."""
        return max(now, min(self._next_ping(), self.last_heard + self.dead_after))
