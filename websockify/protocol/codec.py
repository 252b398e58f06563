"""How a session's client frames its bytes: the codec interface, and HyBi's.

Chosen by the handshake and fixed for the session; protocol.legacy has the
base64 subprotocol and Hixie-75/76.  A codec only makes and parses bytes.
"""

from typing import Callable, Optional

from websockify.protocol.frames import (OP_CLOSE, FrameParser, binary_header, close_payload,
                                        encode_frame)


class Codec:
    """How one session's client speaks: HyBi (RFC 6455), binary downstream.

    Chosen by the handshake and fixed for the session.  The relay asks it
    for the parser of client bytes and for the frames it sends; per chunk,
    a ``binary`` codec costs nothing (the relay frames with
    ``binary_header`` itself and may splice), any other one is called
    through ``frame`` for every read from the target.
    """

    name = "binary"
    #: Target bytes go to the client as binary frames, framed by the relay.
    binary = True
    #: Target bytes may go to the client through splice(2) (binary only).
    splice = True
    #: The protocol has ping/pong: --heartbeat applies.
    pings = True
    #: After our close frame, the client answers with its own.
    awaits_close_reply = True

    def parser(self, on_data: Callable[[bytes, int], None],
               on_control: Callable[[int, bytes], None],
               on_message_end: Optional[Callable[[int], None]], max_frame_size: int):
        """The incremental parser of what the client sends (``feed_buffer``)."""
        return FrameParser(on_data, on_control, max_frame_size=max_frame_size,
                           on_message_end=on_message_end)

    def frame(self, data) -> bytes:
        """Target bytes as the client's frame(s), for non-binary codecs."""
        return binary_header(len(data)) + bytes(data)

    def close_frame(self, code: Optional[int], reason: str) -> bytes:
        return encode_frame(OP_CLOSE, close_payload(code, reason))


HYBI = Codec()
