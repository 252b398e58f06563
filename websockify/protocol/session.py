"""The state of one session's WebSocket: the close handshake and what may still flow.

Sans-I/O: the relay tells it what happened (a close frame from the client,
a close of our own, a protocol error, the target gone) and asks it what to
do (send a close frame, answer a ping, keep reading the client or the
target).  The rules, from RFC 6455 sections 5.5 and 7:

- ``OPEN``: data flows both ways; pings are answered.
- ``CLOSING_BY_US``: our close frame is queued (the target ended, the server
  stops, a protocol error); nothing more is read from the target and no
  ping is answered; the client's frames are still read until its close
  reply, unless a protocol error means nothing it sends can be trusted.
- ``CLOSING_BY_PEER``: the client's close frame arrived and our reply (its
  own code echoed, as 5.5.1 suggests) is queued; nothing more is read.
- ``CLOSED``: both close frames have been exchanged (or ours is queued and
  no reply is awaited: a Hixie client, or a client that broke the
  protocol): once the queue is flushed, the TCP connection is dropped.

The close code and reason the session ends with are those of whoever
closed first; 1005 when the client's close frame carried no code.
"""

from typing import Optional, Tuple

OPEN = "open"
CLOSING_BY_US = "closing by us"
CLOSING_BY_PEER = "closing by the peer"
CLOSED = "closed"

CloseFrame = Tuple[Optional[int], str]


class SessionState:
    """One session's close handshake, as a small state machine.

    ``state`` names the state; ``is_open``, ``closing``, ``exchanged`` and
    ``client_readable`` are kept as plain attributes, derived at each
    transition, because the relay reads them for every chunk it moves.
    """

    __slots__ = ("state", "is_open", "closing", "exchanged", "client_readable",
                 "awaits_close_reply", "close_code", "close_reason")

    def __init__(self, awaits_close_reply: bool = True):
        #: Hixie clients never answer a close frame.
        self.awaits_close_reply = awaits_close_reply
        self.close_code: Optional[int] = None
        self.close_reason = ""
        #: False once nothing more is read from the client (its close arrived,
        #: or it broke the protocol).
        self.client_readable = True
        self._enter(OPEN)

    def _enter(self, state: str) -> None:
        self.state = state
        #: Data flows both ways and pings are answered.
        self.is_open = state is OPEN
        #: A close frame went one way or the other (ours is queued or sent).
        self.closing = state is not OPEN
        #: Both close frames are queued or sent: hang up once flushed.
        self.exchanged = state is CLOSING_BY_PEER or state is CLOSED

    @property
    def close_sent(self) -> bool:
        return self.closing

    # -- what happened -----------------------------------------------------

    def close(self, code: Optional[int], reason: str) -> Optional[CloseFrame]:
        """We close; the frame to queue, or None if ours is already out."""
        if self.state is not OPEN:
            return None
        self._record(code, reason)
        if self.awaits_close_reply:
            self._enter(CLOSING_BY_US)
        else:
            self.client_readable = False
            self._enter(CLOSED)
        return code, reason

    def fail(self, code: int, reason: str) -> Optional[CloseFrame]:
        """A protocol error: close with ``code``, read nothing more, await no reply.

        RFC 6455 7.1.7: after failing the connection the endpoint need not
        wait for the peer's close frame.
        """
        frame = self.close(code, reason)
        self.client_readable = False
        self._enter(CLOSED)
        return frame

    def peer_closed(self, code: Optional[int], reason: str) -> Optional[CloseFrame]:
        """The client's close frame; our reply to queue, or None if we closed first."""
        self.client_readable = False
        if self.state is OPEN:
            self._record(1005 if code is None else code, reason)
            self._enter(CLOSING_BY_PEER)
            return code, ""
        if self.state is CLOSING_BY_US:
            self._enter(CLOSED)
        return None

    def abort(self, reason: str) -> None:
        """The connection is gone without a close handshake (1006 in the log)."""
        self._record(1006, reason)
        self.client_readable = False
        self._enter(CLOSED)

    def _record(self, code: Optional[int], reason: str) -> None:
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason

    def __repr__(self) -> str:
        return "<SessionState %s%s code=%s>" % (
            self.state, "" if self.client_readable else " not reading", self.close_code)
