"""The agent's I/O (gevent): the WebSocket to the server, the mux on it, a connection per stream.

``Agent.run`` loops forever: take a token, dial (TCP, TLS verified against
the system CAs or --ca-cert, the opening handshake with subprotocol
``websockify-tunnel.v1``; ``--http`` says the service speaks HTTP), tell
the viewer URL from the 101 if any (agent/viewer.py), run a ``Tunnel``
until it ends, wait what
``Backoff`` says, dial again.

A ``Tunnel`` is one WebSocket to the server and four kinds of greenlets:

* the reader: WebSocket frames from the server (``FrameParser`` expecting
  them unmasked) -> whole messages -> ``Connection.receive_message`` ->
  events, handled at once (nothing in it blocks);
* the writer: the mux's ``data_to_send`` as masked binary frames (a fresh
  ``os.urandom`` key per frame), with pongs and the close frame first, and
  between those batches the streams' in-place messages, one read each;
* the timer: ``Liveness`` pings, and the end of a server silent too long;
* per stream, once the service is connected: one greenlet reads the
  service only while the stream has credit (``send_window > 0``; a
  ``SendWindowOpened`` wakes it) and another writes what the server sent,
  then calls ``consumed`` so credit goes back.  A stream thus holds at most
  its window in each direction, whatever the service or the user does.
  The reader reads up to IN_PLACE_READ bytes straight into the messages
  that carry them (protocol/inplace.py: one system call each way, no copy in
  the process), hands them to the writer and waits until they are sent;
  when all IN_PLACE_BUFFERS buffers are in use (or the stream's bytes are
  queued) it reads into the mux's queue as before.
"""

import ipaddress
import logging
import os
import re
import socket
import ssl
import time
from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

import gevent
from gevent import socket as gsocket
from gevent import ssl as gssl
from gevent.event import Event

from websockify import __version__
from websockify.agent.backoff import Backoff
from websockify.agent.tokens import TokenError, TokenFile, TokenStdin
from websockify.agent.viewer import ViewerURL
from websockify.errors import EXIT_CONFIG, EXIT_OK, TunnelHandshakeError, WebSocketError
from websockify.net.sendqueue import send_some
from websockify.net.tls import describe_error
from websockify.protocol import mux
from websockify.protocol.frames import (OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, FrameParser,
                                        client_header_length, close_payload,
                                        encode_client_frame, pack_client_header,
                                        parse_close_payload, unmask_into)
from websockify.protocol.handshake import (HEADER_LIMIT, RequestHeaders, check_client_response,
                                           client_key, client_request, head_end)
from websockify.protocol.inplace import MessageLayout

log = logging.getLogger("websockify.agent")

#: Most bytes read from a service socket at once (and never more than the credit).
READ_CHUNK = 1024 * 1024
#: Bytes of mux messages framed per write to the server, so that control
#: frames queued meanwhile go out before the rest of a bulk transfer.
WRITE_BATCH = 1024 * 1024
#: The largest message the agent accepts from the server, announced in its
#: upgrade (mux.MESSAGE_HEADER); the server's own packs at most 64 KiB + headers.
MAX_MESSAGE = 1024 * 1024
#: Bytes one read of a service takes into a stream's in-place messages
#: (protocol/inplace.py): several messages per system call each way.
IN_PLACE_READ = 4 * 1024 * 1024
#: In-place messages sent per write: about WRITE_BATCH bytes (4 full ones).
IN_PLACE_WRITE = 4
#: In-place buffers a tunnel makes at most (kept for reuse): a stream that
#: finds none free reads through the queue instead.  So bulk streams cost
#: the agent at most IN_PLACE_BUFFERS * IN_PLACE_READ bytes of buffers.
IN_PLACE_BUFFERS = 2
_RECV = 256 * 1024
_CLOSE_WAIT = 1.0           # seconds the close frame gets to go out at the end
_BODY_LIMIT = 2048          # bytes of a refusal's body read for the log

#: Close codes from the server after which the agent waits the back-off cap:
#: 1000 (the server's "replaced by a new connection" for this ID) and 1008
#: (the agent was removed from the configuration).  1001 (the server
#: restarting) and the others are retried as any lost connection.
SENT_AWAY = (1000, 1008)

_HTML_TITLE = re.compile(r"<title>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_CONTENT_LENGTH = re.compile(rb"\r?\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


def mask_messages(messages: List[tuple], prefix: bytes = b"",
                  buffer: Optional[bytearray] = None) -> memoryview:
    """Binary messages (``Connection.message_parts``: (parts, size) each) as
    masked client frames, after ``prefix`` (frames already encoded), all in
    one buffer: ``buffer`` (grown when too small) when given, so that a
    writer reuses one buffer for every batch.

    Each message gets its own random key (one os.urandom call for all of
    them); its parts are copied once into place and masked there: no joined
    payloads, and with a reused buffer no fresh pages to fault in and zero
    (the bulk path's copies are the kernel's and this one).
    """
    total = len(prefix)
    for _, size in messages:
        total += size + client_header_length(size)
    if buffer is None:
        out = bytearray(total)
    else:
        out = buffer
        if len(out) < total:
            out.extend(bytes(total - len(out)))
    view = memoryview(out)
    keys = os.urandom(4 * len(messages))
    pos = len(prefix)
    view[:pos] = prefix
    for index, (parts, size) in enumerate(messages):
        key = keys[4 * index:4 * index + 4]
        pos = pack_client_header(out, pos, size, key)
        begin = pos
        for part in parts:
            end = pos + len(part)
            view[pos:end] = part
            pos = end
        unmask_into(out, begin, pos, key)
    return view[:total]


class AgentSetupError(Exception):
    """Something named on the command line cannot be used: exit EXIT_CONFIG."""


def build_tls_context(config) -> Optional[ssl.SSLContext]:
    """The client context for wss://: certificate and host name verified."""
    if not config.server.secure:
        return None
    # ssl.create_default_context's settings, on gevent's SSLContext: the
    # stdlib's (which gevent.ssl.create_default_context returns) makes
    # sockets whose reads block the whole process.
    context = gssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)      # verifies cert and host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    try:
        if config.ca_cert:
            context.load_verify_locations(cafile=config.ca_cert)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except (OSError, ssl.SSLError) as exc:
        raise AgentSetupError("cannot load the CA certificates %s: %s"
                              % (config.ca_cert, describe_error(exc))) from None
    if config.client_cert:
        try:
            context.load_cert_chain(config.client_cert, config.client_key)
        except (OSError, ssl.SSLError) as exc:
            raise AgentSetupError("cannot load the client certificate %s: %s"
                                  % (config.client_cert, describe_error(exc))) from None
    return context


def connect_tcp(address: Tuple[str, int], timeout: float) -> socket.socket:
    """A TCP connection within ``timeout``.  An IP address is connected at
    once; only a name goes through the resolver (gevent's runs getaddrinfo in
    a thread, a hand-off per stream that many opens at once would queue on)."""
    host, port = address
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return gsocket.create_connection((host, port), timeout=timeout)
    sock = gsocket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (ssl.SSLError, ssl.CertificateError)):
        return "TLS: %s" % describe_error(exc)
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return "cannot resolve the host: %s" % (exc.strerror or exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


class Agent:
    """Keeps one tunnel to the server up, forever."""

    def __init__(self, config, backoff: Optional[Backoff] = None):
        self.config = config
        self.tls = build_tls_context(config)
        cap = config.max_retry_delay
        self.backoff = backoff or Backoff(base=min(0.5, cap), cap=cap)
        self.tokens = None
        if config.token_file:
            self.tokens = TokenFile(config.token_file)
            try:
                self.tokens.current()
            except TokenError as exc:
                raise AgentSetupError(str(exc)) from None
        elif config.token_stdin:
            self.tokens = TokenStdin()
        if config.url_file:
            folder = os.path.dirname(os.path.abspath(config.url_file))
            if not os.access(folder, os.W_OK | os.X_OK):
                raise AgentSetupError("cannot write the viewer URL file %s: the folder %s "
                                      "is missing or not writable" % (config.url_file, folder))
        self.viewer = ViewerURL(config.url_file, expected=config.http)
        self.tunnel: Optional["Tunnel"] = None
        self.stopping = False
        self.connections = 0        # tunnels that came up
        self._loop = None

    # -- the reconnect loop -------------------------------------------------

    def run(self) -> int:
        cfg = self.config
        log.info("websockify-agent %s: service %s, server %s", __version__,
                 "%s:%d" % cfg.service if ":" not in cfg.service[0] else "[%s]:%d" % cfg.service,
                 cfg.server)
        if not cfg.server.secure:
            log.warning("the server URL is ws://: the tunnel is not encrypted and the "
                        "server is not authenticated")
        if isinstance(self.tokens, TokenStdin):
            self.tokens.start()
        self._loop = gevent.spawn(self._run_loop)
        try:
            status = self._loop.get()
            # A loop killed by stop() ends with GreenletExit as its value.
            return status if isinstance(status, int) else EXIT_OK
        finally:
            if isinstance(self.tokens, TokenStdin):
                self.tokens.stop()

    def stop(self, signame: str = "stop") -> None:
        """Stop now: the open tunnel is closed with 1001, then run() returns."""
        if self.stopping:
            return
        self.stopping = True
        log.info("%s: stopping", signame)
        if self.tunnel is not None:
            self.tunnel.close(1001, "agent stopping")
        elif self._loop is not None:
            self._loop.kill(block=False)

    def _run_loop(self) -> int:
        server = self.config.server
        while not self.stopping:
            try:
                token = self._token()
            except TokenError as exc:
                if isinstance(self.tokens, TokenStdin) and self.tokens.closed:
                    log.error("%s", exc)
                    return EXIT_CONFIG
                delay = self.backoff.failed()
                log.error("%s; retrying in %.1f s", exc, delay)
                gevent.sleep(delay)
                continue
            try:
                sock, rest, answer = self.dial(token)
            except TunnelHandshakeError as exc:
                text = str(exc)
                body = getattr(exc, "body", "")
                if body:
                    text = "%s: %s" % (text, body)
                if exc.status in (401, 403):
                    delay = self.backoff.refused()
                    log.error("the server refused the agent: %s; retrying in %.1f s",
                              text, delay)
                else:
                    delay = self.backoff.failed()
                    log.error("handshake with %s failed: %s; retrying in %.1f s",
                              server, text, delay)
                gevent.sleep(delay)
                continue
            except (OSError, ssl.CertificateError) as exc:
                delay = self.backoff.failed()
                log.error("cannot connect to %s: %s; retrying in %.1f s",
                          server, _reason(exc), delay)
                gevent.sleep(delay)
                continue
            except Exception:       # a bug: keep the agent dialing
                delay = self.backoff.failed()
                log.exception("cannot connect to %s: internal error; retrying in %.1f s",
                              server, delay)
                gevent.sleep(delay)
                continue
            self.connections += 1
            connected_at = time.monotonic()
            log.info("connected to %s: tunnel up", server)
            self.viewer.connected(answer.get(mux.VIEWER_URL_HEADER.lower()))
            # The server's window when it took up ours (an older one: the default).
            peer_window = mux.parse_window(answer.get(mux.WINDOW_HEADER.lower()))
            # The largest message the server takes (an older one: the default).
            peer_message = mux.parse_max_message(answer.get(mux.MESSAGE_HEADER.lower()))
            tunnel = self.tunnel = Tunnel(self, sock, rest, peer_window=peer_window,
                                          peer_max_message=peer_message)
            try:
                reason = tunnel.run()
            finally:
                self.tunnel = None
            if self.stopping:
                break
            connected_for = time.monotonic() - connected_at
            if tunnel.server_close_code in SENT_AWAY:
                # Replaced by another agent with this ID, or removed from the
                # configuration: coming straight back would only flap.
                self.backoff.disconnected(connected_for)
                delay = self.backoff.refused()
            else:
                delay = self.backoff.disconnected(connected_for)
            log.warning("tunnel closed: %s; reconnecting in %.1f s", reason, delay)
            gevent.sleep(delay)
        return EXIT_OK

    def _token(self) -> Optional[str]:
        if self.tokens is None:
            return None
        self.tokens.wait()
        return self.tokens.current()

    # -- one connection -----------------------------------------------------

    def dial(self, token: Optional[str]) -> Tuple[socket.socket, bytes, RequestHeaders]:
        """TCP, TLS and the opening handshake, within --connect-timeout.

        Returns the socket, the bytes read past the 101's head and the 101's
        headers (its viewer URL, the server's window); raises OSError (TLS
        errors included) or TunnelHandshakeError.
        """
        cfg = self.config
        server = cfg.server
        deadline = time.monotonic() + cfg.connect_timeout
        sock = connect_tcp((server.host, server.port), cfg.connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=server.host)
            key = client_key(os.urandom(16))
            sock.sendall(client_request(server.host_header, server.target, key,
                                        mux.SUBPROTOCOL, upgrade_headers(token, cfg.http)))
            head, rest = _read_head(sock, deadline)
            try:
                answer = check_client_response(head, key, mux.SUBPROTOCOL)
            except TunnelHandshakeError as exc:
                exc.body = _read_body(sock, head, rest, deadline)
                raise
            sock.settimeout(None)
            return sock, rest, answer
        except BaseException:
            sock.close()
            raise


def upgrade_headers(token: Optional[str], http_service: bool) -> List[Tuple[str, str]]:
    """The agent's own headers in its upgrade request: who it is, its token,
    and (--http) that its service speaks HTTP."""
    headers = [("User-Agent", "websockify-agent/%s" % __version__)]
    if token:
        headers.append(("Authorization", "Bearer %s" % token))
    if http_service:
        headers.append((mux.SERVICE_HEADER, "http"))
    headers.append((mux.WINDOW_HEADER, str(mux.LARGE_WINDOW)))
    headers.append((mux.MESSAGE_HEADER, str(MAX_MESSAGE)))
    return headers


def _read_head(sock, deadline: float) -> Tuple[bytes, bytes]:
    data = b""
    while True:
        end, size = head_end(data, 0)
        if end >= 0:
            return data[:end + size], data[end + size:]
        if len(data) > HEADER_LIMIT:
            raise TunnelHandshakeError(0, "", "the server's answer has no end of head "
                                              "within %d bytes" % HEADER_LIMIT)
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        sock.settimeout(left)
        chunk = sock.recv(4096)
        if not chunk:
            raise TunnelHandshakeError(0, "", "the server closed the connection before "
                                              "answering the upgrade" if not data else
                                              "the server closed the connection in its answer")
        data += chunk


def _read_body(sock, head: bytes, rest: bytes, deadline: float) -> str:
    """The first line of a refusal's text body, for the log (best effort)."""
    match = _CONTENT_LENGTH.search(head)
    want = min(int(match.group(1)), _BODY_LIMIT) if match else _BODY_LIMIT
    body = rest
    try:
        while len(body) < want:
            left = min(deadline - time.monotonic(), 2.0)
            if left <= 0:
                break
            sock.settimeout(left)
            chunk = sock.recv(want - len(body))
            if not chunk:
                break
            body += chunk
    except OSError:
        pass
    text = body[:want].decode("utf-8", "replace").strip()
    # A proxy's HTML error page (nginx refusing a missing client certificate)
    # says why in its title.
    title = _HTML_TITLE.search(text)
    if title:
        return " ".join(title.group(1).split())[:200]
    return text.splitlines()[0][:200] if text else ""


class _Stream:
    """A stream whose service connection is up."""

    __slots__ = ("id", "sock", "peer", "out", "out_wake", "window_wake", "sent_wake", "reader",
                 "writer", "reader_done", "writer_done", "closed")

    def __init__(self, stream_id: int, sock, peer: str):
        self.id = stream_id
        self.sock = sock
        self.peer = peer
        self.out: Deque[Optional[bytes]] = deque()   # for the service; None: the server's FIN
        self.out_wake = Event()
        self.window_wake = Event()
        self.sent_wake = Event()     # the writer sent this stream's in-place messages
        self.reader = None
        self.writer = None
        self.reader_done = False    # the service's EOF was passed on as FIN
        self.writer_done = False    # the server's FIN was passed on as shutdown(SHUT_WR)
        self.closed = False


class _Ended(Exception):
    pass


class Tunnel:
    """One WebSocket to the server carrying the mux, until it ends."""

    def __init__(self, agent: Agent, sock, rest: bytes = b"",
                 peer_window: Optional[int] = None, peer_max_message: Optional[int] = None):
        cfg = agent.config
        self.agent = agent
        self.config = cfg
        self.sock = sock
        self._rest = rest
        self.conn = mux.tunnel_connection("agent", peer_window, peer_max_message)
        self.live = mux.Liveness(cfg.ping_interval, cfg.dead_after, now=time.monotonic())
        self.parser = FrameParser(self._on_data, self._on_control, max_frame_size=MAX_MESSAGE,
                                  expect_masked=False, on_message_end=self._on_message_end)
        self.streams: Dict[int, _Stream] = {}
        self._message = bytearray()     # a message arriving over several chunks
        self._view = None               # or its first chunk, still in the read buffer
        self._ws_out: list = []       # pongs and the close frame, sent before mux data
        self._wake = Event()
        self._done = Event()
        self._close_queued = False
        #: Streams' in-place reads for the writer: (stream, layout, the messages
        #: not sent yet), in order.
        self._in_place: Deque[tuple] = deque()
        self._layouts: List[MessageLayout] = []     # made and free, for the next read
        self._layouts_made = 0
        self.server_close_code: Optional[int] = None   # the code of the server's close frame
        self.reason = ""
        self._greenlets: list = []

    # -- life --------------------------------------------------------------

    def run(self) -> str:
        """Carry the tunnel until it ends; returns why it ended."""
        self._greenlets = [gevent.spawn(self._read_loop), gevent.spawn(self._write_loop),
                           gevent.spawn(self._timer_loop)]
        try:
            self._done.wait()
        finally:
            self._teardown()
        return self.reason

    def close(self, code: int, reason: str) -> None:
        """End the tunnel with a close frame (code, reason)."""
        self._send_close(code, reason)
        self._end(reason)

    def _end(self, reason: str) -> None:
        if not self._done.is_set():
            self.reason = reason
            self._done.set()

    def _send_close(self, code: int, reason: str) -> None:
        if not self._close_queued:
            self._close_queued = True
            self._ws_out.append(encode_client_frame(OP_CLOSE, close_payload(code, reason),
                                                    os.urandom(4)))
            self._wake.set()

    def _teardown(self) -> None:
        reader, writer, timer = self._greenlets
        if self._close_queued and writer and not writer.dead:
            writer.join(_CLOSE_WAIT)
        gevent.killall([reader, writer, timer], block=True, timeout=1.0)
        streams = list(self.streams.values())
        for stream in streams:
            self._close_stream(stream)
        if streams:
            log.info("%d stream(s) closed with the tunnel", len(streams))
        try:
            self.sock.close()
        except OSError:
            pass

    # -- reading from the server ------------------------------------------

    def _read_loop(self) -> None:
        sock = self.sock
        try:
            if self._rest:
                self.live.heard(time.monotonic())
                self.parser.feed(self._rest)
                self._keep_partial()
                self._rest = b""
            buf = bytearray(_RECV)
            parser = self.parser
            live = self.live
            monotonic = time.monotonic
            while not self._done.is_set():
                n = sock.recv_into(buf)
                if not n:
                    self._end("the server closed the connection")
                    return
                live.heard(monotonic())
                parser.feed_buffer(buf, n)
                if self._view is not None:
                    self._keep_partial()
        except WebSocketError as exc:
            log.error("protocol error from the server: %s (closing with %d)",
                      exc.reason, exc.close_code)
            self.close(exc.close_code, exc.reason)
        except _Ended:
            pass
        except OSError as exc:
            self._end("connection lost: %s" % _reason(exc))
        except Exception:       # a bug: end this tunnel, keep the agent
            log.exception("internal error reading from the server")
            self.close(1011, "agent internal error")

    def _on_data(self, chunk, opcode: int) -> None:
        if opcode == OP_TEXT:
            raise mux.MuxProtocolError("a text message (the mux is binary messages only)")
        if self._view is None and not self._message:
            # Most messages are one chunk of the read buffer: no copy of it.
            self._view = chunk
            return
        if self._view is not None:
            self._message += self._view
            self._view = None
        self._message += chunk
        if len(self._message) > MAX_MESSAGE:
            raise mux.MuxProtocolError("a message over %d bytes" % MAX_MESSAGE)

    def _keep_partial(self) -> None:
        """The read buffer is about to be reused: copy a message's first chunk out of it."""
        if self._view is not None:
            self._message += self._view
            self._view = None

    def _on_control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            self._ws_out.append(encode_client_frame(OP_PONG, payload, os.urandom(4)))
            self._wake.set()
        elif opcode == OP_CLOSE:
            code, reason = parse_close_payload(payload)
            self.server_close_code = code
            self._send_close(code if code is not None else 1000, "")
            self._end("the server closed the tunnel (%s%s)"
                      % (code if code is not None else "no code",
                         ": %s" % reason if reason else ""))
            raise _Ended()

    def _on_message_end(self, opcode: int) -> None:
        if self._view is not None:
            message = self._view
            self._view = None
        else:
            message = self._message
            self._message = bytearray()
        for event in self.conn.receive_message(message):
            kind = type(event)
            if kind is mux.DataReceived:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.out.append(event.data)
                    stream.out_wake.set()
            elif kind is mux.SendWindowOpened:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.window_wake.set()
            elif kind is mux.StreamOpened:
                gevent.spawn(self._open_stream, event.stream_id, event.meta)
            elif kind is mux.StreamEnded:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.out.append(None)
                    stream.out_wake.set()
            elif kind is mux.StreamReset:
                stream = self.streams.get(event.stream_id)
                log.debug("stream %d reset by the server: %s %s", event.stream_id,
                          event.code.name, event.reason)
                if stream is not None:
                    self._close_stream(stream)
            elif kind is mux.GoAwayReceived:
                log.info("the server is going away (%d%s): no new streams",
                         event.code, ": %s" % event.reason if event.reason else "")
        if self.conn.has_data_to_send():
            self._wake.set()

    # -- writing to the server --------------------------------------------

    def _write_loop(self) -> None:
        sock = self.sock
        conn = self.conn
        wake = self._wake
        in_place = self._in_place
        plain = not isinstance(sock, (ssl.SSLSocket, gssl.SSLSocket))
        out_buffer = bytearray()
        try:
            while True:
                wake.wait()
                wake.clear()
                while True:
                    frames = self._ws_out
                    self._ws_out = []
                    closing = self._close_queued
                    messages = [] if closing else conn.message_parts(WRITE_BATCH)
                    if frames or messages:
                        prefix = frames[0] if len(frames) == 1 else b"".join(frames)
                        if messages:
                            # One buffer for every batch: sendall is done with it
                            # before the next batch is built.
                            wire = mask_messages(messages, prefix, out_buffer)
                            try:
                                sock.sendall(wire)
                            finally:
                                wire.release()
                        else:
                            sock.sendall(prefix)
                        if closing:
                            return
                    elif not in_place:
                        break
                    if in_place:
                        # A stream's in-place messages, IN_PLACE_WRITE at a time,
                        # each batch after what was queued before it: control
                        # frames wait behind at most one batch.
                        stream, layout, wire = in_place[0]
                        done = True
                        try:
                            if conn.is_open(stream.id):
                                batch = wire[:IN_PLACE_WRITE]
                                del wire[:IN_PLACE_WRITE]
                                done = not wire
                                # send_some, not sendall: one sendmsg gathers the
                                # batch (no SO_SNDBUF query, no 1 MiB chunks).
                                while batch:
                                    send_some(sock, batch, plain)
                        finally:
                            if done:
                                in_place.popleft()
                                self._layouts.append(layout)
                                stream.sent_wake.set()
        except OSError as exc:
            self._end("connection lost: %s" % _reason(exc))
        except Exception:
            log.exception("internal error writing to the server")
            self._end("agent internal error")

    def _take_layout(self) -> Optional[MessageLayout]:
        """A free in-place buffer, a new one if fewer than IN_PLACE_BUFFERS exist, else None."""
        if self._layouts:
            return self._layouts.pop()
        if self._layouts_made >= IN_PLACE_BUFFERS:
            return None
        self._layouts_made += 1
        return MessageLayout.for_connection(self.conn, IN_PLACE_READ)

    # -- liveness ------------------------------------------------------------

    def _timer_loop(self) -> None:
        live = self.live
        while not self._done.is_set():
            now = time.monotonic()
            verdict = live.poll(now)
            if verdict == "dead":
                log.warning("the server has been silent for %g s: it is dead",
                            self.config.dead_after)
                self.close(1011, "peer silent for %g s" % self.config.dead_after)
                return
            if verdict == "ping":
                self.conn.ping(os.urandom(mux.PING_SIZE))
                self._wake.set()
            gevent.sleep(max(0.005, live.next_deadline(now) - now))

    # -- streams -------------------------------------------------------------

    def _open_stream(self, stream_id: int, meta: dict) -> None:
        cfg = self.config
        conn = self.conn
        peer = str(meta.get("peer", "?"))[:100]
        try:
            sock = connect_tcp(cfg.service, cfg.connect_timeout)
        except socket.timeout:
            self._refuse(stream_id, peer, mux.ResetCode.TIMEOUT,
                         "service did not answer within %g s" % cfg.connect_timeout)
            return
        except OSError as exc:
            self._refuse(stream_id, peer, mux.ResetCode.REFUSED,
                         "service: %s" % _reason(exc))
            return
        if self._done.is_set() or not conn.is_open(stream_id):
            sock.close()        # the server reset the stream, or the tunnel ended, meanwhile
            return
        sock.settimeout(None)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        stream = _Stream(stream_id, sock, peer)
        self.streams[stream_id] = stream
        conn.accept_stream(stream_id)
        self._wake.set()
        log.debug("stream %d for %s: connected to the service", stream_id, peer)
        stream.reader = gevent.spawn(self._service_to_server, stream)
        stream.writer = gevent.spawn(self._server_to_service, stream)

    def _refuse(self, stream_id: int, peer: str, code: mux.ResetCode, reason: str) -> None:
        log.info("stream %d for %s: %s", stream_id, peer, reason)
        if not self._done.is_set() and self.conn.is_open(stream_id):
            self.conn.reset_stream(stream_id, code, reason)
            self._wake.set()

    def _service_to_server(self, stream: _Stream) -> None:
        conn = self.conn
        sid = stream.id
        sock = stream.sock
        recv = sock.recv
        wake = self._wake
        peek = bytearray(1)
        drained = True      # the last read emptied the socket: wait before taking a buffer
        try:
            while True:
                credit = conn.credit_in_place(sid)
                if credit:
                    # The usual case: read into the messages that carry the bytes
                    # (protocol/inplace.py); idle streams wait holding no buffer.
                    if drained and not sock.recv_into(peek, 1, socket.MSG_PEEK):
                        break
                    layout = self._take_layout()
                    if layout is not None:
                        handed = False
                        try:
                            want = min(credit, layout.capacity)
                            n = sock.recvmsg_into(layout.views(want))[0]
                            if not n:
                                break
                            if not conn.is_open(sid):
                                return
                            drained = n < want
                            conn.sent_in_place(sid, n)
                            wire = layout.seal(sid, n, os.urandom(4 * layout.count(n)))
                            stream.sent_wake.clear()
                            self._in_place.append((stream, layout, wire))
                            handed = True
                        finally:
                            if not handed:
                                self._layouts.append(layout)
                        wake.set()
                        stream.sent_wake.wait()     # the writer is done with the buffer
                        continue
                window = conn.send_window(sid)
                if window <= 0:
                    if not conn.is_open(sid):
                        return
                    stream.window_wake.clear()
                    stream.window_wake.wait()
                    continue
                data = recv(READ_CHUNK if window > READ_CHUNK else window)
                if not data:
                    break
                if not conn.is_open(sid):
                    return
                conn.send_data(sid, data)
                wake.set()
        except OSError as exc:
            self._abort(stream, "service connection: %s" % _reason(exc))
            return
        except Exception:
            log.exception("stream %d: internal error", sid)
            self._abort(stream, "agent internal error", mux.ResetCode.INTERNAL)
            return
        conn.end_stream(sid)
        wake.set()
        stream.reader_done = True
        if stream.writer_done:
            self._close_stream(stream)

    def _server_to_service(self, stream: _Stream) -> None:
        conn = self.conn
        sid = stream.id
        out = stream.out
        sock = stream.sock
        try:
            while True:
                while not out:
                    stream.out_wake.clear()
                    stream.out_wake.wait()
                data = out.popleft()
                if data is None:
                    sock.shutdown(socket.SHUT_WR)
                    break
                # What else is queued goes in the same write (at most the window).
                if out and out[0] is not None:
                    pieces = [data]
                    while out and out[0] is not None:
                        pieces.append(out.popleft())
                    data = b"".join(pieces)
                sock.sendall(data)
                conn.consumed(sid, len(data))
                if conn.has_data_to_send():
                    self._wake.set()
        except OSError as exc:
            self._abort(stream, "service connection: %s" % _reason(exc))
            return
        except Exception:
            log.exception("stream %d: internal error", sid)
            self._abort(stream, "agent internal error", mux.ResetCode.INTERNAL)
            return
        stream.writer_done = True
        if stream.reader_done:
            self._close_stream(stream)

    def _abort(self, stream: _Stream, reason: str,
               code: mux.ResetCode = mux.ResetCode.CANCEL) -> None:
        """The service side failed: RESET (CANCEL) to the server, close the stream."""
        log.debug("stream %d for %s: %s", stream.id, stream.peer, reason)
        if self.conn.is_open(stream.id):
            self.conn.reset_stream(stream.id, code, reason)
            self._wake.set()
        self._close_stream(stream)

    def _close_stream(self, stream: _Stream) -> None:
        if stream.closed:
            return
        stream.closed = True
        self.streams.pop(stream.id, None)
        current = gevent.getcurrent()
        for greenlet in (stream.reader, stream.writer):
            if greenlet is not None and greenlet is not current:
                greenlet.kill(block=False)
        try:
            stream.sock.close()
        except OSError:
            pass
        log.debug("stream %d for %s: closed", stream.id, stream.peer)
