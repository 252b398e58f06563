"""WebSocket frames (RFC 6455): parsing peers' frames, encoding ours, unmasking.

gevent-websocket's frame path unmasks byte by byte in Python, trusts any
64-bit length and accepts unmasked client frames, so frames are ours:

* ``unmask``: a vectorised XOR (numpy when installed, otherwise one big
  integer XOR), never a per-byte loop;
* ``FrameParser``: an incremental (sans-I/O) parser for client frames that
  checks every header against the limits *before* any payload is buffered,
  refuses unmasked frames (1002) and frames over the size limit (1009), and
  streams payload to its consumer instead of collecting whole messages;
* ``encode_frame``/``close_payload``/``parse_close_payload`` for the frames
  the server sends;
* the client side, for the tunnel agent: ``encode_client_frame`` (masked)
  and ``FrameParser(..., expect_masked=False)`` for a server's frames.
"""

import codecs
import struct
from typing import Callable, Optional, Tuple, Union

from websockify.errors import InvalidPayload, MessageTooBig, ProtocolError

try:  # numpy is an optional accelerator (the ``numpy`` extra)
    import numpy as _numpy
except ImportError:  # pragma: no cover - depends on the environment
    _numpy = None

# Opcodes (RFC 6455 5.2).
OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

MAX_CONTROL_PAYLOAD = 125
DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024

# Close codes a peer may put on the wire (RFC 6455 7.4.1 and the IANA
# registry); 1004-1006 and 1015 are reserved for local use.
_SENDABLE_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009,
                             1010, 1011, 1012, 1013, 1014))


# The pure path has no per-byte Python loop.  Larger payloads go through
# bytes.translate, one 256-byte XOR table per key byte applied to each of the
# four byte lanes (bytearray strided slices are C loops); small ones are one
# big-integer XOR, where the key repeated over the payload is the key times a
# "repunit" (a 1 every 32 bits) instead of a padded key to convert.
_XOR_TABLES = tuple(bytes(value ^ key for value in range(256)) for key in range(256))
_SMALL = 512
_REPUNIT = int.from_bytes(b"\x01\x00\x00\x00" * (_SMALL // 4), "little")


def _unmask_small(data, key: bytes) -> bytes:
    n = len(data)
    words = n >> 2
    pad = int.from_bytes(key, "little") * (_REPUNIT >> (32 * (_SMALL // 4 - words)))
    tail = n & 3
    if tail:
        pad |= int.from_bytes(key[:tail], "little") << (32 * words)
    return (int.from_bytes(data, "little") ^ pad).to_bytes(n, "little")


def unmask_pure(data: bytes, key: bytes) -> Union[bytes, bytearray]:
    """XOR ``data`` with the repeating 4-byte ``key``, without a per-byte loop."""
    n = len(data)
    if not n:
        return b""
    if n <= _SMALL:
        return _unmask_small(data, key)
    out = bytearray(data)
    tables = _XOR_TABLES
    out[0::4] = out[0::4].translate(tables[key[0]])
    out[1::4] = out[1::4].translate(tables[key[1]])
    out[2::4] = out[2::4].translate(tables[key[2]])
    out[3::4] = out[3::4].translate(tables[key[3]])
    return out


def unmask_numpy(data: bytes, key: bytes) -> bytes:
    """XOR ``data`` with ``key`` four bytes at a time with numpy."""
    n = len(data)
    if not n:
        return b""
    words = n >> 2
    out = _numpy.empty(n, dtype=_numpy.uint8)
    if words:
        _numpy.bitwise_xor(
            _numpy.frombuffer(data, dtype=_numpy.uint32, count=words),
            _numpy.frombuffer(key, dtype=_numpy.uint32)[0],
            out=out[:words * 4].view(_numpy.uint32))
    tail = n & 3
    if tail:
        out[words * 4:] = (_numpy.frombuffer(data, dtype=_numpy.uint8, offset=words * 4)
                           ^ _numpy.frombuffer(key[:tail], dtype=_numpy.uint8))
    return out.tobytes()


# Below this size the numpy call overhead costs more than it saves.
_NUMPY_THRESHOLD = _SMALL


def _unmask_auto(data: bytes, key: bytes) -> bytes:
    if len(data) >= _NUMPY_THRESHOLD:
        return unmask_numpy(data, key)
    return unmask_pure(data, key)


def unmask_into_pure(buf: bytearray, start: int, stop: int, key: bytes) -> None:
    """Unmask ``buf[start:stop]`` in place (the relay's receive buffer)."""
    n = stop - start
    if n <= 0:
        return
    if n <= _SMALL:
        buf[start:stop] = _unmask_small(memoryview(buf)[start:stop], key)
        return
    tables = _XOR_TABLES
    buf[start:stop:4] = buf[start:stop:4].translate(tables[key[0]])
    buf[start + 1:stop:4] = buf[start + 1:stop:4].translate(tables[key[1]])
    buf[start + 2:stop:4] = buf[start + 2:stop:4].translate(tables[key[2]])
    buf[start + 3:stop:4] = buf[start + 3:stop:4].translate(tables[key[3]])


def unmask_into_numpy(buf: bytearray, start: int, stop: int, key: bytes) -> None:
    """Unmask ``buf[start:stop]`` in place with numpy, four bytes at a time.

    The words XORed start at a multiple of four in ``buf`` (whose memory
    malloc aligns), the key turned to match: an unaligned uint32 view costs
    numpy about 1.6 times as much.  The bytes before the first boundary and
    after the last word are XORed one by one.
    """
    n = stop - start
    if n <= 0:
        return
    head = -start & 3
    if head > n:
        head = n
    for index in range(head):
        buf[start + index] ^= key[index]
    begin = start + head
    words = (stop - begin) >> 2
    if head:
        key = key[head:] + key[:head]
    if words:
        view = _numpy.frombuffer(buf, dtype=_numpy.uint32, count=words, offset=begin)
        _numpy.bitwise_xor(view, _numpy.frombuffer(key, dtype=_numpy.uint32)[0], out=view)
    done = begin + 4 * words
    for index in range(stop - done):
        buf[done + index] ^= key[index]


def _unmask_into_auto(buf: bytearray, start: int, stop: int, key: bytes) -> None:
    if stop - start >= _NUMPY_THRESHOLD:
        unmask_into_numpy(buf, start, stop, key)
    else:
        unmask_into_pure(buf, start, stop, key)


unmask: Callable[[bytes, bytes], bytes] = _unmask_auto if _numpy is not None else unmask_pure
unmask_into: Callable[[bytearray, int, int, bytes], None] = (
    _unmask_into_auto if _numpy is not None else unmask_into_pure)
def _header_table() -> Tuple[bytes, ...]:
    # Short unmasked FIN headers are requested for every frame sent to the
    # browser; precompute the one-byte-length ones.
    return tuple(struct.pack("!BB", 0x80 | OP_BINARY, n) for n in range(126))


_BINARY_SHORT_HEADERS = _header_table()
_PACK_16 = struct.Struct("!BBH").pack
_PACK_64 = struct.Struct("!BBQ").pack


def binary_header(length: int, opcode: int = OP_BINARY) -> bytes:
    """Header of an unmasked, final frame (the hot path of the downstream pump)."""
    if length < 126:
        if opcode == OP_BINARY:
            return _BINARY_SHORT_HEADERS[length]
        return bytes((0x80 | opcode, length))
    if length < 65536:
        return _PACK_16(0x80 | opcode, 126, length)
    return _PACK_64(0x80 | opcode, 127, length)


def frame_header(length: int, opcode: int, fin: bool) -> bytes:
    """Header of an unmasked frame that may be a fragment."""
    if fin:
        return binary_header(length, opcode)
    if length < 126:
        return bytes((opcode, length))
    if length < 65536:
        return _PACK_16(opcode, 126, length)
    return _PACK_64(opcode, 127, length)


def encode_frame(opcode: int, payload: bytes = b"") -> bytes:
    """A complete unmasked frame, as a server sends it."""
    return binary_header(len(payload), opcode) + payload


_PACK_INTO_16 = struct.Struct("!BBH4s").pack_into
_PACK_INTO_64 = struct.Struct("!BBQ4s").pack_into


def client_header_length(length: int) -> int:
    """The length of a masked client frame's header for a ``length``-byte payload."""
    return 6 if length < 126 else 8 if length < 65536 else 14


def pack_client_header(buf: bytearray, pos: int, length: int, key: bytes,
                       opcode: int = OP_BINARY) -> int:
    """Write the header of a masked final frame of ``length`` payload bytes (masking
    ``key``) into ``buf`` at ``pos``, in the shortest form; returns where the
    payload starts."""
    first = 0x80 | opcode
    if length < 126:
        buf[pos] = first
        buf[pos + 1] = 0x80 | length
        buf[pos + 2:pos + 6] = key
        return pos + 6
    if length < 65536:
        _PACK_INTO_16(buf, pos, first, 0x80 | 126, length, key)
        return pos + 8
    _PACK_INTO_64(buf, pos, first, 0x80 | 127, length, key)
    return pos + 14


def encode_client_frame(opcode: int, payload: bytes, mask_key: bytes) -> bytes:
    """A complete final frame masked with ``mask_key``, as a client sends it."""
    if len(mask_key) != 4:
        raise ValueError("a masking key is 4 bytes")
    length = len(payload)
    out = bytearray(client_header_length(length) + length)
    start = pack_client_header(out, 0, length, mask_key, opcode)
    out[start:] = payload
    # XOR is its own inverse: masking is unmasking.
    unmask_into(out, start, len(out), mask_key)
    return bytes(out)


def close_payload(code: Optional[int], reason: str = "") -> bytes:
    """Body of a close frame; ``None`` gives an empty body (no status)."""
    if code is None:
        return b""
    encoded = reason.encode("utf-8")[:MAX_CONTROL_PAYLOAD - 2]
    # Cut at a character boundary: a peer must be able to decode the reason.
    encoded = encoded.decode("utf-8", "ignore").encode("utf-8")
    return struct.pack("!H", code) + encoded


def is_valid_close_code(code: int) -> bool:
    """Whether a peer may send ``code`` in a close frame."""
    return code in _SENDABLE_CODES or 3000 <= code <= 4999


def parse_close_payload(payload: bytes) -> Tuple[Optional[int], str]:
    """Validate a received close body; returns (code or None, reason)."""
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise ProtocolError("close frame with a 1-byte body")
    code = struct.unpack("!H", payload[:2])[0]
    if not is_valid_close_code(code):
        raise ProtocolError("invalid close code %d" % code)
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidPayload("close reason is not valid UTF-8") from None
    return code, reason


_utf8_decoder = codecs.getincrementaldecoder("utf-8")

# Parser states
_HEADER = 0
_PAYLOAD = 1


class FrameParser:
    """Incremental parser for the frames a WebSocket peer sends.

    By default the peer is a client: its frames must be masked
    (``require_mask=False`` accepts both).  ``expect_masked=False`` parses a
    server's frames: they must not be masked (a masked one is a 1002).

    ``feed(data)`` consumes any amount of bytes.  Data payload is passed on
    as it arrives, unmasked, through ``on_data(chunk, opcode)`` (chunk is a
    bytes-like view, see ``feed_buffer``) where opcode
    is the message's type (text or binary) also for continuation frames;
    control frames, once complete, go to ``on_control(opcode, payload)``.
    Violations raise a ``WebSocketError`` subclass carrying its close code.
    """

    __slots__ = ("on_data", "on_control", "on_message_end", "max_frame_size", "require_mask",
                 "expect_masked", "_mask_want", "_state", "_pending", "_opcode", "_fin", "_key", "_offset",
                 "_remaining", "_message_opcode", "_control", "_text")

    def __init__(self, on_data: Callable[[bytes, int], None],
                 on_control: Callable[[int, bytes], None],
                 max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 require_mask: bool = True,
                 on_message_end: Optional[Callable[[int], None]] = None,
                 expect_masked: bool = True):
        self.on_data = on_data
        self.on_control = on_control
        self.on_message_end = on_message_end
        self.max_frame_size = max_frame_size
        self.require_mask = require_mask
        self.expect_masked = expect_masked
        # The mask bit every frame must carry (None: either): one comparison
        # on the header path.
        self._mask_want = (0x80 if require_mask else None) if expect_masked else 0
        self._state = _HEADER
        self._pending = b""          # bytes of an incomplete header
        self._opcode = 0             # opcode of the current frame
        self._fin = True
        self._key = b""              # masking key of the current frame
        self._offset = 0             # payload bytes of this frame already seen
        self._remaining = 0          # payload bytes of this frame still due
        self._message_opcode = 0     # text/binary of the open message, 0 if none
        self._control = b""          # payload of a control frame being collected
        self._text = None            # incremental UTF-8 decoder for text messages

    @property
    def in_message(self) -> bool:
        """True between the first and the final frame of a fragmented message."""
        return self._message_opcode != 0

    def feed(self, data: bytes) -> None:
        """Consume ``data``; payload chunks are views of a private copy."""
        buf = bytearray(self._pending)
        buf += data
        self._pending = b""
        self._run(buf, len(buf))

    def feed_buffer(self, buf: bytearray, n: int) -> None:
        """Consume ``buf[:n]``, unmasking payload in place.

        The chunks given to ``on_data`` are views of ``buf``: the caller must
        copy what it keeps before it reuses the buffer.
        """
        if self._pending:
            # A header was cut by the previous read: parse a private copy.
            joined = bytearray(self._pending)
            joined += memoryview(buf)[:n]
            self._pending = b""
            buf, n = joined, len(joined)
        self._run(buf, n)

    def _run(self, buf: bytearray, end: int) -> None:
        view = memoryview(buf)
        pos = 0
        while pos < end or (self._state == _PAYLOAD and self._remaining == 0):
            if self._state == _HEADER:
                consumed = self._parse_header(view, pos, end)
                if consumed == 0:
                    self._pending = bytes(view[pos:end])
                    return
                pos += consumed
                continue
            take = min(self._remaining, end - pos)
            self._payload(buf, view, pos, pos + take)
            pos += take

    def _parse_header(self, view: memoryview, pos: int, end: int) -> int:
        """Parse one header at ``pos``; returns bytes consumed, 0 if incomplete."""
        if end - pos < 2:
            return 0
        b0 = view[pos]
        b1 = view[pos + 1]
        if b0 & 0x70:
            raise ProtocolError("reserved bits set without a negotiated extension")
        opcode = b0 & 0x0F
        fin = bool(b0 & 0x80)
        masked = b1 & 0x80
        length = b1 & 0x7F
        size = 2
        if length == 126:
            size = 4
        elif length == 127:
            size = 10
        if masked:
            size += 4
        # Refuse what the first two bytes already condemn, before waiting
        # for the rest of the header.
        if opcode >= 0x8:
            if opcode > OP_PONG:
                raise ProtocolError("unknown control opcode %d" % opcode)
            if not fin:
                raise ProtocolError("fragmented control frame")
            if length > MAX_CONTROL_PAYLOAD:
                raise ProtocolError("control frame payload over 125 bytes")
        elif opcode > OP_BINARY:
            raise ProtocolError("unknown data opcode %d" % opcode)
        if masked != self._mask_want and self._mask_want is not None:
            raise ProtocolError("server frame is masked" if masked
                                else "client frame is not masked")
        if end - pos < size:
            return 0
        if length == 126:
            length = (view[pos + 2] << 8) | view[pos + 3]
        elif length == 127:
            length = int.from_bytes(view[pos + 2:pos + 10], "big")
            if length >> 63:
                raise ProtocolError("frame length has the most significant bit set")
        if length > self.max_frame_size:
            raise MessageTooBig("frame of %d bytes exceeds the limit of %d"
                                % (length, self.max_frame_size))
        if opcode == OP_CONTINUATION:
            if not self._message_opcode:
                raise ProtocolError("continuation frame with no message to continue")
        elif opcode < 0x8:
            if self._message_opcode:
                raise ProtocolError("new data frame inside a fragmented message")
            self._message_opcode = opcode
            self._text = _utf8_decoder() if opcode == OP_TEXT else None
        self._opcode = opcode
        self._fin = fin
        self._key = bytes(view[pos + size - 4:pos + size]) if masked else b""
        self._offset = 0
        self._remaining = length
        self._control = b""
        self._state = _PAYLOAD
        return size

    def _payload(self, buf: bytearray, view: memoryview, start: int, stop: int) -> None:
        n = stop - start
        if self._key:
            key = self._key
            shift = self._offset & 3
            if shift:
                key = key[shift:] + key[:shift]
            unmask_into(buf, start, stop, key)
        data = view[start:stop]
        self._offset += n
        self._remaining -= n
        done = self._remaining == 0
        opcode = self._opcode
        if opcode >= 0x8:
            self._control += bytes(data)
            if done:
                self._state = _HEADER
                self.on_control(opcode, self._control)
                self._control = b""
            return
        final = done and self._fin
        if self._text is not None:
            try:
                self._text.decode(data, final)
            except UnicodeDecodeError:
                raise InvalidPayload("text message is not valid UTF-8") from None
        message_opcode = self._message_opcode
        if done:
            self._state = _HEADER
            if self._fin:
                self._message_opcode = 0
                self._text = None
        if data or final:
            self.on_data(data, message_opcode)
        if final and self.on_message_end is not None:
            self.on_message_end(message_opcode)
