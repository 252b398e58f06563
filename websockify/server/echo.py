"""``websockify --echo``: answer every message with the same type and content.

An echo session is a relay without a target: what the client sends is
framed back to it, on the same master, workers, handshake and limits as the
bridge.  It lets a user check a wss:// or reverse-proxy setup from a
browser, and it is what the conformance suite drives.

A message is echoed as one frame when it is complete, or in fragments of
about 64 KiB as it arrives when it is long, so memory stays bounded.
"""

from typing import List

from websockify.metrics import counters as metrics
from websockify.server.proxy import ProxyService, Target
from websockify.server.relay import READ_CHUNK, Relay
from websockify.protocol.frames import OP_CONTINUATION

# Echo a partial message once this much of it has arrived.
FRAGMENT_SIZE = 64 * 1024


class EchoSession(Relay):
    """Echo data messages back; control frames behave as in the relay."""

    __slots__ = ("_chunks", "_chunk_bytes", "_opcode", "_fragmented")
    wants_message_end = True
    codec_framing = True        # legacy clients get their echo in their own framing

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A client may send a whole message before it reads the echo (the
        # conformance suite does, up to 16 MiB): queue up to one frame's
        # limit before reading stops, so memory stays bounded by it.
        self.backlog_limit = max(self.parser.max_frame_size, READ_CHUNK) + READ_CHUNK
        self._chunks: List[bytes] = []   # the message's data not echoed yet
        self._chunk_bytes = 0
        self._opcode = 0
        self._fragmented = False         # a fragment of this message was already sent

    def _client_data(self, chunk, opcode: int) -> None:
        if not self.session.is_open:
            return
        self.stats.from_client += len(chunk)
        metrics.words[metrics.BYTES_FROM_CLIENT] += len(chunk)
        # Copied: the chunk is a view of the shared receive buffer.
        self._chunks.append(bytes(chunk))
        self._chunk_bytes += len(chunk)
        self._opcode = opcode
        if self._chunk_bytes >= FRAGMENT_SIZE:
            self._emit(False)

    def _client_message_end(self, opcode: int) -> None:
        if not self.session.is_open:
            return
        self._opcode = opcode
        self._emit(True)

    def _emit(self, fin: bool) -> None:
        data = b"".join(self._chunks)
        self._chunks = []
        self._chunk_bytes = 0
        opcode = OP_CONTINUATION if self._fragmented else self._opcode
        self._fragmented = not fin
        self._queue_to_client(data, opcode, fin)
        self.stats.to_client += len(data)
        metrics.words[metrics.BYTES_TO_CLIENT] += len(data)


class EchoService(ProxyService):
    """Session factory for --echo: no target to connect."""

    session_class = EchoSession

    def open_target(self, handler) -> Target:
        self.authenticate(handler, Target())
        return Target(host="echo")

    def describe_target(self, target: Target) -> str:
        return "echo"
