"""The HTTP side of a connection: request head, upgrade checks, refusals.

A subclass of gevent-websocket's handler (itself a gevent pywsgi handler)
that reads the request head under a byte budget and a deadline, validates
the WebSocket upgrade itself (gevent-websocket crashes on a key that is not
base64 and has no header limit), maps every ``HTTPError`` to a response with
one log line, and hands an accepted WebSocket to the proxy service.  Plain
requests go to the WSGI application: static files or 405.

HyBi 7, 8 and 13 are answered with Sec-WebSocket-Accept; a request with
neither Sec-WebSocket-Version nor Sec-WebSocket-Key is a Hixie one (draft 76
with Sec-WebSocket-Key1/2 and 8 bytes after the head, else draft 75).  The
handshake picks the session's codec (relay.Codec, legacy.py).
"""

import base64
import binascii
import hashlib
import logging
import re
import socket
import time
import _socket
from typing import Optional, Tuple

import gevent
from gevent.pywsgi import WSGIHandler
from geventwebsocket.handler import WebSocketHandler

from websockify.protocol import forwarded, legacy
from websockify.errors import BadRequest, HeaderTooLarge, HTTPError
from websockify.net.tls import TLSStream, describe_error, looks_like_tls
from websockify.server.relay import HYBI, Codec
from websockify.protocol.frames import GUID, SUPPORTED_VERSIONS

log = logging.getLogger("websockify")

HEADER_LIMIT = 16 * 1024
_READ_SIZE = 4096


class ClientGone(Exception):
    """The client closed or reset the connection before its request was complete."""


_REQUEST_LINE = re.compile(rb"[A-Z][A-Z0-9_-]* [^\s]+ HTTP/[0-9]\.[0-9]\r?\n")


def _head_end(data: bytes, searched: int) -> Tuple[int, int]:
    """Where the head ends (CRLF or, from hand-written clients, bare LF lines)."""
    crlf = data.find(b"\r\n\r\n", max(0, searched - 3))
    lf = data.find(b"\n\n", max(0, searched - 1))
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return lf, 2
    return crlf, 4


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


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


class HeadReader:
    """Reads the request head under a byte budget and keeps what follows it.

    Stands in for pywsgi's ``rfile``: the bytes after the head (a request
    body, or WebSocket frames a client sends before seeing the 101) stay in
    ``buffer`` for whoever reads next.
    """

    def __init__(self, sock, limit: int = HEADER_LIMIT):
        self.sock = sock
        self.limit = limit
        self.buffer = b""
        self.closed = False
        self.request_line: Optional[str] = None

    def read_head(self) -> Optional[bytes]:
        """The head up to and without the blank line; None if the client sent nothing.

        The request line is judged as soon as it is complete, so garbage is
        refused at once instead of after the handshake deadline.
        """
        data = self.buffer
        searched = 0
        while True:
            if self.request_line is None:
                if data and looks_like_tls(data[0]):
                    raise BadRequest("TLS handshake received, but this server has no "
                                     "certificate (see --cert): use ws://, not wss://")
                newline = data.find(b"\n")
                if newline >= 0:
                    line = data[:newline + 1]
                    self.request_line = line.rstrip(b"\r\n").decode("latin-1")
                    if not _REQUEST_LINE.fullmatch(line):
                        raise BadRequest("not an HTTP request line (expected METHOD /path HTTP/1.1)")
            end, size = _head_end(data, searched)
            if end >= 0:
                if end + size > self.limit:
                    raise HeaderTooLarge(self.limit)
                self.buffer = data[end + size:]
                return data[:end]
            if len(data) > self.limit:
                raise HeaderTooLarge(self.limit)
            searched = len(data)
            try:
                chunk = self.sock.recv(_READ_SIZE)
            except OSError as exc:
                raise ClientGone(exc.strerror or str(exc)) from None
            if not chunk:
                if not data:
                    return None
                raise ClientGone("connection closed after %d bytes of request head" % len(data))
            data += chunk

    def take_buffer(self) -> bytes:
        data, self.buffer = self.buffer, b""
        return data

    def read(self, size: int = -1) -> bytes:
        if self.buffer:
            if size < 0 or size >= len(self.buffer):
                return self.take_buffer()
            data, self.buffer = self.buffer[:size], self.buffer[size:]
            return data
        if size == 0:
            return b""
        return self.sock.recv(size if size > 0 else 65536)

    def readline(self, size: int = -1) -> bytes:
        line = b""
        while not line.endswith(b"\n") and (size < 0 or len(line) < size):
            want = -1 if size < 0 else size - len(line)
            if not self.buffer:
                chunk = self.sock.recv(_READ_SIZE)
                if not chunk:
                    break
                self.buffer = chunk
            cut = self.buffer.find(b"\n")
            cut = len(self.buffer) if cut < 0 else cut + 1
            if want >= 0:
                cut = min(cut, want)
            line += self.buffer[:cut]
            self.buffer = self.buffer[cut:]
        return line

    def close(self) -> None:
        self.closed = True


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


def response_bytes(status_line: str, text: str, headers=()) -> bytes:
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


def _key3_timeout(timeout: float) -> HTTPError:
    return HTTPError(408, "Request Timeout",
                     "the 8 bytes after a Hixie-76 request head not received within %g s"
                     % timeout)


def is_upgrade_request(environ: dict) -> bool:
    if environ.get("REQUEST_METHOD") != "GET":
        return False
    if environ.get("HTTP_UPGRADE", "").strip().lower() != "websocket":
        return False
    tokens = [t.strip().lower() for t in environ.get("HTTP_CONNECTION", "").split(",")]
    return "upgrade" in tokens


class Handler(WebSocketHandler):
    """One client connection until it is upgraded, refused or done."""

    def __init__(self, sock, address, server):  # pylint: disable=super-init-not-called
        # pywsgi would wrap the socket in a buffered file; ours keeps the budget.
        self.socket = sock
        self.client_address = address
        self.server = server
        self.rfile = HeadReader(sock)
        self.codec: Codec = HYBI
        #: The TLS stream when the client opened with a TLS hello.
        self.tls: Optional[TLSStream] = None
        self.detached = False
        self._header_block = b""
        self._logged_refusal = False
        self._deadline = 0.0

    @property
    def peer(self) -> str:
        # The TCP peer, or the client a --trusted-proxy forwarded for.
        return forwarded.peer_label(self.client_address, self.headers,
                                    self.server.service.settings.trusted_proxy)

    # -- reading the request ---------------------------------------------

    def handle_one_request(self):
        if self.rfile.closed:
            return None
        timeout = self.server.handshake_timeout
        if self._deadline:
            # The first request shares its deadline with the TLS handshake.
            timeout = max(0.001, self._deadline - time.monotonic())
        else:
            self._deadline = time.monotonic() + timeout
        try:
            with gevent.Timeout(timeout, HTTPError(
                    408, "Request Timeout",
                    "request head not received within %g s" % self.server.handshake_timeout)):
                head = self.rfile.read_head()
        except HTTPError as exc:
            return self._refusal(exc, self.rfile.request_line or "")
        except ClientGone as exc:
            log.info("%s: client disconnected during the handshake: %s", self.peer, exc)
            return None
        if head is None:
            return None
        line, _, self._header_block = head.partition(b"\n")
        self.requestline = line.rstrip(b"\r").decode("latin-1")
        self.response_length = 0
        try:
            self.read_request(self.requestline)
        except HTTPError as exc:
            return self._refusal(exc, self.requestline)
        except Exception as exc:  # pywsgi raises ValueError subclasses for bad input
            message = getattr(exc, "formatted_message", None) or str(exc) or type(exc).__name__
            return self._refusal(BadRequest("malformed HTTP request: %s" % message),
                                 self.requestline)
        self.environ = self.get_environ()
        self.application = self.server.application
        self.handle_one_response()
        self._deadline = 0.0
        if self.close_connection or self.detached:
            return None
        return True

    def read_request(self, raw_requestline):
        """Parse the request line and headers into what pywsgi's environ needs.

        pywsgi would parse the headers with the email package, which costs
        more than the rest of the handshake; this parser is strict instead
        (a line without a colon, a folded line or a bad name is a 400).
        """
        if not raw_requestline.isprintable():
            raise BadRequest("request line is not printable text")
        words = raw_requestline.split()
        if len(words) != 3:
            raise BadRequest("request line must be METHOD TARGET HTTP-VERSION")
        self.command, self.path, self.request_version = words
        if not self._check_http_version():
            raise BadRequest("unsupported HTTP version %r" % self.request_version)
        self.headers = headers = RequestHeaders.parse(self._header_block)
        # SSL_* headers are the server's word about the client certificate.
        dropped = headers.remove_prefix("SSL_")
        if dropped:
            log.info("%s: dropped client-supplied header(s) %s", self.peer, ", ".join(dropped))
        if self.tls is not None:
            common_name = self.tls.peer_common_name()
            if common_name is not None:
                headers["SSL_CLIENT_S_DN_CN"] = common_name
        if headers.get("transfer-encoding", "").lower() == "chunked":
            headers.remove("content-length")
        content_length = headers.get("content-length")
        if content_length is not None:
            if not content_length.isdigit():
                raise BadRequest("invalid Content-Length %r" % content_length)
            content_length = int(content_length)
            if content_length and self.command == "HEAD":
                raise BadRequest("unexpected Content-Length on HEAD")
        self.content_length = content_length
        connection = headers.get("connection", "").lower()
        if self.request_version == "HTTP/1.1":
            self.close_connection = connection == "close"
        else:
            self.close_connection = connection != "keep-alive"
        return True

    def get_environ(self):
        environ = WSGIHandler.get_environ(self)
        environ["RAW_URI"] = self.path
        if self.tls is not None:
            environ["wsgi.url_scheme"] = "https"
            environ["HTTPS"] = "on"
        return environ

    def _refusal(self, exc: HTTPError, what: str):
        log.info("%s: refused %r: %d %s", self.peer, redact_uri(what[:200]), exc.status,
                 exc.log_text)
        self._logged_refusal = True
        self.close_connection = True
        return exc.status_line, response_bytes(exc.status_line, exc.text, exc.headers)

    def handle(self):
        try:
            if not self._open_connection():
                return
            while self.socket is not None:
                result = self.handle_one_request()
                if result is None:
                    break
                if result is True:
                    continue
                self.status, body = result
                self._send_and_close(body)
                break
        finally:
            if self.socket is not None:
                try:
                    self.socket.close()
                except OSError:
                    pass
                self.socket = None
            self.rfile = None

    def _open_connection(self) -> bool:
        """Tell TLS from plain by the first byte and do the TLS handshake.

        False when the connection is over (refused or failed, logged here).
        Without a certificate nothing is peeked (--ssl-only needs one): the
        request reader itself recognises a TLS hello.
        """
        server = self.server
        self._deadline = time.monotonic() + server.handshake_timeout
        context = server.tls_context
        if context is None and not server.ssl_only:
            return True
        first = None
        try:
            with gevent.Timeout(server.handshake_timeout, False):
                first = self.socket.recv(1, socket.MSG_PEEK)
        except OSError as exc:
            log.info("%s: client disconnected during the handshake: %s",
                     self.peer, exc.strerror or exc)
            return False
        if first == b"":
            return False          # connected and closed: nothing to say
        if first is None:
            return True           # nothing in time: the request reader answers 408
        if not looks_like_tls(first[0]):
            if server.ssl_only:
                self._refuse_plain()
                return False
            return True
        stream = TLSStream(self._raw_socket(), context, server_side=True)
        self.socket = self.tls = stream
        self.rfile = HeadReader(stream)
        try:
            stream.handshake(self._deadline)
        except socket.timeout:
            log.info("%s: TLS handshake not completed within %g s", self.peer,
                     server.handshake_timeout)
            return False
        except OSError as exc:        # ssl.SSLError is an OSError
            log.info("%s: TLS handshake failed: %s", self.peer, describe_error(exc))
            return False
        log.debug("%s: TLS %s established", self.peer, stream.version())
        return True

    def _refuse_plain(self) -> None:
        self.requestline = ""
        self.status, body = self._refusal(
            HTTPError(403, "Forbidden", "this port requires TLS: use wss:// or https://"),
            "plain connection")
        self._send_and_close(body)

    def _send_and_close(self, body: bytes) -> None:
        """Send a refusal, then let the client read it before the socket closes.

        Closing with unread request bytes would make the kernel send a reset
        that can destroy the response in flight, so read them out briefly.
        """
        sock = self.socket
        if sock is None:
            return
        self.socket = None
        self.headers_sent = True
        self.close_connection = True
        try:
            sock.sendall(body)
            sock.shutdown(socket.SHUT_WR)
            with gevent.Timeout(1.0, False):
                drained = 0
                while drained < 256 * 1024:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    drained += len(chunk)
        except OSError:
            pass
        finally:
            sock.close()

    # -- answering ---------------------------------------------------------

    def run_application(self):
        server = self.server
        try:
            if is_upgrade_request(self.environ):
                self._upgrade()
                return
            if server.web_auth and server.auth is not None:
                server.auth.check(self.headers, *server.auth_target)
        except HTTPError as exc:
            self.status, body = self._refusal(exc, self.requestline)
            self._send_and_close(body)
            return
        WSGIHandler.run_application(self)

    def _upgrade(self) -> None:
        environ = self.environ
        if self.request_version != "HTTP/1.1":
            raise BadRequest("WebSocket upgrade needs HTTP/1.1, got %s" % self.request_version)
        if ("HTTP_SEC_WEBSOCKET_VERSION" not in environ
                and "HTTP_SEC_WEBSOCKET_KEY" not in environ):
            self._upgrade_hixie()
            return
        version = environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip()
        if version not in SUPPORTED_VERSIONS:
            what = ("unsupported WebSocket version %r" % version if version
                    else "missing Sec-WebSocket-Version")
            raise BadRequest("%s; supported versions: %s" % (what, ", ".join(SUPPORTED_VERSIONS)),
                             [("Sec-WebSocket-Version", ", ".join(SUPPORTED_VERSIONS))])
        key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
        if not key:
            raise BadRequest("missing Sec-WebSocket-Key")
        try:
            raw_key = base64.b64decode(key, validate=True)
        except (binascii.Error, ValueError):
            raw_key = b""
        if len(raw_key) != 16:
            raise BadRequest("invalid Sec-WebSocket-Key: must be 16 bytes in base64")
        protocol = choose_subprotocol(environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL"))
        codec = legacy.BASE64 if protocol == "base64" else HYBI
        self._check_codec(codec)
        session = self.server.service.open_target(self)          # may raise 502/504
        headers = ["HTTP/1.1 101 Switching Protocols",
                   "Upgrade: websocket",
                   "Connection: Upgrade",
                   "Sec-WebSocket-Accept: %s" % accept_key(key)]
        if protocol:
            headers.append("Sec-WebSocket-Protocol: %s" % protocol)
        self._accept(session, codec, ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1"),
                     "101 Switching Protocols")

    def _upgrade_hixie(self) -> None:
        """Draft 76 (Sec-WebSocket-Key1/2 and key3) or draft 75 (neither)."""
        environ = self.environ
        key1 = environ.get("HTTP_SEC_WEBSOCKET_KEY1")
        key2 = environ.get("HTTP_SEC_WEBSOCKET_KEY2")
        host = environ.get("HTTP_HOST", "").strip()
        if not host:
            raise BadRequest("missing Host (a Hixie handshake answers with the location)")
        if key1 is None and key2 is None:
            codec = legacy.HIXIE_75
        elif key1 is None or key2 is None:
            raise BadRequest("Hixie-76 handshake needs both Sec-WebSocket-Key1 and Key2")
        else:
            codec = legacy.HIXIE_76
            numbers = (legacy.hixie76_key_number(key1, "Sec-WebSocket-Key1"),
                       legacy.hixie76_key_number(key2, "Sec-WebSocket-Key2"))
        self._check_codec(codec)
        if codec is legacy.HIXIE_76:
            key3 = self._read_key3()
            if key3 is None:
                return
            answer = legacy.hixie76_challenge(numbers[0], numbers[1], key3)
        else:
            answer = b""
        protocol = environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL"
                               if codec is legacy.HIXIE_76 else "HTTP_WEBSOCKET_PROTOCOL")
        scheme = "wss" if environ.get("wsgi.url_scheme") == "https" else "ws"
        location = "%s://%s%s" % (scheme, host, self.path)
        response = legacy.hixie_response(codec.draft, environ.get("HTTP_ORIGIN"), location,
                                         protocol.strip() if protocol else None)
        session = self.server.service.open_target(self)          # may raise 502/504
        self._accept(session, codec, response + answer,
                     response.split(b"\r\n", 1)[0][9:].decode("latin-1"))

    def _read_key3(self) -> Optional[bytes]:
        """The 8 bytes after a draft-76 head, under the handshake deadline.

        They are often in the same packet as the head (then in the reader's
        buffer already).  None when the client left (logged here).
        """
        rfile = self.rfile
        remaining = self._deadline - time.monotonic()
        try:
            with gevent.Timeout(max(remaining, 0.001),
                                _key3_timeout(self.server.handshake_timeout)):
                while len(rfile.buffer) < 8:
                    chunk = self.socket.recv(_READ_SIZE)
                    if not chunk:
                        raise ClientGone("connection closed before the 8 bytes after the head")
                    rfile.buffer += chunk
        except OSError as exc:
            log.info("%s: client disconnected during the handshake: %s",
                     self.peer, exc.strerror or exc)
            self.close_connection = True
            return None
        except ClientGone as exc:
            log.info("%s: client disconnected during the handshake: %s", self.peer, exc)
            self.close_connection = True
            return None
        key3, rfile.buffer = rfile.buffer[:8], rfile.buffer[8:]
        return key3

    def _check_codec(self, codec: Codec) -> None:
        """Refuse a legacy client when the service frames its own output as HyBi."""
        if codec.binary:
            return
        session_class = getattr(self.server.service, "session_class", None)
        if session_class is not None and not session_class.codec_framing:
            raise BadRequest("%s WebSocket clients are not supported by this service"
                             % codec.name)

    def _accept(self, session, codec: Codec, response: bytes, status: str) -> None:
        """Send the 101 (the target is connected) and start the session."""
        try:
            self.socket.sendall(response)
        except OSError as exc:
            session.abandon()
            log.info("%s: client disconnected during the handshake: %s",
                     self.peer, exc.strerror or exc)
            self.close_connection = True
            return
        self.status = status
        self.headers_sent = True
        self.close_connection = True
        self.codec = codec
        early = self.rfile.take_buffer()
        client = self._detach()
        self.server.service.start_session(session, client, early, self)

    def _detach(self):
        """Hand the client connection to the relay: a plain socket or the TLS stream."""
        if self.tls is not None:
            stream = self.tls
            self.socket = None
        else:
            stream = self._raw_socket()
        self.detached = True
        return stream

    def _raw_socket(self) -> _socket.socket:
        """Take the client socket away from gevent, as a non-blocking plain socket."""
        gsock = self.socket
        family = gsock.family
        fd = gsock.detach()
        self.socket = None
        sock = _socket.socket(family, socket.SOCK_STREAM, 0, fd)
        sock.setblocking(False)
        return sock

    def log_request(self):
        if self.detached or self.status is None:
            return
        status = self._orig_status or self.status
        if isinstance(status, bytes):
            status = status.decode("latin-1")
        if status.startswith("101"):
            return
        if self._logged_refusal:
            return
        length = self.response_length or "-"
        log.info("%s: \"%s\" %s %s", self.peer, redact_uri(self.requestline),
                 status.split(" ", 1)[0], length)
