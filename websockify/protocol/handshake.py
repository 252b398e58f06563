"""The opening handshake without I/O: request heads, upgrade negotiation, refusals.

Everything here is a function of bytes or of a parsed request (a plain
value) and returns bytes, values or raises an ``HTTPError``:

- ``head_end`` / ``check_request_line`` / ``RequestHeaders.parse``: where a
  request head ends and whether its lines are well formed;
- ``negotiate``: a parsed upgrade request becomes an ``Accept`` (the
  session's codec and the response to send) or a 400 with the reason.
  HyBi 7, 8 and 13 are answered with Sec-WebSocket-Accept; a request with
  neither Sec-WebSocket-Version nor Sec-WebSocket-Key is a Hixie one (draft
  76 with Sec-WebSocket-Key1/2 and 8 bytes after the head, else draft 75);
- ``refusal_bytes``: an HTTP answer with a short text body;
- ``client_request`` / ``check_client_response``: the client side (the
  tunnel agent's upgrade), a request head to send and the check of the
  answer, raising ``TunnelHandshakeError`` with the server's status.

server.http reads the bytes from the socket and calls these.
"""

import base64
import binascii
import hashlib
import re
from typing import Iterable, Optional, Tuple

from websockify.errors import BadRequest, TunnelHandshakeError
from websockify.protocol import legacy
from websockify.protocol.codec import HYBI, Codec

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SUPPORTED_VERSIONS = ("13", "8", "7")
HEADER_LIMIT = 16 * 1024

_REQUEST_LINE = re.compile(rb"[A-Z][A-Z0-9_-]* [^\s]+ HTTP/[0-9]\.[0-9]\r?\n")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def head_end(data: bytes, searched: int) -> Tuple[int, int]:
    """Where the head ends (CRLF or, from hand-written clients, bare LF lines):
    (offset of the blank line, its length), offset -1 if not yet."""
    crlf = data.find(b"\r\n\r\n", max(0, searched - 3))
    lf = data.find(b"\n\n", max(0, searched - 1))
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return lf, 2
    return crlf, 4


def is_request_line(line: bytes) -> bool:
    """``METHOD /target HTTP/x.y`` and its line end, nothing else."""
    return _REQUEST_LINE.fullmatch(line) is not None


class RequestHeaders:
    """Request headers with the small interface pywsgi's environ code uses."""

    __slots__ = ("headers", "_values")
    status = ""          # pywsgi checks this for a parse failure

    def __init__(self):
        self.headers = []        # raw "Name: value\r\n" lines, as pywsgi expects
        self._values = {}        # lower-case name -> value (repeats joined by ", ")

    @classmethod
    def parse(cls, block: bytes) -> "RequestHeaders":
        parsed = cls()
        values = parsed._values
        for raw in block.split(b"\n"):
            line = raw.rstrip(b"\r").decode("latin-1")
            if not line:
                continue
            name, colon, value = line.partition(":")
            if not colon or not _TOKEN.fullmatch(name):
                raise BadRequest("malformed header line %r" % line[:100])
            value = value.strip(" \t")
            key = name.lower()
            values[key] = values[key] + ", " + value if key in values else value
            parsed.headers.append("%s: %s\r\n" % (name, value))
        return parsed

    def get(self, name: str, default=None):
        return self._values.get(name.lower(), default)

    getheader = get

    def remove(self, name: str) -> None:
        key = name.lower()
        if self._values.pop(key, None) is not None:
            self.headers = [h for h in self.headers if h.split(":", 1)[0].lower() != key]

    def remove_prefix(self, prefix: str) -> list:
        """Drop headers whose names start with ``prefix`` (``-`` and ``_`` alike,
        as WSGI's environ cannot tell them apart); the names dropped."""
        wanted = prefix.lower().replace("-", "_")
        names = [key for key in self._values if key.replace("-", "_").startswith(wanted)]
        for key in names:
            self.remove(key)
        return names

    # The read side of the header message websockify 0.13 gives auth plugins.
    def __getitem__(self, name: str):
        return self._values.get(name.lower())

    def __setitem__(self, name: str, value: str) -> None:
        self.remove(name)
        self._values[name.lower()] = value
        self.headers.append("%s: %s\r\n" % (name, value))

    def __delitem__(self, name: str) -> None:
        self.remove(name)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._values

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list:
        return [line.split(":", 1)[0] for line in self.headers]

    def items(self) -> list:
        return [(line.split(":", 1)[0], line.split(":", 1)[1].strip()) for line in self.headers]

    def values(self) -> list:
        return [value for _, value in self.items()]

    def get_all(self, name: str, failobj=None):
        key = name.lower()
        found = [value for header, value in self.items() if header.lower() == key]
        return found or failobj

    @property
    def typeheader(self):
        return self._values.get("content-type")


_TOKEN_VALUE = re.compile(r"((?:^|[?&;])token=)[^&;#\s]*")
# noVNC's ?path=websockify%3Ftoken%3D... form: the value ends at %26 (&).
_ENCODED_TOKEN_VALUE = re.compile(r"((?:%3[Ff]|%26)token%3[Dd])(?:(?!%26)[^&;#\s])*")


def redact_uri(text: str) -> str:
    """A request line or URI for the log, with token values hidden: tokens
    (signed targets, JWTs) are credentials."""
    if "oken" not in text:          # token=, token%3D, Token...: nothing to hide
        return text
    text = _TOKEN_VALUE.sub(r"\1<redacted>", text)
    return _ENCODED_TOKEN_VALUE.sub(r"\1<redacted>", text)


def refusal_bytes(status_line: str, text: str, headers: Iterable[Tuple[str, str]] = ()) -> bytes:
    """A complete HTTP answer with a short text body; the connection closes after it."""
    body = (text + "\n").encode("utf-8", "replace")
    lines = ["HTTP/1.1 %s" % status_line,
             "Content-Type: text/plain; charset=utf-8",
             "Content-Length: %d" % len(body),
             "Connection: close"]
    lines += ["%s: %s" % (name, value) for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def accept_key(key: str) -> str:
    digest = hashlib.sha1((key + GUID).encode("latin-1")).digest()
    return base64.b64encode(digest).decode("ascii")


def choose_subprotocol(offer: Optional[str]) -> Optional[str]:
    """``binary`` wherever the client lists it, else ``base64``, else none."""
    if not offer:
        return None
    protocols = [item.strip() for item in offer.split(",")]
    if "binary" in protocols:
        return "binary"
    if "base64" in protocols:
        return "base64"
    return None


def is_upgrade_request(method: str, headers: RequestHeaders) -> bool:
    if method != "GET":
        return False
    if headers.get("upgrade", "").strip().lower() != "websocket":
        return False
    tokens = [t.strip().lower() for t in headers.get("connection", "").split(",")]
    return "upgrade" in tokens


class UpgradeRequest:
    """What negotiation needs of a request: a plain value, no socket."""

    __slots__ = ("version", "path", "headers", "secure")

    def __init__(self, version: str, path: str, headers: RequestHeaders, secure: bool = False):
        self.version = version          # "HTTP/1.1"
        self.path = path                # the request target, as sent
        self.headers = headers
        self.secure = secure            # the connection is TLS (Hixie's location says wss)


class Accept:
    """The negotiated session: its codec, and the response that accepts it.

    A Hixie-76 answer depends on the 8 bytes the client sends after its
    head (``needs_key3``): the caller reads them and calls ``response(key3)``.
    """

    __slots__ = ("codec", "status", "_head", "_key_numbers")

    def __init__(self, codec: Codec, head: bytes, status: str,
                 key_numbers: Optional[Tuple[int, int]] = None):
        self.codec = codec
        self.status = status
        self._head = head
        self._key_numbers = key_numbers

    @property
    def needs_key3(self) -> bool:
        return self._key_numbers is not None

    def response(self, key3: bytes = b"") -> bytes:
        if self._key_numbers is None:
            return self._head
        if len(key3) != 8:
            raise ValueError("a Hixie-76 answer needs the 8 bytes after the head")
        return self._head + legacy.hixie76_challenge(self._key_numbers[0],
                                                      self._key_numbers[1], key3)


def negotiate(request: UpgradeRequest, legacy_clients: bool = True) -> Accept:
    """Accept a WebSocket upgrade request, or raise BadRequest saying why.

    ``legacy_clients`` False refuses clients whose framing the service
    cannot speak (base64 and Hixie, when the service frames HyBi itself).
    """
    if request.version != "HTTP/1.1":
        raise BadRequest("WebSocket upgrade needs HTTP/1.1, got %s" % request.version)
    headers = request.headers
    if headers.get("sec-websocket-version") is None and headers.get("sec-websocket-key") is None:
        return _negotiate_hixie(request, legacy_clients)
    version = headers.get("sec-websocket-version", "").strip()
    if version not in SUPPORTED_VERSIONS:
        what = ("unsupported WebSocket version %r" % version if version
                else "missing Sec-WebSocket-Version")
        raise BadRequest("%s; supported versions: %s" % (what, ", ".join(SUPPORTED_VERSIONS)),
                         [("Sec-WebSocket-Version", ", ".join(SUPPORTED_VERSIONS))])
    key = headers.get("sec-websocket-key", "").strip()
    if not key:
        raise BadRequest("missing Sec-WebSocket-Key")
    try:
        raw_key = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raw_key = b""
    if len(raw_key) != 16:
        raise BadRequest("invalid Sec-WebSocket-Key: must be 16 bytes in base64")
    protocol = choose_subprotocol(headers.get("sec-websocket-protocol"))
    codec = legacy.BASE64 if protocol == "base64" else HYBI
    _check_codec(codec, legacy_clients)
    lines = ["HTTP/1.1 101 Switching Protocols",
             "Upgrade: websocket",
             "Connection: Upgrade",
             "Sec-WebSocket-Accept: %s" % accept_key(key)]
    if protocol:
        lines.append("Sec-WebSocket-Protocol: %s" % protocol)
    return Accept(codec, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"),
                  "101 Switching Protocols")


def _negotiate_hixie(request: UpgradeRequest, legacy_clients: bool) -> Accept:
    """Draft 76 (Sec-WebSocket-Key1/2 and key3) or draft 75 (neither)."""
    headers = request.headers
    key1 = headers.get("sec-websocket-key1")
    key2 = headers.get("sec-websocket-key2")
    host = headers.get("host", "").strip()
    if not host:
        raise BadRequest("missing Host (a Hixie handshake answers with the location)")
    numbers = None
    if key1 is None and key2 is None:
        codec = legacy.HIXIE_75
    elif key1 is None or key2 is None:
        raise BadRequest("Hixie-76 handshake needs both Sec-WebSocket-Key1 and Key2")
    else:
        codec = legacy.HIXIE_76
        numbers = (legacy.hixie76_key_number(key1, "Sec-WebSocket-Key1"),
                   legacy.hixie76_key_number(key2, "Sec-WebSocket-Key2"))
    _check_codec(codec, legacy_clients)
    protocol = headers.get("sec-websocket-protocol" if codec is legacy.HIXIE_76
                           else "websocket-protocol")
    location = "%s://%s%s" % ("wss" if request.secure else "ws", host, request.path)
    head = legacy.hixie_response(codec.draft, headers.get("origin"), location,
                                 protocol.strip() if protocol else None)
    return Accept(codec, head, head.split(b"\r\n", 1)[0][9:].decode("latin-1"), numbers)


def _check_codec(codec: Codec, legacy_clients: bool) -> None:
    if not codec.binary and not legacy_clients:
        raise BadRequest("%s WebSocket clients are not supported by this service" % codec.name)


# -- the client side: the tunnel agent's upgrade ---------------------------------

_STATUS_LINE = re.compile(r"HTTP/1\.[01] ([0-9]{3})(?: ([^\r\n]*))?")
_FORBIDDEN_IN_HEAD = re.compile(r"[\x00-\x1f\x7f]")


def client_key(raw: bytes) -> str:
    """Sec-WebSocket-Key from 16 random bytes (the caller draws them)."""
    if len(raw) != 16:
        raise ValueError("a Sec-WebSocket-Key is 16 bytes")
    return base64.b64encode(raw).decode("ascii")


def client_request(host: str, path: str, key: str, subprotocol: Optional[str],
                   headers: Iterable[Tuple[str, str]] = ()) -> bytes:
    """The head of a client's upgrade request (HyBi 13)."""
    if not path.startswith("/") or " " in path:
        raise ValueError("request target must start with / and hold no space: %r" % path)
    lines = ["GET %s HTTP/1.1" % path,
             "Host: %s" % host,
             "Upgrade: websocket",
             "Connection: Upgrade",
             "Sec-WebSocket-Key: %s" % key,
             "Sec-WebSocket-Version: 13"]
    if subprotocol:
        lines.append("Sec-WebSocket-Protocol: %s" % subprotocol)
    for name, value in headers:
        if not _TOKEN.fullmatch(name):
            raise ValueError("invalid header name %r" % name)
        lines.append("%s: %s" % (name, value))
    for line in lines:
        # No header injection through a value (a host, a token from a file).
        if _FORBIDDEN_IN_HEAD.search(line.replace("\t", " ")):
            raise ValueError("control character in request line %r" % line[:100])
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def check_client_response(head: bytes, key: str,
                          subprotocol: Optional[str]) -> RequestHeaders:
    """Check a server's answer head to ``client_request``.

    Returns its headers when it is a valid 101 with the right
    Sec-WebSocket-Accept and subprotocol; otherwise raises ``TunnelHandshakeError`` carrying the
    status and reason text (the body, if any, is the caller's to read).
    """
    text = head.decode("latin-1")
    status_line, _, block = text.partition("\n")
    match = _STATUS_LINE.fullmatch(status_line.rstrip("\r"))
    if match is None:
        raise TunnelHandshakeError(0, "", "not an HTTP answer: %r" % status_line[:100])
    status = int(match.group(1))
    reason = (match.group(2) or "").strip()
    if status != 101:
        raise TunnelHandshakeError(status, reason)
    try:
        headers = RequestHeaders.parse(block.encode("latin-1"))
    except BadRequest as error:
        raise TunnelHandshakeError(status, reason, error.text) from None

    def refuse(problem: str):
        return TunnelHandshakeError(status, reason, problem)

    if headers.get("upgrade", "").strip().lower() != "websocket":
        raise refuse("Upgrade is %r, not websocket" % headers.get("upgrade", ""))
    tokens = [t.strip().lower() for t in headers.get("connection", "").split(",")]
    if "upgrade" not in tokens:
        raise refuse("Connection does not say Upgrade")
    answer = headers.get("sec-websocket-accept", "").strip()
    if answer != accept_key(key):
        raise refuse("wrong Sec-WebSocket-Accept %r" % answer[:40] if answer
                     else "missing Sec-WebSocket-Accept")
    chosen = headers.get("sec-websocket-protocol")
    chosen = chosen.strip() if chosen is not None else None
    if chosen != subprotocol:
        if chosen is None:
            raise refuse("the server chose no subprotocol (offered %s)" % subprotocol)
        raise refuse("the server chose subprotocol %r, offered %s"
                     % (chosen[:60], subprotocol or "none"))
    if headers.get("sec-websocket-extensions"):
        raise refuse("the server chose extensions, none offered")
    return headers
