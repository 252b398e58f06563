"""Legacy WebSocket clients: the ``base64`` subprotocol and Hixie-75/76.

Everything here is a *codec* for the relay (see ``protocol.codec.Codec``): how the
client's bytes are parsed and how target bytes are framed for it.  The HyBi
binary codec in relay.py is the fast path; these are the slow, compatible
ones, and none of them uses splice(2):

* ``Base64Codec``: HyBi (RFC 6455) frames whose payload is base64 text, the
  ``base64`` subprotocol of noVNC before 2019 and of the nginx module.
  Target bytes go out as one text message of base64 per read; what the
  client sends (text frames, binary accepted too) is decoded incrementally,
  a partial 4-character group carried across chunks and frames of one
  message.
* ``HixieCodec``: draft-hixie-thewebsocketprotocol-75 and -76 frames,
  ``0x00 <UTF-8 text> 0xFF``, the text being base64 both ways; ``0xFF 0x00``
  closes; no ping or pong.

The Hixie handshakes (draft 76's MD5 challenge from Sec-WebSocket-Key1/2 and
the 8 bytes after the head, draft 75's plain answer) are built here for the
handshake handler.
"""

import binascii
import hashlib
import re
import struct
import sys
from typing import Callable, Optional

from websockify.errors import BadRequest, InvalidPayload, MessageTooBig, ProtocolError
from websockify.protocol.codec import Codec
from websockify.protocol.frames import OP_CLOSE, OP_TEXT, FrameParser, binary_header

# -- base64 -------------------------------------------------------------------

if sys.version_info >= (3, 11):
    def _b64decode(data) -> bytes:
        """Decode whole 4-character groups; padding only in the last one."""
        return binascii.a2b_base64(data, strict_mode=True)
else:  # pragma: no cover - exercised on Python < 3.11 only
    _B64 = re.compile(rb"[A-Za-z0-9+/]*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")

    def _b64decode(data) -> bytes:
        data = bytes(data)
        if not _B64.fullmatch(data):
            raise binascii.Error("not base64")
        return binascii.a2b_base64(data)


def b64encode(data) -> bytes:
    return binascii.b2a_base64(data, newline=False)


class Base64Decoder:
    """Incremental base64 decoding of the messages a client sends.

    ``data(chunk, opcode)`` takes any piece of a message; whole 4-character
    groups are decoded and passed to ``on_data(decoded, opcode)`` at once,
    the rest is carried to the next piece.  ``message_end`` checks that the
    message ended on a group boundary.  Whitespace and characters outside
    the base64 alphabet are refused (``InvalidPayload``, close 1007), as is
    anything after a padded group in the same message.
    """

    __slots__ = ("on_data", "on_message_end", "_carry", "_padded")

    def __init__(self, on_data: Callable[[bytes, int], None],
                 on_message_end: Optional[Callable[[int], None]] = None):
        self.on_data = on_data
        self.on_message_end = on_message_end
        self._carry = b""        # the characters of an incomplete group
        self._padded = False     # the message's last group has been seen

    def data(self, chunk, opcode: int) -> None:
        if not chunk:
            return
        if self._padded:
            raise InvalidPayload("base64 data continues after padding")
        if self._carry:
            chunk = self._carry + bytes(chunk)
        whole = len(chunk) & ~3
        self._carry = bytes(chunk[whole:])
        if not whole:
            return
        if whole < len(chunk):
            chunk = chunk[:whole]
        try:
            decoded = _b64decode(chunk)
        except (binascii.Error, ValueError):
            raise InvalidPayload("message is not valid base64") from None
        if chunk[whole - 1] == 0x3D:          # "="
            self._padded = True
        self.on_data(decoded, opcode)

    def message_end(self, opcode: int) -> None:
        carry, self._carry = self._carry, b""
        self._padded = False
        if carry:
            raise InvalidPayload("base64 message ends inside a 4-character group")
        if self.on_message_end is not None:
            self.on_message_end(opcode)


class Base64Codec(Codec):
    """HyBi frames carrying base64 text (the ``base64`` subprotocol)."""

    name = "base64"
    binary = False
    splice = False

    def parser(self, on_data, on_control, on_message_end, max_frame_size):
        decoder = Base64Decoder(on_data, on_message_end)
        return FrameParser(decoder.data, on_control, max_frame_size=max_frame_size,
                           on_message_end=decoder.message_end)

    def frame(self, data) -> bytes:
        text = b64encode(data)
        return binary_header(len(text), OP_TEXT) + text


# -- Hixie frames ---------------------------------------------------------------

_TYPE = 0        # expecting a frame type byte
_TEXT = 1        # inside a 0x00 ... 0xFF frame
_CLOSING = 2     # after 0xFF, expecting the 0x00 of a close frame
_CLOSED = 3      # the close frame was received; the rest is ignored


class HixieParser:
    """Incremental parser for Hixie-75/76 client frames.

    Text between 0x00 and 0xFF is passed on as it arrives through
    ``on_data(chunk, OP_TEXT)`` (views of the buffer fed, as with
    ``FrameParser.feed_buffer``), each terminator through
    ``on_message_end(OP_TEXT)``; ``0xFF 0x00`` is ``on_control(OP_CLOSE,
    b"")``.  A frame with no terminator within ``max_frame_size`` bytes
    raises ``MessageTooBig``, any other frame type ``ProtocolError``.
    """

    __slots__ = ("on_data", "on_control", "on_message_end", "max_frame_size",
                 "_state", "_size")

    def __init__(self, on_data: Callable[[bytes, int], None],
                 on_control: Callable[[int, bytes], None],
                 max_frame_size: int,
                 on_message_end: Optional[Callable[[int], None]] = None):
        self.on_data = on_data
        self.on_control = on_control
        self.on_message_end = on_message_end
        self.max_frame_size = max_frame_size
        self._state = _TYPE
        self._size = 0           # text bytes of the current frame so far

    @property
    def in_message(self) -> bool:
        return self._state == _TEXT

    def feed(self, data: bytes) -> None:
        self.feed_buffer(bytearray(data), len(data))

    def feed_buffer(self, buf: bytearray, n: int) -> None:
        view = memoryview(buf)
        pos = 0
        while pos < n:
            state = self._state
            if state == _TEXT:
                stop = buf.find(b"\xff", pos, n)
                end = n if stop < 0 else stop
                self._size += end - pos
                if self._size > self.max_frame_size:
                    raise MessageTooBig("Hixie frame without a terminator within %d bytes"
                                        % self.max_frame_size)
                if end > pos:
                    self.on_data(view[pos:end], OP_TEXT)
                if stop < 0:
                    return
                pos = stop + 1
                self._state = _TYPE
                if self.on_message_end is not None:
                    self.on_message_end(OP_TEXT)
            elif state == _TYPE:
                kind = buf[pos]
                pos += 1
                if kind == 0x00:
                    self._state = _TEXT
                    self._size = 0
                elif kind == 0xFF:
                    self._state = _CLOSING
                else:
                    raise ProtocolError("unsupported Hixie frame type 0x%02x" % kind)
            elif state == _CLOSING:
                if buf[pos] != 0x00:
                    raise ProtocolError("unsupported Hixie frame type 0xff (length-prefixed)")
                self._state = _CLOSED
                self.on_control(OP_CLOSE, b"")
                return
            else:
                return


class HixieCodec(Codec):
    """Hixie-75/76 frames; the text is base64 both ways."""

    binary = False
    splice = False
    pings = False

    def __init__(self, draft: int):
        self.draft = draft
        self.name = "hixie-%d" % draft
        # Draft 75 has no closing handshake: after our 0xFF 0x00, hang up.
        self.awaits_close_reply = draft >= 76

    def parser(self, on_data, on_control, on_message_end, max_frame_size):
        decoder = Base64Decoder(on_data, on_message_end)
        return HixieParser(decoder.data, on_control, max_frame_size,
                           on_message_end=decoder.message_end)

    def frame(self, data) -> bytes:
        return b"\x00" + b64encode(data) + b"\xff"

    def close_frame(self, code, reason) -> bytes:
        return b"\xff\x00"


BASE64 = Base64Codec()
HIXIE_75 = HixieCodec(75)
HIXIE_76 = HixieCodec(76)


# -- Hixie handshakes -------------------------------------------------------------


def hixie76_key_number(key: str, name: str) -> int:
    """A Sec-WebSocket-Key1/2 value: its digits divided by its spaces.

    The quotient must be an integer and fit 32 bits, with at least one
    space; anything else is a 400.
    """
    digits = "".join(char for char in key if "0" <= char <= "9")
    spaces = key.count(" ")
    if not digits or not spaces:
        raise BadRequest("invalid %s: needs digits and at least one space" % name)
    number = int(digits)
    if number % spaces:
        raise BadRequest("invalid %s: its number is not a multiple of its spaces" % name)
    number //= spaces
    if number > 0xFFFFFFFF:
        raise BadRequest("invalid %s: its number does not fit 32 bits" % name)
    return number


def hixie76_challenge(number1: int, number2: int, key3: bytes) -> bytes:
    """The 16 bytes that answer a draft-76 handshake."""
    return hashlib.md5(struct.pack("!II", number1, number2) + key3).digest()


def hixie_response(draft: int, origin: Optional[str], location: str,
                   protocol: Optional[str]) -> bytes:
    """The head of a Hixie 101 answer (draft 76: the challenge answer follows)."""
    if draft >= 76:
        lines = ["HTTP/1.1 101 WebSocket Protocol Handshake", "Upgrade: WebSocket",
                 "Connection: Upgrade"]
        prefix = "Sec-WebSocket-"
    else:
        # Draft 75 clients compare these first three lines byte for byte.
        lines = ["HTTP/1.1 101 Web Socket Protocol Handshake", "Upgrade: WebSocket",
                 "Connection: Upgrade"]
        prefix = "WebSocket-"
    if origin is not None:
        lines.append("%sOrigin: %s" % (prefix, origin))
    lines.append("%sLocation: %s" % (prefix, location))
    if protocol:
        lines.append("%sProtocol: %s" % (prefix, protocol))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
