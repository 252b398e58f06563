"""``websockify --echo``: answer every message with the same type and content.

An echo session is a relay without a target: what the client sends is
framed back to it as it arrives (a long message is echoed in fragments, so
memory stays bounded by one read), on the same master, workers, handshake
and limits as the bridge.  It lets a user check a wss:// or reverse-proxy
setup from a browser, and it is what the conformance suite drives.
"""

from typing import Optional

from websockify.proxy import ProxyService, Target
from websockify.relay import READ_CHUNK, Relay
from websockify.websocket import OP_CONTINUATION, frame_header


class EchoSession(Relay):
    """Echo data messages back; control frames behave as in the relay."""

    __slots__ = ("_held", "_held_opcode", "_fragmented")
    wants_message_end = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A client may send a whole message before it reads the echo (the
        # conformance suite does, up to 16 MiB): queue up to one frame's
        # limit before reading stops, so memory stays bounded by it.
        self.backlog_limit = max(self.parser.max_frame_size, READ_CHUNK) + READ_CHUNK
        self._held: Optional[bytes] = None   # the last chunk, until we know if it ends a message
        self._held_opcode = 0
        self._fragmented = False             # a fragment of this message was already sent

    def _client_data(self, chunk, opcode: int) -> None:
        if self.close_sent or self.close_received:
            return
        self.stats.from_client += len(chunk)
        if self._held is not None:
            self._emit(False)
        # Copied: the chunk is a view of the shared receive buffer.
        self._held = bytes(chunk)
        self._held_opcode = opcode

    def _client_message_end(self, opcode: int) -> None:
        if self.close_sent or self.close_received:
            return
        if self._held is None:
            self._held, self._held_opcode = b"", opcode
        self._emit(True)

    def _emit(self, fin: bool) -> None:
        data, self._held = self._held, None
        opcode = OP_CONTINUATION if self._fragmented else self._held_opcode
        self._fragmented = not fin
        self.client.queue(frame_header(len(data), opcode, fin))
        self.client.queue(data)
        self.stats.to_client += len(data)


class EchoService(ProxyService):
    """Session factory for --echo: no target to connect."""

    session_class = EchoSession

    def open_target(self, handler) -> Target:
        return Target(host="echo")

    def describe_target(self, target: Target) -> str:
        return "echo"
