"""The agent's bulk path: a service's bytes read straight into the masked messages that send them.

A ``MessageLayout`` is one reusable buffer laid out as ``messages`` client
WebSocket binary messages, each of ``frames`` mux DATA frames of one
stream: the WebSocket header's room, then slots of a DATA header and
``frame_max`` payload bytes.  The service socket's ``recvmsg_into`` fills
the slots' payloads (``views``) in one call; ``seal`` then writes the DATA
headers and the WebSocket headers around what arrived and masks each
message's payload in place.  The bytes thus cross the agent with no copy
of its own: the kernel's copy in, one XOR pass, the kernel's copy out (the
queued path, ``Connection.send_data`` then ``mask_messages``, copies each
byte once more, into the frame buffer), and a read of up to ``capacity``
bytes (several messages) costs one system call each way.

A full message's header fills its room exactly, so full messages lie end
to end (a sendmsg of their views is one contiguous write); only the last
one, when short, can have a shorter header and a gap before it.

Pure: no sockets; the transport reads and sends.
"""

from typing import List

from websockify.protocol import mux
from websockify.protocol.frames import client_header_length, pack_client_header, unmask_into

_DATA = int(mux.FrameType.DATA)


class MessageLayout:
    """A reusable buffer of ``messages`` messages for one stream's DATA (see the module)."""

    __slots__ = ("frame_max", "frames", "messages", "per_message", "capacity", "buffer",
                 "_slot", "_room", "_span", "_payloads")

    def __init__(self, frame_max: int, frames: int, messages: int = 1):
        if frame_max <= 0 or frames <= 0 or messages <= 0:
            raise ValueError("frame_max, frames and messages must be positive")
        if frame_max > mux.MAX_DATA:
            raise ValueError("a DATA frame carries at most %d bytes" % mux.MAX_DATA)
        self.frame_max = frame_max
        self.frames = frames
        self.messages = messages
        #: The most payload bytes one message carries, and one read.
        self.per_message = frames * frame_max
        self.capacity = messages * self.per_message
        self._slot = mux.HEADER_SIZE + frame_max
        self._room = client_header_length(frames * self._slot)
        self._span = self._room + frames * self._slot
        self.buffer = bytearray(messages * self._span)
        view = memoryview(self.buffer)
        self._payloads = []
        for message in range(messages):
            first = message * self._span + self._room + mux.HEADER_SIZE
            for frame in range(frames):
                start = first + frame * self._slot
                self._payloads.append(view[start:start + frame_max])

    @classmethod
    def for_connection(cls, conn: mux.Connection, capacity: int) -> "MessageLayout":
        """A layout for ``conn`` (its frame size, the peer's largest message) holding
        about ``capacity`` payload bytes (at least one message)."""
        frame_max = conn.frame_max
        frames = max(1, conn.max_message // (mux.HEADER_SIZE + frame_max))
        return cls(frame_max, frames, max(1, capacity // (frames * frame_max)))

    def views(self, limit: int) -> List[memoryview]:
        """The payload views, in order, that a read of at most ``limit`` (> 0) bytes fills."""
        full, part = divmod(min(limit, self.capacity), self.frame_max)
        if not part:
            return self._payloads[:full]
        return self._payloads[:full] + [self._payloads[full][:part]]

    def seal(self, stream_id: int, n: int, keys: bytes) -> List[memoryview]:
        """The wire bytes of the messages that carry the ``n`` bytes (1..capacity) a
        read put into ``views``, one view per message, in order: DATA and WebSocket
        headers written in, each message masked in place with its own 4 bytes of
        ``keys`` (4 per message, ``count(n)`` messages).  Valid until the next read
        into this layout; all but a short last one lie end to end."""
        if not 0 < n <= self.capacity:
            raise ValueError("%d bytes do not fit a layout of %d" % (n, self.capacity))
        count = self.count(n)
        if len(keys) < 4 * count:
            raise ValueError("%d messages need %d key bytes" % (count, 4 * count))
        buf = self.buffer
        view = memoryview(buf)
        frame_max = self.frame_max
        slot = self._slot
        room = self._room
        pack = mux.HEADER.pack_into
        wire = []
        for message in range(count):
            carried = min(self.per_message, n - message * self.per_message)
            full, last = divmod(carried, frame_max)
            at = begin = message * self._span + room
            for _ in range(full):
                pack(buf, at, _DATA, stream_id, frame_max)
                at += slot
            if last:
                pack(buf, at, _DATA, stream_id, last)
                at += mux.HEADER_SIZE + last
            size = at - begin
            key = keys[4 * message:4 * message + 4]
            start = begin - client_header_length(size)
            pack_client_header(buf, start, size, key)
            unmask_into(buf, begin, at, key)
            wire.append(view[start:at])
        return wire

    def count(self, n: int) -> int:
        """How many messages carry ``n`` bytes."""
        return -(-n // self.per_message)
