"""websocktunnel's multiplexing protocol (wsmux), the server's end, without I/O.

websocktunnel's clients (``wst-client``, taskcluster's Go client library)
carry many streams over one WebSocket in this framing.  Every binary
WebSocket message is exactly one frame: a 5-byte header (type u8, stream id
u32 *little-endian*) and a payload that runs to the end of the message (no
length field):

====  ====  ===========================================================
type  name  payload
====  ====  ===========================================================
0     DAT   the stream's bytes
1     SYN   empty: the server opens a stream (even ids)
2     ACK   u32 little-endian: the first ACK of a stream accepts it and
            says how many bytes the receiver buffers; later ones return
            that many bytes of credit (consumed by the reader)
3     FIN   empty: the sender sends no more on this stream
====  ====  ===========================================================

The client accepts a SYN with ``ACK(buffer)`` and takes for granted that
the server buffers as much as it does (wst-client: 1024 bytes), so right
after that ACK this end grants the rest of its own window with an ACK of
the difference.  The client's buffer is a hard limit (more than it holds
kills its stream), so DAT toward it never exceeds its credit.

``WsmuxConnection`` offers what protocol/mux.py's ``Connection(role=
"server")`` offers the tunnel's Link (the same operations, the same
events), so a Link drives either.  What wsmux lacks is mapped:

* no RESET: ``reset_stream`` sends FIN and keeps the stream as abandoned
  until the client's FIN; what the client still sends is dropped and
  acknowledged at once, so its writer is never left waiting for credit;
* no refusal: a service the client cannot reach shows as a stream
  accepted and ended at once (a FIN before the ACK is taken as REFUSED);
* no mux ping and no GOAWAY: ``websocket_pings`` tells the Link to ping
  with WebSocket ping frames (the client answers those, and pings every
  20 s itself); ``go_away`` only stops new streams.

Violations (a short header, an unknown type, a SYN from the client, an ACK
that is not 4 bytes, DAT past the credit granted or after FIN, a frame for
a stream never opened) raise ``MuxProtocolError`` (close 1002).
"""

import struct
from collections import OrderedDict, deque
from typing import Deque, Dict, List, Optional

from websockify.protocol.mux import (DEFAULT_WINDOW, MAX_CREDIT, Buffer, DataReceived,
                                     MuxProtocolError, ResetCode, SendWindowOpened,
                                     StreamAccepted, StreamClosed, StreamEnded,
                                     StreamLimitError, StreamReset, StreamTable,
                                     take_queued)

HEADER = struct.Struct("<BI")
HEADER_SIZE = HEADER.size
DAT, SYN, ACK, FIN = 0, 1, 2, 3
#: The largest DAT frame this end sends (the client's credit bounds it first).
MAX_DATA = 16384
MAX_STREAM_ID = 2 ** 32 - 2
#: The WebSocket header the client's requests carry, and the 101's answer.
ID_HEADER = "x-websocktunnel-id"
URL_HEADER = "x-websocktunnel-client-url"

_U32 = struct.Struct("<I")
_NAMES = {DAT: "DAT", SYN: "SYN", ACK: "ACK", FIN: "FIN"}


def encode_frame(frame_type: int, stream_id: int, payload: Buffer = b"") -> bytes:
    """One frame, i.e. one message's payload (no limits checked: tests build bad ones)."""
    return HEADER.pack(frame_type, stream_id) + bytes(payload)


def ack_payload(n: int) -> bytes:
    return _U32.pack(n)


class _Stream:
    """One stream's state inside a WsmuxConnection."""

    __slots__ = ("id", "established", "credit", "recv_window", "to_credit", "out",
                 "out_offset", "queued", "fin_queued", "fin_sent", "remote_fin", "abandoned")

    def __init__(self, stream_id: int):
        self.id = stream_id
        self.established = False        # the client's first ACK came
        self.credit = 0                 # bytes we may still queue toward the client
        self.recv_window = 0            # bytes the client may still send us
        self.to_credit = 0              # consumed bytes not yet returned as ACK
        self.out: Deque[Buffer] = deque()
        self.out_offset = 0
        self.queued = 0
        self.fin_queued = False
        self.fin_sent = False
        self.remote_fin = False
        self.abandoned = False          # reset here: waiting for the client's FIN


class WsmuxConnection(StreamTable):
    """The server's end of a wsmux session, sans I/O (the Link's codec for wst-client)."""

    role = "server"
    is_server = True
    #: Liveness is WebSocket ping frames: wsmux has no ping of its own.
    websocket_pings = True

    def __init__(self, window: int = DEFAULT_WINDOW, max_streams: int = 256,
                 max_pending_opens: int = 64):
        if not 0 < window <= MAX_CREDIT:
            raise ValueError("window must be in 1..%d" % MAX_CREDIT)
        self.window = window
        self.max_streams = max_streams
        self.max_pending_opens = max_pending_opens
        # A DAT frame is at most our window (the client's credit), one per message.
        self.max_message = HEADER_SIZE + window
        self._streams: Dict[int, _Stream] = {}
        self._pending: set = set()
        self._control: List[bytes] = []
        self._ready: "OrderedDict[int, _Stream]" = OrderedDict()
        self._last_id = 0
        self.going_away = False
        self.peer_going_away = False    # wsmux cannot say so; kept for the Link
        self.bytes_in = 0
        self.bytes_out = 0

    # -- counters ---------------------------------------------------------

    def is_open(self, stream_id: int) -> bool:
        stream = self._streams.get(stream_id)
        return stream is not None and not stream.abandoned

    # -- receiving --------------------------------------------------------

    def receive_message(self, payload: Buffer, borrow: bool = False) -> list:
        """Handle one binary WebSocket message (one frame); returns the events.

        ``borrow`` is accepted for the same call as mux.Connection's and
        changes nothing: a wsmux DATA body is always copied (DataReceived)."""
        view = memoryview(payload)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if len(view) < HEADER_SIZE:
            raise MuxProtocolError("wsmux frame of %d bytes (the header is %d)"
                                   % (len(view), HEADER_SIZE))
        frame_type, stream_id = HEADER.unpack_from(view)
        body = view[HEADER_SIZE:]
        events: list = []
        if frame_type == DAT:
            self._receive_data(stream_id, body, events)
        elif frame_type == ACK:
            if len(body) != 4:
                raise MuxProtocolError("wsmux ACK of %d bytes (must be 4) on stream %d"
                                       % (len(body), stream_id))
            self._receive_ack(stream_id, _U32.unpack_from(body)[0], events)
        elif frame_type == FIN:
            if len(body):
                raise MuxProtocolError("wsmux FIN with a %d-byte payload on stream %d"
                                       % (len(body), stream_id))
            self._receive_fin(stream_id, events)
        elif frame_type == SYN:
            raise MuxProtocolError("wsmux SYN from the agent (only the server opens streams)")
        else:
            raise MuxProtocolError("unknown wsmux frame type %d" % frame_type)
        return events

    def _known(self, stream_id: int, name: str) -> Optional[_Stream]:
        """The stream, or None for one recently closed (ignored); never opened: an error."""
        stream = self._streams.get(stream_id)
        if stream is None and (stream_id & 1 or stream_id == 0 or stream_id > self._last_id):
            raise MuxProtocolError("wsmux %s for stream %d, never opened" % (name, stream_id))
        return stream

    def _receive_data(self, stream_id: int, body: memoryview, events: list) -> None:
        stream = self._known(stream_id, "DAT")
        if stream is None:
            return
        n = len(body)
        if stream.remote_fin:
            raise MuxProtocolError("wsmux DAT after FIN on stream %d" % stream_id)
        if not stream.established:
            raise MuxProtocolError("wsmux DAT before the stream's ACK on stream %d" % stream_id)
        if n > stream.recv_window:
            raise MuxProtocolError("wsmux DAT of %d bytes over the credit granted (%d) "
                                   "on stream %d" % (n, stream.recv_window, stream_id))
        if not n:
            return
        if stream.abandoned:
            # Nobody reads it: hand the credit straight back so the client's
            # writer moves on (to see our FIN and close its side).
            self._control.append(HEADER.pack(ACK, stream_id) + _U32.pack(n))
            return
        stream.recv_window -= n
        self.bytes_in += n
        events.append(DataReceived(stream_id, bytes(body)))

    def _receive_ack(self, stream_id: int, increment: int, events: list) -> None:
        stream = self._known(stream_id, "ACK")
        if stream is None:
            return
        if not stream.established:
            # The accept: the client buffers ``increment`` bytes and assumes we do too.
            if increment > self.window:
                raise MuxProtocolError("wsmux stream buffer of %d bytes (over %d) on stream %d"
                                       % (increment, self.window, stream_id))
            stream.established = True
            stream.credit = increment
            stream.recv_window = self.window
            self._pending.discard(stream_id)
            if stream.abandoned:
                stream.fin_sent = True
                self._control.append(HEADER.pack(FIN, stream_id))
                return
            if self.window > increment:
                self._control.append(HEADER.pack(ACK, stream_id)
                                     + _U32.pack(self.window - increment))
            events.append(StreamAccepted(stream_id))
            if stream.out or stream.fin_queued:
                self._ready[stream_id] = stream
            return
        if stream.abandoned or not increment:
            return
        credit = stream.credit + increment
        if credit > MAX_CREDIT:
            raise MuxProtocolError("wsmux ACK overflows the credit of stream %d" % stream_id)
        stream.credit = credit
        if not stream.fin_queued:
            events.append(SendWindowOpened(stream_id, credit))

    def _receive_fin(self, stream_id: int, events: list) -> None:
        stream = self._known(stream_id, "FIN")
        if stream is None:
            return
        if stream.remote_fin:
            raise MuxProtocolError("wsmux second FIN on stream %d" % stream_id)
        if stream.abandoned:
            self._forget(stream)
            return
        if not stream.established:
            self._forget(stream)
            events.append(StreamReset(stream_id, ResetCode.REFUSED,
                                      "the agent closed the stream before accepting it"))
            events.append(StreamClosed(stream_id))
            return
        stream.remote_fin = True
        events.append(StreamEnded(stream_id))
        if stream.fin_sent:
            self._forget(stream)
            events.append(StreamClosed(stream_id))

    # -- the application's operations -------------------------------------

    def open_stream(self, meta: Optional[dict] = None) -> int:
        """Queue a SYN; returns the new (even) id or raises StreamLimitError.

        ``meta`` is accepted for the Link's sake and not sent: a SYN carries nothing.
        """
        if self.going_away:
            raise StreamLimitError("the tunnel is going away", ResetCode.GOING_AWAY)
        if len(self._streams) >= self.max_streams:
            raise StreamLimitError("stream limit (%d) reached" % self.max_streams)
        if len(self._pending) >= self.max_pending_opens:
            raise StreamLimitError("pending-open limit (%d) reached" % self.max_pending_opens)
        # Id 0 is left out: the Link's users take 0 for "not opened yet".
        stream_id = self._last_id + 2
        if stream_id > MAX_STREAM_ID:
            raise StreamLimitError("stream ids exhausted")
        self._last_id = stream_id
        self._streams[stream_id] = _Stream(stream_id)
        self._pending.add(stream_id)
        self._control.append(HEADER.pack(SYN, stream_id))
        return stream_id

    def send_window(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        if stream is None or stream.fin_queued or stream.abandoned:
            return 0
        # Before the accept the client's buffer is unknown: nothing is read for it.
        return stream.credit

    def send_data(self, stream_id: int, data: Buffer) -> int:
        """Queue up to ``send_window`` bytes of ``data``; returns how many were taken."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.abandoned:
            raise ValueError("stream %d is not open" % stream_id)
        if stream.fin_queued:
            raise ValueError("stream %d already ended" % stream_id)
        return self._queue_data(stream, data)

    def consumed(self, stream_id: int, n: int) -> None:
        """The application wrote ``n`` received bytes: ACK them, batched."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_fin or stream.abandoned or n <= 0:
            return
        due = self._credit_due(stream, n)
        if due:
            self._control.append(HEADER.pack(ACK, stream_id) + _U32.pack(due))

    def end_stream(self, stream_id: int) -> None:
        """Queue FIN after the data already queued (half-close)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.fin_queued or stream.abandoned:
            return
        self._queue_fin(stream)

    def reset_stream(self, stream_id: int, code: int = ResetCode.CANCEL,
                     reason: str = "") -> None:
        """No RESET in wsmux: drop the queued data, send FIN, ignore the rest.

        ``code`` and ``reason`` cannot be told to the client.
        """
        stream = self._streams.get(stream_id)
        if stream is None or stream.abandoned:
            return
        stream.out.clear()
        stream.queued = 0
        self._ready.pop(stream_id, None)
        self._pending.discard(stream_id)
        # Before its ACK the client may not have the stream yet (it takes a
        # SYN in a goroutine of its own): the FIN waits for the ACK.
        if stream.established and not stream.fin_sent:
            stream.fin_sent = True
            self._control.append(HEADER.pack(FIN, stream_id))
        if stream.remote_fin:
            self._forget(stream)
        else:
            stream.abandoned = True

    def ping(self, payload: bytes) -> None:
        raise ValueError("wsmux has no ping frame: ping with a WebSocket ping")

    def go_away(self, code: int = 0, reason: str = "") -> None:
        """No new streams from now on (wsmux cannot tell the client)."""
        self.going_away = True

    # -- sending ----------------------------------------------------------

    def has_data_to_send(self) -> bool:
        return bool(self._control or self._ready)

    def data_to_send(self, max_bytes: Optional[int] = None) -> List[bytes]:
        """The message payloads to send, in order: one frame each.

        Control frames (SYN, ACK, the FIN of a reset) first, then DAT
        round-robin across streams (each stream's FIN behind its data), at
        most ``MAX_DATA`` bytes a frame; with ``max_bytes`` it stops once
        about that many bytes are packed.
        """
        messages = self._control
        self._control = []
        size = sum(len(message) for message in messages)
        ready = self._ready
        while ready:
            if max_bytes is not None and size >= max_bytes:
                break
            stream_id, stream = ready.popitem(last=False)
            out = stream.out
            if out:
                parts: list = []
                n = take_queued(stream, MAX_DATA, parts)
                messages.append(HEADER.pack(DAT, stream_id) + b"".join(parts))
                size += HEADER_SIZE + n
                stream.queued -= n
                self.bytes_out += n
                if out:
                    ready[stream_id] = stream
                    continue
            if stream.fin_queued and not stream.fin_sent:
                messages.append(HEADER.pack(FIN, stream_id))
                size += HEADER_SIZE
                stream.fin_sent = True
                if stream.remote_fin:
                    self._forget(stream)
        return messages
