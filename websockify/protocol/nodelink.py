"""The internal link between instances: one authenticated stream open, without I/O.

A user who reaches instance B for an agent that instance A holds is carried
over one TCP connection from B to A's ``node`` address.  The connection opens
with a challenge and response keyed by the cluster secret, names the agent,
and then carries the user's stream bytes both ways, untouched::

    A -> B  CHALLENGE  MAGIC (8) + server nonce (32)
    B -> A  HELLO      client nonce (16) + header length u32 + JSON header
                       + HMAC-SHA256(secret, "open" | server nonce | client nonce | header)
    A -> B  ANSWER     status u16 + reason length u16 + reason (UTF-8)
                       + HMAC-SHA256(secret, "answer" | server nonce | client nonce
                                     | status | reason)
    then    both ways  the stream's bytes (a FIN is the stream's FIN)

The header is ``{"agent": ID, "face": "tcp" | "bridge" | ..., "peer": "h:p"}``
(any face's stream rides the same open).  Bytes B sends after its HELLO are
the first bytes of the stream (the holder passes them on once the agent
accepts).  ANSWER's status is HTTP's: 200 the agent accepted the stream,
then the bytes flow; 400 malformed hello; 401 wrong MAC; 404 the agent is
not held here; 502 the agent's service refused; 503 the agent cannot take
a stream; 504 its service did not answer in time.  A fresh server nonce per
connection makes a recorded HELLO useless elsewhere; the signed ANSWER
shows B that it reached an instance that holds the secret.  The link
authenticates, it does not encrypt: run it on a private network.
"""

import hashlib
import hmac
import json
import struct
from dataclasses import dataclass
from typing import Optional

from websockify.errors import HTTPError

MAGIC = b"WSKYNOD1"
SERVER_NONCE = 32
CLIENT_NONCE = 16
MAC_SIZE = 32
MAX_HEADER = 4096
MAX_REASON = 1024
CHALLENGE_SIZE = len(MAGIC) + SERVER_NONCE
_LENGTH = struct.Struct("!I")
_ANSWER = struct.Struct("!HH")
OPEN_OK = 200


class NodeLinkError(HTTPError):
    """A link opening that cannot go on; ``status`` says why (400, 401...)."""


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"\0".join(parts), hashlib.sha256).digest()


@dataclass(frozen=True)
class OpenRequest:
    """A verified HELLO: which agent's stream, for which face and user."""

    agent_id: str
    face: str
    peer: str
    header: dict


@dataclass(frozen=True)
class Answer:
    """The holder's verified ANSWER."""

    status: int
    reason: str


def encode_challenge(server_nonce: bytes) -> bytes:
    if len(server_nonce) != SERVER_NONCE:
        raise ValueError("the server nonce is %d bytes" % SERVER_NONCE)
    return MAGIC + server_nonce


class HolderHandshake:
    """The holder's side: the challenge out, a HELLO in, the answer out.

    ``receive(data)`` returns the OpenRequest once the whole HELLO arrived
    (None before), and raises NodeLinkError (400, 401) for a malformed or
    forged one; the bytes after the HELLO are ``rest`` (the stream's first
    bytes).
    """

    def __init__(self, secret: bytes, server_nonce: bytes):
        self.secret = secret
        self.server_nonce = server_nonce
        self.challenge = encode_challenge(server_nonce)
        self.client_nonce = b""
        self.request: Optional[OpenRequest] = None
        self.rest = b""
        self._buffer = bytearray()

    def receive(self, data: bytes) -> Optional[OpenRequest]:
        if self.request is not None:
            self.rest += bytes(data)
            return self.request
        buffer = self._buffer
        buffer += data
        fixed = CLIENT_NONCE + _LENGTH.size
        if len(buffer) < fixed:
            return None
        (size,) = _LENGTH.unpack_from(buffer, CLIENT_NONCE)
        if not 0 < size <= MAX_HEADER:
            raise NodeLinkError(400, "internal link: hello header of %d bytes" % size)
        end = fixed + size + MAC_SIZE
        if len(buffer) < end:
            return None
        client_nonce = bytes(buffer[:CLIENT_NONCE])
        raw = bytes(buffer[fixed:fixed + size])
        mac = bytes(buffer[fixed + size:end])
        self.client_nonce = client_nonce
        if not hmac.compare_digest(mac, _mac(self.secret, b"open", self.server_nonce,
                                             client_nonce, raw)):
            raise NodeLinkError(401, "internal link: hello not signed with the cluster secret")
        self.request = _parse_header(raw)
        self.rest = bytes(buffer[end:])
        self._buffer = bytearray()
        return self.request

    def answer(self, status: int, reason: str = "") -> bytes:
        """The signed ANSWER (also for refusals: the opener logs a verified reason)."""
        text = reason.encode("utf-8")[:MAX_REASON]
        head = _ANSWER.pack(status, len(text))
        return head + text + _mac(self.secret, b"answer", self.server_nonce,
                                  self.client_nonce, head, text)


def _parse_header(raw: bytes) -> OpenRequest:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise NodeLinkError(400, "internal link: hello header is not JSON") from None
    if not isinstance(header, dict):
        raise NodeLinkError(400, "internal link: hello header is not an object")
    agent_id, face, peer = header.get("agent"), header.get("face"), header.get("peer", "?")
    if not isinstance(agent_id, str) or not agent_id or not isinstance(face, str) \
            or not isinstance(peer, str):
        raise NodeLinkError(400, "internal link: hello header lacks agent or face")
    return OpenRequest(agent_id, face, peer, header)


class OpenerHandshake:
    """The opener's side: a challenge in, the HELLO out, the ANSWER in.

    Feed it exactly ``wanted()`` bytes at a time (never more), so that no
    byte of the stream is taken with the handshake: ``receive`` returns the
    HELLO to send once the challenge is complete, then the Answer once the
    ANSWER is (raises NodeLinkError 502 for a bad challenge or an answer not
    signed with the secret).
    """

    def __init__(self, secret: bytes, client_nonce: bytes, header: dict):
        if len(client_nonce) != CLIENT_NONCE:
            raise ValueError("the client nonce is %d bytes" % CLIENT_NONCE)
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        if len(raw) > MAX_HEADER:
            raise ValueError("a hello header of %d bytes exceeds %d" % (len(raw), MAX_HEADER))
        self.secret = secret
        self.client_nonce = client_nonce
        self._header = raw
        self.server_nonce = b""
        self.answer: Optional[Answer] = None
        self._buffer = bytearray()
        self._phase = "challenge"

    def wanted(self) -> int:
        """How many more bytes the current message needs (0: the handshake is over)."""
        buffer = self._buffer
        if self._phase == "challenge":
            return CHALLENGE_SIZE - len(buffer)
        if self._phase == "answer":
            if len(buffer) < _ANSWER.size:
                return _ANSWER.size - len(buffer)
            _, size = _ANSWER.unpack_from(buffer)
            return _ANSWER.size + size + MAC_SIZE - len(buffer)
        return 0

    def receive(self, data: bytes):
        """bytes (the HELLO to send), an Answer, or None while a message is incomplete."""
        if len(data) > self.wanted():
            raise ValueError("fed %d bytes, %d wanted" % (len(data), self.wanted()))
        self._buffer += data
        if self.wanted():
            return None
        buffer, self._buffer = bytes(self._buffer), bytearray()
        if self._phase == "challenge":
            if buffer[:len(MAGIC)] != MAGIC:
                raise NodeLinkError(502, "internal link: the peer is not a websockify node")
            self.server_nonce = buffer[len(MAGIC):]
            self._phase = "answer"
            return (self.client_nonce + _LENGTH.pack(len(self._header)) + self._header
                    + _mac(self.secret, b"open", self.server_nonce, self.client_nonce,
                           self._header))
        if self._phase == "answer":
            head, text, mac = (buffer[:_ANSWER.size], buffer[_ANSWER.size:-MAC_SIZE],
                               buffer[-MAC_SIZE:])
            if not hmac.compare_digest(mac, _mac(self.secret, b"answer", self.server_nonce,
                                                 self.client_nonce, head, text)):
                raise NodeLinkError(502, "internal link: answer not signed with the "
                                         "cluster secret")
            status, _ = _ANSWER.unpack(head)
            self._phase = "done"
            self.answer = Answer(status, text.decode("utf-8", "replace"))
            return self.answer
        raise ValueError("the handshake is over")

