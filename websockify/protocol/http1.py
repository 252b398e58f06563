"""HTTP/1.1 request heads for the tunnels' HTTP face: parse, route, rewrite, frame bodies.

Pure: bytes in, values and bytes out.  The HTTP face (a viewer's request to
``<http_path><ID>/<rest>`` carried to an agent's service) uses it to find
the agent ID in a request target (refusing targets that try to leave the
ID's prefix), to rewrite the head for the service (the prefix removed,
``X-Forwarded-*`` and ``x-websocktunnel-original-path`` set) and to find
where a request body ends (Content-Length or chunked), so that the next
request head on a kept-alive connection is found without buffering bodies.
"""

import re
from typing import List, Optional, Tuple

from websockify.errors import BadRequest, HeaderTooLarge

HEAD_LIMIT = 16 * 1024
#: A chunk-size line or trailer line longer than this is refused.
LINE_LIMIT = 4096
FORWARDED = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
             "x-websocktunnel-original-path")

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DIGITS = re.compile(r"[0-9]{1,18}")
# A line or value must not carry these: a bare CR or LF would make a service
# see a header we did not (request smuggling, forged X-Forwarded-*).
_LINE_BREAKERS = re.compile(r"[\r\n\x00]")
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c)", re.IGNORECASE)


class RequestHead:
    """A parsed request head: method, target, version and the headers in order."""

    __slots__ = ("method", "target", "version", "headers")

    def __init__(self, method: str, target: str, version: str,
                 headers: List[Tuple[str, str]]):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers

    def get(self, name: str) -> Optional[str]:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


def head_end(data: bytes) -> int:
    """The index just past the blank line ending a head, or -1 (over the limit: 431)."""
    end = data.find(b"\r\n\r\n")
    if end >= 0 and end + 4 <= HEAD_LIMIT:
        return end + 4
    if end >= 0 or len(data) > HEAD_LIMIT:
        raise HeaderTooLarge(HEAD_LIMIT)
    return -1


def parse_request_head(raw: bytes) -> RequestHead:
    """A head (with or without its blank line) -> RequestHead; BadRequest if malformed."""
    if len(raw) > HEAD_LIMIT:
        raise HeaderTooLarge(HEAD_LIMIT)
    text = raw.decode("latin-1")
    for end in ("\r\n\r\n", "\r\n"):
        if text.endswith(end):
            text = text[:-len(end)]
            break
    lines = text.split("\r\n")
    if any(_LINE_BREAKERS.search(line) for line in lines):
        raise BadRequest("a bare CR, LF or NUL in the request head")
    words = lines[0].split(" ")
    if len(words) != 3 or not _TOKEN.fullmatch(words[0]) or \
            words[2] not in ("HTTP/1.0", "HTTP/1.1"):
        raise BadRequest("not an HTTP/1.x request line")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise BadRequest("malformed header line")
        headers.append((name, value.strip(" \t")))
    return RequestHead(words[0], words[1], words[2], headers)


def split_face_target(target: str, prefix: str) -> Optional[Tuple[str, str]]:
    """``<prefix><ID>/<rest>`` -> (ID, "/<rest>"), None when not under ``prefix``.

    Refused (400), never normalised: a path segment that is ``.`` or ``..``
    once percent-decoded, and an encoded ``/`` or ``\\`` anywhere, so that no
    target can be read by anyone as reaching another ID.
    """
    if not target.startswith(prefix):
        return None
    path, question, query = target.partition("?")
    if _ENCODED_SEPARATOR.search(path) or "\\" in path:
        raise BadRequest("encoded path separators are refused on the HTTP face")
    if any(segment.lower().replace("%2e", ".") in (".", "..") for segment in path.split("/")):
        raise BadRequest("'.' and '..' path segments are refused on the HTTP face")
    agent_id, slash, rest = path[len(prefix):].partition("/")
    if not agent_id:
        return None
    return agent_id, "/" + rest + question + query


def rewrite_request(head: RequestHead, target: str, forwarded: dict,
                    close: bool = False) -> bytes:
    """The head the service gets: ``target``, ``forwarded``'s headers replacing
    any of theirs (names in FORWARDED), ``Connection: close`` when ``close``."""
    lines = ["%s %s %s" % (head.method, target, head.version)]
    replaced = {name.lower() for name in forwarded}
    for name, value in head.headers:
        lowered = name.lower()
        if lowered in replaced or (close and lowered == "connection"):
            continue
        lines.append("%s: %s" % (name, value))
    lines += ["%s: %s" % (name, value) for name, value in forwarded.items()]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class BodyFramer:
    """Where a request body ends: ``feed(data)`` returns how many of its bytes are body."""

    def __init__(self, head: RequestHead):
        for name in ("transfer-encoding", "content-length"):
            if sum(1 for key, _ in head.headers if key.lower() == name) > 1:
                raise BadRequest("more than one %s header" % name)
        encoding = (head.get("transfer-encoding") or "").lower()
        length = head.get("content-length")
        if encoding and length is not None:
            raise BadRequest("both Transfer-Encoding and Content-Length")
        if encoding and encoding != "chunked":
            raise BadRequest("unsupported Transfer-Encoding %r" % encoding)
        if length is not None and not _DIGITS.fullmatch(length):
            raise BadRequest("invalid Content-Length %r" % length[:40])
        self.chunked = encoding == "chunked"
        self.remaining = int(length) if length else 0
        self.state = "size" if self.chunked else "data"
        self.line = b""
        self.done = not self.chunked and self.remaining == 0

    def feed(self, data: bytes) -> int:
        used = 0
        while used < len(data) and not self.done:
            if self.state == "data":
                take = min(self.remaining, len(data) - used)
                used += take
                self.remaining -= take
                if not self.remaining:
                    if self.chunked:
                        self.state = "crlf"
                        self.remaining = 2
                    else:
                        self.done = True
            elif self.state == "crlf":
                # The two bytes after a chunk's data must be CRLF.
                expected = b"\r\n"[2 - self.remaining:]
                take = min(self.remaining, len(data) - used)
                if data[used:used + take] != expected[:take]:
                    raise BadRequest("chunk data not followed by CRLF")
                used += take
                self.remaining -= take
                if not self.remaining:
                    self.state = "size"
            else:                                   # "size" or "trailer": a line
                newline = data.find(b"\n", used)
                piece = data[used:] if newline < 0 else data[used:newline + 1]
                used += len(piece)
                self.line += piece
                if len(self.line) > LINE_LIMIT:
                    raise BadRequest("chunk line of more than %d bytes" % LINE_LIMIT)
                if newline >= 0:
                    self._line(self.line.rstrip(b"\r\n"))
                    self.line = b""
        return used

    def _line(self, line: bytes) -> None:
        if self.state == "trailer":
            self.done = not line
            return
        size = line.split(b";", 1)[0].rstrip(b" \t")
        if not _CHUNK_SIZE.fullmatch(size):
            raise BadRequest("bad chunk size %r" % size[:20])
        self.remaining = int(size, 16)
        self.state = "data" if self.remaining else "trailer"


def is_upgrade(head: RequestHead) -> bool:
    """A request asking to switch protocols (a WebSocket): the bytes after it are relayed as they are."""
    connection = (head.get("connection") or "").lower()
    return bool(head.get("upgrade")) and "upgrade" in [t.strip() for t in connection.split(",")]


class ViewerRequests:
    """A viewer's bytes -> the bytes its agent's service gets, one request at a time.

    Each request head is parsed (400 malformed, 431 over 16 KiB), must name
    the same agent under the same prefix (a head for another ID or a path
    outside the prefix ends the forwarding: ``stopped``, ``boundary`` true),
    and is rewritten (the ``<prefix><ID>`` part removed, the forwarded
    headers set).  Bodies pass as they are, delimited by Content-Length or
    chunked framing.  An upgrade, only as a connection's first request,
    holds what follows it (``awaiting_upgrade``) until the service answers:
    ``upgrade_answered(True)`` (a 101) then passes everything as it is,
    ``False`` ends the forwarding.  With
    ``keep_alive`` false each request gets ``Connection: close`` and the
    forwarding stops after the first one (``boundary`` false: the service
    closes the connection itself).

    ``forwarded(head)`` returns the headers to set on a head.
    """

    def __init__(self, prefix: str, agent_id: str, forwarded, keep_alive: bool = True):
        self.prefix = prefix
        self.agent_id = agent_id
        self.forwarded = forwarded
        self.keep_alive = keep_alive
        self.buffer = b""
        self.body: Optional[BodyFramer] = None
        self.raw = False
        self.awaiting_upgrade = False
        self.stopped = False
        #: Why the forwarding stopped at a request boundary (None: it has not, or
        #: it stopped after a request that asked for Connection: close).
        self.boundary: Optional[str] = None
        self.requests = 0

    def feed(self, data: bytes) -> bytes:
        """The bytes to send on for ``data``; raises BadRequest / HeaderTooLarge
        (``requests`` tells whether any request went before it)."""
        if self.raw:
            return data
        if self.awaiting_upgrade:
            self.buffer += data
            if len(self.buffer) > HEAD_LIMIT:
                raise HeaderTooLarge(HEAD_LIMIT)
            return b""
        if self.stopped:
            return b""
        out = []
        data = self.buffer + data if self.buffer else data
        self.buffer = b""
        while data and not self.stopped:
            if self.awaiting_upgrade:
                self.buffer = data          # held until the service answers the upgrade
                break
            if self.body is not None:
                used = self.body.feed(data)
                out.append(data[:used])
                data = data[used:]
                if self.body.done:
                    self.body = None
                    self._request_done()
                continue
            if data[:1] in (b"\r", b"\n"):
                # Empty lines before a request line are ignored (RFC 9112 2.2).
                data = data.lstrip(b"\r\n")
                if not data:
                    break
            end = head_end(data)
            if end < 0:
                self.buffer = data
                break
            out.append(self._head(data[:end]))
            data = data[end:]
        return b"".join(out)

    def _head(self, raw: bytes) -> bytes:
        head = parse_request_head(raw)
        split = split_face_target(head.target, self.prefix)
        if split is None or split[0] != self.agent_id:
            self.stop("a request for %s, not agent %s" % (head.target[:100], self.agent_id))
            return b""
        upgrade = is_upgrade(head)
        if upgrade and self.requests:
            # Its answer could not be told from the answers before it.
            self.stop("an upgrade after other requests on the connection")
            return b""
        self.requests += 1
        close = not self.keep_alive and not upgrade
        rewritten = rewrite_request(head, split[1], self.forwarded(head), close=close)
        if upgrade:
            self.awaiting_upgrade = True
        else:
            framer = BodyFramer(head)
            if framer.done:
                self._request_done()
            else:
                self.body = framer
        return rewritten

    def _request_done(self) -> None:
        # A one-request connection forwards nothing more; the service closes it.
        if not self.keep_alive:
            self.stopped = True

    def stop(self, why: str) -> None:
        """End the forwarding at a request boundary (``why`` is what the log says)."""
        self.stopped = True
        self.boundary = why

    def upgrade_answered(self, switched: bool) -> bytes:
        """The service answered the upgrade: the bytes held since, to send on now
        (everything passes from now on), or nothing (the forwarding ends)."""
        self.awaiting_upgrade = False
        held, self.buffer = self.buffer, b""
        if switched:
            self.raw = True
            return held
        self.stop("the upgrade was not accepted")
        return b""
