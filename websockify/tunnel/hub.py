"""One worker's tunnels: its agents' links, their users, hand-offs from other workers.

The handshake handler (server/http.py) asks the hub about three kinds of
request: an agent's upgrade at ``<path><ID>`` (authenticated here, then a
tunnel/link.py Link; websocktunnel's clients upgrade at "/" with
``x-websocktunnel-id`` and get a Link speaking wsmux), a browser's ``?token=<ID>`` for an agent with
``token = true`` (the bridge face, tunnel/faces.py) and ``GET <path>`` (the
status page).  Users of the TCP faces come from the faces' acceptors.  A
user for an agent another worker holds goes there through
tunnel/handoff.py; a user for an absent agent is refused at once.  A timer
publishes each link's figures to the registry and closes the links of
agents a reload removed.

With ``registry`` (many instances, one Redis) a tunnel/member.py
ClusterMember also records the links held here in Redis and carries users
of agents no worker here holds to the node that holds them
(``open_remote_stream``).
"""

import logging
import os
import re
import socket
import time
import _socket
from typing import Dict, Optional, Set
from urllib.parse import urlsplit

import gevent

from websockify.addr import format_host_port
from websockify.errors import BadGateway, BadRequest, HTTPError
from websockify.net.sockets import tune_stream
from websockify.protocol.handshake import UpgradeRequest, accept_key, negotiate
from websockify.protocol.codec import HYBI
from websockify.protocol.mux import (LARGE_MESSAGE, MESSAGE_HEADER, SERVICE_HEADER,
                                     SUBPROTOCOL, VIEWER_URL_HEADER, WINDOW_HEADER,
                                     StreamLimitError, parse_max_message, parse_window,
                                     tunnel_connection)
from websockify.protocol.wsmux import ID_HEADER as WSMUX_ID_HEADER
from websockify.protocol.wsmux import URL_HEADER as WSMUX_URL_HEADER
from websockify.protocol.http1 import split_face_target
from websockify.tunnel.faces import (AgentNotConnected, AgentUnavailable, FaceAcceptor,
                                     StreamUser, status_allowed, status_response,
                                     wait_for_open)
from websockify.tunnel.handoff import HandoffListener, HandoffSender, Pipe
from websockify.tunnel.link import Link, liveness_settings

log = logging.getLogger("websockify")

PUBLISH_INTERVAL = 0.2
#: What ``bridge_target`` returns when the connection went to another worker.
HANDED_OFF = object()


class Conflict(HTTPError):
    def __init__(self, text: str):
        super().__init__(409, text)


def agent_response(key: str, url: Optional[str] = None, window: Optional[int] = None,
                   max_message: Optional[int] = None) -> bytes:
    """The 101 for an agent: the tunnel subprotocol answered (its viewer URL, our
    receive window when the agent announced its own, the largest message we accept)."""
    lines = ["HTTP/1.1 101 Switching Protocols",
             "Upgrade: websocket",
             "Connection: Upgrade",
             "Sec-WebSocket-Accept: %s" % accept_key(key),
             "Sec-WebSocket-Protocol: %s" % SUBPROTOCOL]
    if url:
        lines.append("%s: %s" % (VIEWER_URL_HEADER, url))
    if window:
        lines.append("%s: %d" % (WINDOW_HEADER, window))
    if max_message:
        lines.append("%s: %d" % (MESSAGE_HEADER, max_message))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def is_wsmux_request(handler) -> bool:
    """websocktunnel's client registering: an upgrade to "/" with x-websocktunnel-id."""
    return bool(handler.headers.get(WSMUX_ID_HEADER)) and urlsplit(handler.path).path == "/"


_HOST = re.compile(r"[A-Za-z0-9.\-_~%]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.%a-z]+\](:[0-9]{1,5})?")


def viewer_url(handler, http_path: str, agent_id: str, trusted_proxy=None) -> str:
    """The agent's URL for viewers, ``<scheme>://<host><http_path><ID>/``, from the request.

    The scheme is https over TLS (or what a --trusted-proxy says in
    X-Forwarded-Proto), the host the request's Host; raises 400 for a
    missing or malformed Host.
    """
    host = (handler.headers.get("host") or "").strip()
    if not _HOST.fullmatch(host):
        raise BadRequest("a websocktunnel client's request needs a Host header "
                         "(host[:port]) to tell it its URL")
    scheme = "https" if handler.tls is not None else "http"
    forwarded = (handler.headers.get("x-forwarded-proto") or "").strip().lower()
    if forwarded in ("http", "https") and trusted_proxy and \
            trusted_proxy.trusts_peer(handler.client_address):
        scheme = forwarded
    return "%s://%s%s%s/" % (scheme, host, http_path, agent_id)


def wsmux_response(key: str, url: str) -> bytes:
    """The 101 for a websocktunnel client: no subprotocol, its URL in x-websocktunnel-client-url."""
    lines = ["HTTP/1.1 101 Switching Protocols",
             "Upgrade: websocket",
             "Connection: Upgrade",
             "Sec-WebSocket-Accept: %s" % accept_key(key),
             "%s: %s" % (WSMUX_URL_HEADER, url)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def request_bytes(handler) -> bytes:
    """The request as the client sent it so far: its head, then whatever followed it."""
    return (handler.requestline.encode("latin-1") + b"\r\n" + handler._header_block
            + b"\r\n\r\n" + handler.rfile.take_buffer())


def viewer_label(handler, agent_id: str) -> str:
    return "%s -> agent %s (http)" % (handler.peer, agent_id)


def _hand_over(handler):
    """The handler's connection, taken from it: what it carries is answered elsewhere."""
    handler.status = "200 OK"
    handler.headers_sent = True
    handler.close_connection = True
    return handler._detach()


def _raw(sock) -> _socket.socket:
    """A plain non-blocking socket object for a descriptor (the loop drives it)."""
    fd = sock.detach() if hasattr(sock, "detach") else sock
    raw = _socket.socket(fileno=fd)
    raw.setblocking(False)
    return raw


class TunnelHub:
    """The tunnels of one worker process."""

    def __init__(self, host, config, runtime, server, loop, worker_number: int):
        self.host = host
        #: This generation's file (the registry, shared, is what a reload changed since).
        self.tunnels = runtime.tunnels
        self.registry = host.registry
        self.config = config
        self.runtime = runtime
        self.server = server
        self.loop = loop
        self.worker_number = worker_number
        self.pid = os.getpid()
        self.links: Dict[str, Link] = {}
        self.users: Set[StreamUser] = set()
        self.pipes: Set[Pipe] = set()
        #: HTTP viewers' figures not yet added to the registry: ID -> (viewers, requests).
        self.viewer_counts: Dict[str, tuple] = {}
        self.ping_interval, self.dead_after = liveness_settings()
        # An OPEN waits for the shorter of --connect-timeout and the file's connect_timeout.
        self.connect_timeout = min(config.connect_timeout,
                                   getattr(self.tunnels, "connect_timeout", None)
                                   or config.connect_timeout)
        self.sender = HandoffSender(host.directory)
        self.listener = HandoffListener(host.directory, self._on_handoff)
        self.acceptors = {}
        for agent_id, entry in self.tunnels.agents.items():
            sock = runtime.tunnel_listeners.get(entry.listen) if entry.listen else None
            if sock is not None:
                sock.setblocking(False)
                self.acceptors[agent_id] = FaceAcceptor(loop, agent_id, sock, self._tcp_user,
                                                        self._may_accept)
        self.draining = False
        self.cluster = None
        if getattr(self.tunnels, "registry", None):
            from websockify.tunnel.member import ClusterMember
            self.cluster = ClusterMember(self, runtime)
        self._timer = loop.timer(PUBLISH_INTERVAL, PUBLISH_INTERVAL)
        self._timer.start(self._on_timer)

    handed_off = HANDED_OFF

    @property
    def path(self) -> str:
        return self.tunnels.path

    @property
    def http_path(self) -> str:
        return getattr(self.tunnels, "http_path", "/t/")

    def has_http_face(self, agent_id: str) -> bool:
        """Whether viewers reach ``agent_id`` at <http_path><ID>/: ``http = true`` in its
        entry, or registered openly (``open = true``)."""
        entry = self.tunnels.agents.get(agent_id)
        if entry is not None:
            return entry.http
        return bool(getattr(self.tunnels, "open", False)) and self.registry.is_open(agent_id)

    # -- routing (the handshake handler asks) -----------------------------------

    def is_agent_request(self, handler) -> bool:
        """An upgrade under the tunnels' path that offers the tunnel subprotocol or
        names a configured agent (a browser's session elsewhere under a short
        path such as "/" stays a bridge session)."""
        if is_wsmux_request(handler):
            return True
        path = urlsplit(handler.path).path
        if not path.startswith(self.path) or len(path) == len(self.path):
            return False
        offered = handler.headers.get("sec-websocket-protocol", "")
        return (SUBPROTOCOL in [p.strip() for p in offered.split(",")]
                or self.registry.configured(path[len(self.path):]))

    def is_status_request(self, handler) -> bool:
        return handler.command in ("GET", "HEAD") and urlsplit(handler.path).path == self.path

    def bridge_agent(self, handler) -> Optional[str]:
        """The agent a browser's token names, if that agent has a bridge face.

        The token is found as the token plugins find it (``?token=``, also
        inside noVNC's ``?path=``, or a ``token`` cookie).
        """
        from websockify.plugins.tokens import token_from_request
        agent_id = token_from_request(handler.environ, False)
        if not agent_id:
            return None
        entry = self.tunnels.agents.get(agent_id)
        if entry is None or not entry.token:
            return None
        if self.runtime.tokens is not None:
            # A token plugin that knows the token wins (asked as for any session,
            # under --connect-timeout).
            try:
                self.server.service.pick_target(handler)
                return None
            except HTTPError:
                pass
        return agent_id

    # -- agents --------------------------------------------------------------------

    def accept_agent(self, handler) -> None:
        """An agent's upgrade: check, authenticate, answer 101 and start its link."""
        if is_wsmux_request(handler):
            self.accept_wsmux_agent(handler)
            return
        headers = handler.headers
        offered = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",")]
        if SUBPROTOCOL not in offered:
            raise BadRequest("an agent must offer the WebSocket subprotocol %s" % SUBPROTOCOL)
        accept = negotiate(UpgradeRequest(handler.request_version, handler.path, headers,
                                          secure=handler.tls is not None),
                           legacy_clients=False)
        if accept.codec is not HYBI:
            raise BadRequest("an agent must use RFC 6455 WebSocket framing")
        # The ID is the path segment as sent: IDs are made of characters a URL
        # carries as they are (%-escapes included, compared undecoded).
        agent_id = urlsplit(handler.path).path[len(self.path):]
        expiry = self._admit(handler, agent_id)
        url = None
        if self.has_http_face(agent_id):
            url = viewer_url(handler, self.http_path, agent_id, self.server.trusted_proxy)
        http_service = (headers.get(SERVICE_HEADER) or "").strip().lower() == "http"
        # An agent that announces its window gets ours: both then use LARGE_WINDOW-sized
        # receive windows (one from an older agent keeps DEFAULT_WINDOW).
        peer_window = parse_window(headers.get(WINDOW_HEADER))
        # Messages: ours to it up to what it announced; its to us up to
        # LARGE_MESSAGE, which the 101 announces (an older agent ignores that).
        codec = tunnel_connection("server", peer_window,
                                  parse_max_message(headers.get(MESSAGE_HEADER)))
        window = codec.window if peer_window is not None else None
        self._start_link(handler, agent_id, expiry,
                         agent_response(headers.get("sec-websocket-key", "").strip(), url,
                                        window, LARGE_MESSAGE),
                         codec=codec, http_service=http_service, max_message=LARGE_MESSAGE)

    def accept_wsmux_agent(self, handler) -> None:
        """websocktunnel's client: an upgrade to "/" naming its ID in x-websocktunnel-id.

        The same checks as our agents' (ID in the file, the token as
        _authenticate verifies it); the 101 tells the viewers' URL, and the
        link speaks wsmux (protocol/wsmux.py).
        """
        from websockify.protocol.wsmux import WsmuxConnection
        headers = handler.headers
        accept = negotiate(UpgradeRequest(handler.request_version, handler.path, headers,
                                          secure=handler.tls is not None),
                           legacy_clients=False)
        if accept.codec is not HYBI:
            raise BadRequest("a websocktunnel client must use RFC 6455 WebSocket framing")
        agent_id = headers.get(WSMUX_ID_HEADER, "").strip()
        expiry = self._admit(handler, agent_id)
        url = viewer_url(handler, self.http_path, agent_id, self.server.trusted_proxy)
        # websocktunnel's clients serve HTTP by definition: keep-alive to them.
        self._start_link(handler, agent_id, expiry,
                         wsmux_response(headers.get("sec-websocket-key", "").strip(), url),
                         codec=WsmuxConnection(), kind="websocktunnel client", http_service=True)

    def _admit(self, handler, agent_id: str) -> Optional[float]:
        """May ``agent_id`` connect: its token's expiry (None: a client certificate).

        The registry, not this worker's copy of the file, says which IDs are
        configured (a reload may have changed them since this worker was
        forked).  With ``open = true`` an ID without an entry gets one once
        its token verifies.  Raises 400 (bad ID), 401, 403 or 503 (no room).
        """
        from websockify.tunnel.config import AGENT_ID
        if not AGENT_ID.fullmatch(agent_id):
            raise BadRequest("agent ID %r is not a valid ID (1 to 128 of A-Z a-z 0-9 _ ~ . %% -)"
                             % agent_id[:140])
        new = not self.registry.known(agent_id)
        if new and not getattr(self.tunnels, "open", False):
            raise HTTPError(403, "agent ID %r is not in the tunnel configuration" % agent_id)
        expiry = self._authenticate(handler, agent_id)
        # An open ID is had by token only (a client certificate names no entry of the file).
        if expiry is None and (new or self.registry.is_open(agent_id)):
            raise HTTPError(401, "agent %s: open registration needs a token" % agent_id,
                            [("WWW-Authenticate", "Bearer")])
        if not new:
            return expiry
        if not self.registry.register_open(agent_id):
            raise AgentUnavailable("agent %s: no room left in the tunnel registry" % agent_id)
        log.info("agent %s: registered openly (no entry in %s)", agent_id, self.tunnels.source)
        return expiry

    def _start_link(self, handler, agent_id: str, expiry: Optional[float], response: bytes,
                    codec=None, kind: str = "agent", http_service: bool = False,
                    max_message: Optional[int] = None) -> None:
        """Claim the agent's entry, send the 101 and hand the socket to a Link
        (which accepts messages up to ``max_message``, else its codec's own)."""
        peer = handler.peer
        claim = self.registry.claim(agent_id, self.pid, self.worker_number, peer,
                                    expiry or 0.0,
                                    refuse=self.tunnels.on_duplicate == "refuse")
        if not claim.taken:
            if claim.previous_pid:
                raise Conflict("agent %s is already connected (from %s)"
                               % (agent_id, claim.previous_peer or "?"))
            raise HTTPError(403, "agent ID %r is not in the tunnel configuration" % agent_id)
        holding = self.cluster.register(agent_id, claim.serial) if self.cluster else None
        if claim.previous_pid:
            log.info("agent %s: new connection from %s replaces the one from %s",
                     agent_id, peer, claim.previous_peer or "?")
            self._drop_previous(agent_id, claim.previous_pid)
        try:
            handler.socket.sendall(response)
        except OSError as exc:
            self.registry.release(agent_id, self.pid, claim.serial)
            if holding is not None:
                self.cluster.registry.release(agent_id, holding)
            log.info("%s: agent %s disconnected during the handshake: %s", peer, agent_id,
                     exc.strerror or exc)
            handler.close_connection = True
            return
        handler.status = "101 Switching Protocols"
        handler.headers_sent = True
        handler.close_connection = True
        early = handler.rfile.take_buffer()
        sock = handler._detach()
        link = Link(self.loop, sock, agent_id=agent_id, peer=peer, serial=claim.serial,
                    on_finish=self._link_finished, ping_interval=self.ping_interval,
                    dead_after=self.dead_after, token_expiry=expiry, codec=codec,
                    max_message=max_message)
        link.holding = holding      # its record in the cluster registry (None: alone)
        link.http_service = http_service   # keep-alive on the HTTP face (else one request each)
        self.links[agent_id] = link
        log.info("agent %s connected from %s (worker %d%s)", agent_id, peer, self.worker_number,
                 "" if kind == "agent" else ", %s" % kind)
        link.start(early)

    def _authenticate(self, handler, agent_id: str) -> Optional[float]:
        """The token's expiry (None for a client certificate); raises 401."""
        authorization = handler.headers.get("authorization")
        if authorization:
            scheme, _, token = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise HTTPError(401, "agent %s: Authorization must be 'Bearer <token>'"
                                % agent_id, [("WWW-Authenticate", "Bearer")])
            from websockify.tunnel.agent_token import verify_agent_token
            try:
                claims = verify_agent_token(token.strip(), agent_id, self.tunnels.secrets,
                                            self.tunnels.audience, time.time())
            except HTTPError as exc:
                raise HTTPError(401, "agent %s: %s" % (agent_id, exc.text),
                                [("WWW-Authenticate", "Bearer")]) from None
            except Exception as exc:
                if getattr(exc, "status", None) != 401:
                    raise
                reason = getattr(exc, "reason", None) or str(exc)
                raise HTTPError(401, "agent %s: %s" % (agent_id, reason),
                                [("WWW-Authenticate", "Bearer")]) from None
            expiry = claims.get("exp") if isinstance(claims, dict) else getattr(claims, "exp",
                                                                                  None)
            return float(expiry) if expiry is not None else None
        if self.config.verify_client and handler.tls is not None:
            common_name = handler.tls.peer_common_name()
            if common_name == agent_id:
                return None
            raise HTTPError(401, "agent %s: client certificate CN %r is not the agent ID"
                            % (agent_id, common_name))
        raise HTTPError(401, "agent %s: no credentials (send Authorization: Bearer <token>)"
                        % agent_id, [("WWW-Authenticate", "Bearer")])

    def _drop_previous(self, agent_id: str, pid: int) -> None:
        if pid == self.pid:
            old = self.links.pop(agent_id, None)
            if old is not None:
                self._close_link(old, 1000, "replaced by a new connection")
            return
        if not self.sender.send(pid, {"kind": "drop", "agent": agent_id}):
            log.info("agent %s: worker pid %d that held it cannot be reached", agent_id, pid)

    def _close_link(self, link: Link, code: int, reason: str) -> None:
        link.go_away(code, reason)
        link.close(code, reason)

    def _link_finished(self, link: Link) -> None:
        if self.links.get(link.agent_id) is link:
            del self.links[link.agent_id]
        self.registry.release(link.agent_id, self.pid, link.serial)
        if self.cluster is not None:
            self.cluster.link_finished(link)
        log.info("agent %s (%s): tunnel closed (%s%s) after %.1fs, %d bytes to the agent, "
                 "%d from it", link.agent_id, link.peer,
                 link.close_code if link.close_code is not None else "-",
                 " " + link.close_reason if link.close_reason else "",
                 time.time() - link.connected_since, link.bytes_out, link.bytes_in)
        self.server.release()

    def _on_timer(self) -> None:
        try:
            for agent_id, link in list(self.links.items()):
                if self.registry.removed(agent_id):
                    log.info("agent %s: removed from the configuration; closing its tunnel",
                             agent_id)
                    self.links.pop(agent_id, None)
                    self._close_link(link, 1008, "agent removed from the configuration")
                    continue
                if self.registry.serial(agent_id) != link.serial or \
                        self.registry.holder(agent_id) != self.pid:
                    # Another worker took it over and its message is still on its way.
                    continue
                self.registry.publish(agent_id, link.serial, link.open_streams,
                                      link.bytes_out, link.bytes_in)
                if self.draining and not link.open_streams:
                    # Another generation serves from now on: an agent without
                    # streams goes there now, one with streams when they end.
                    log.info("agent %s: no open streams while this worker stops; closing "
                             "its tunnel so it reconnects", agent_id)
                    self.links.pop(agent_id, None)
                    self._close_link(link, 1001, "server restarting")
            now = time.monotonic()
            for pipe in list(self.pipes):
                served = getattr(pipe, "requests", None)
                if served is None:
                    continue
                if served.requests != pipe.counted:
                    self._count_viewer(pipe.agent_id, 0, served.requests - pipe.counted)
                    pipe.counted = served.requests
                why = pipe.expired(now, self.server.handshake_timeout)
                if why is not None:
                    log.info("%s: viewer connection closed: %s", pipe.label, why)
                    pipe.close()
            if self.viewer_counts:
                counts, self.viewer_counts = self.viewer_counts, {}
                self.registry.add_viewers(counts)
            for agent_id, acceptor in list(self.acceptors.items()):
                if self.registry.removed(agent_id):
                    acceptor.close()
                    del self.acceptors[agent_id]
        except Exception:
            log.exception("tunnel bookkeeping failed")

    # -- users ---------------------------------------------------------------------

    def _may_accept(self) -> bool:
        return not self.draining and not self.server.full()

    def _tcp_user(self, agent_id: str, sock, address) -> None:
        raw = _raw(sock)
        peer = format_host_port(address[0], address[1]) if isinstance(address, tuple) else "?"
        link = self.links.get(agent_id)
        if link is not None:
            self._serve_tcp(link, raw, peer)
            return
        pid = self.registry.holder(agent_id)
        if pid and pid != self.pid:
            gevent.spawn(self._hand_off, pid, {"kind": "tcp", "agent": agent_id, "peer": peer},
                         b"", raw)
            return
        if self.cluster is not None:
            gevent.spawn(self.cluster.remote_tcp_user, agent_id, raw, peer)
            return
        log.info("%s: agent %s is not connected; TCP user closed", peer, agent_id)
        raw.close()

    def open_remote_stream(self, agent_id: str, first_bytes: bytes = b"", *, face: str,
                           peer: str, answer: Optional[list] = None):
        """A stream of an agent another instance holds, for any face: a connected plain
        non-blocking socket carrying the stream's bytes (``first_bytes`` go first).

        Raises HTTPError: 503 (alone, not connected anywhere -- AgentNotConnected --,
        the registry or the node unreachable), or the holder's 502 / 503 / 504.
        ``answer`` gets the holder's answer text.  Cooperative: call it in a greenlet.
        """
        if self.cluster is None:
            raise AgentNotConnected("agent %s is not connected" % agent_id)
        return self.cluster.open_remote_stream(agent_id, first_bytes, face=face, peer=peer,
                                               answer=answer)

    def _hand_off(self, pid: int, header: dict, data: bytes, sock) -> None:
        try:
            if not self.sender.send(pid, header, data, sock.fileno()):
                log.info("%s: agent %s: its worker (pid %d) cannot be reached; user closed",
                         header.get("peer"), header.get("agent"), pid)
            else:
                log.debug("%s: agent %s: user handed to worker pid %d", header.get("peer"),
                          header.get("agent"), pid)
        finally:
            sock.close()

    def _serve_tcp(self, link: Link, sock, peer: str) -> None:
        tune_stream(sock)
        self.server.connections += 1
        try:
            user = StreamUser(self.loop, sock, link, {"face": "tcp", "peer": peer},
                              label="%s -> agent %s" % (peer, link.agent_id),
                              on_finish=self._user_finished, open_timeout=self.connect_timeout)
        except StreamLimitError as exc:
            log.info("%s: agent %s: stream refused (%s); user closed", peer, link.agent_id, exc)
            sock.close()
            self.server.release()
            return
        self.users.add(user)
        log.debug("%s: TCP user for agent %s (worker %d, stream %d)", peer, link.agent_id,
                  self.worker_number, user.stream_id)

    def _user_finished(self, user: StreamUser) -> None:
        if user in self.users:
            self.users.discard(user)
            log.info("%s: closed after %d bytes to the agent, %d from it", user.label,
                     user.bytes_up, user.bytes_down)
            self.server.release()

    # -- the bridge face ------------------------------------------------------------

    def bridge_target(self, handler, agent_id: str):
        """Before the 101: a Target whose socket is the stream, or HANDED_OFF; raises 5xx."""
        from websockify.server.proxy import Target
        target = Target(host="agent %s" % agent_id, port=None)
        # --auth-plugin judges a bridge-face session as any other.
        self.server.service.authenticate(handler, target)
        link = self.links.get(agent_id)
        if link is None:
            pid = self.registry.holder(agent_id)
            if pid and pid != self.pid and getattr(handler, "handoff", None) is None:
                self._hand_off_request(handler, pid, agent_id)
                return HANDED_OFF
            if self.cluster is not None:
                # Held at another node (or leaving here for one): carried there.
                target.sock = self.open_remote_stream(agent_id, face="bridge",
                                                      peer=handler.peer)
                return target
            raise AgentUnavailable("agent %s is not connected" % agent_id)
        target.sock, _ = self._local_stream(handler, link, "bridge")
        return target

    def _hand_off_request(self, handler, pid: int, agent_id: str, kind: str = "bridge") -> None:
        """Send a browser's or viewer's connection (and the request read so far) to the holder."""
        raw = request_bytes(handler)
        address = handler.client_address
        header = {"kind": kind, "agent": agent_id,
                  "address": list(address[:2]) if isinstance(address, tuple) else None,
                  "tls": handler.tls is not None}
        if handler.tls is not None:
            # TLS state cannot move: keep the stream, hand over a socketpair end.
            header["cn"] = handler.tls.peer_common_name()
            ours, theirs = socket.socketpair()
            ours, theirs = _raw(ours), _raw(theirs)
            stream = handler._detach()
            pipe = Pipe(self.loop, stream, ours, on_finish=self._pipe_finished)
            self.pipes.add(pipe)
            if self.sender.send(pid, header, raw, theirs.fileno()):
                log.debug("%s: agent %s: TLS request handed to worker pid %d through a "
                          "socketpair", handler.peer, agent_id, pid)
                pipe.start()
            else:
                log.info("%s: agent %s: its worker (pid %d) cannot be reached", handler.peer,
                         agent_id, pid)
                pipe.close()
            theirs.close()
            return
        sock = handler._detach()
        try:
            if self.sender.send(pid, header, raw, sock.fileno()):
                log.debug("%s: agent %s: request handed to worker pid %d", handler.peer,
                          agent_id, pid)
            else:
                log.info("%s: agent %s: its worker (pid %d) cannot be reached", handler.peer,
                         agent_id, pid)
        finally:
            sock.close()
            self.server.release()

    def _pipe_finished(self, pipe: Pipe) -> None:
        if pipe in self.pipes:
            self.pipes.discard(pipe)
            self.server.release()

    # -- the HTTP face ----------------------------------------------------------------

    def http_face_agent(self, handler) -> Optional[str]:
        """The agent a request to ``<http_path><ID>/...`` is for; None when the request
        is another handler's.  Raises 404 (no such agent under a prefix of our own),
        308 (``<http_path><ID>`` without its slash) and 400 (a path leaving the prefix)."""
        from websockify.tunnel.config import AGENT_ID
        prefix = self.http_path
        target = handler.path
        if not target.startswith(prefix):
            return None
        path = target.partition("?")[0]
        agent_id = path[len(prefix):].partition("/")[0]
        if not agent_id:
            return None
        if not (self.has_http_face(agent_id) or (
                getattr(self.tunnels, "open", False) and self.cluster is not None
                and AGENT_ID.fullmatch(agent_id))):
            if prefix == "/":
                return None            # the bridge's and --web's paths
            raise HTTPError(404, "no agent %r with an HTTP face here" % agent_id[:140])
        if path == prefix + agent_id:
            query = target[len(path):]
            raise HTTPError(308, "the agent's pages are under %s%s/" % (prefix, agent_id),
                            [("Location", "%s%s/%s" % (prefix, agent_id, query))])
        split_face_target(target, prefix)          # 400 for a path leaving the prefix
        return agent_id

    def serve_http(self, handler, agent_id: str) -> None:
        """Carry a viewer's connection to the agent's service (or to the worker or node
        holding the agent).  Raises, before anything is answered: 503 (with
        Retry-After) agent absent, 502 its service refused, 504 no answer in time."""
        from websockify.tunnel.http_face import unavailable_headers
        try:
            self._serve_http(handler, agent_id)
        except HTTPError as exc:
            raise unavailable_headers(exc)

    def _serve_http(self, handler, agent_id: str) -> None:
        link = self.links.get(agent_id)
        if link is None:
            pid = self.registry.holder(agent_id)
            if pid and pid != self.pid and getattr(handler, "handoff", None) is None:
                self._hand_off_request(handler, pid, agent_id, kind="http")
                return
            if self.cluster is None:
                raise AgentUnavailable("agent %s is not connected" % agent_id)
        first = request_bytes(handler)
        if link is not None:
            # The first head is judged before a stream is opened: a 400 is answered.
            requests = self._viewer_requests(handler, agent_id, link.http_service)
            early = requests.feed(first)
            if handler.tls is None:
                self._serve_local_viewer(handler, link, requests, early)
            else:
                service, _ = self._local_stream(handler, link, "http")
                self._start_viewer(handler, service, requests, early)
            return
        # Whether the agent's service keeps connections alive is the holder's word:
        # judge the head now, rewrite it once the answer says.
        self._viewer_requests(handler, agent_id, True).feed(first)
        answer = []
        try:
            service = self.open_remote_stream(agent_id, face="http", peer=handler.peer,
                                              answer=answer)
        except AgentNotConnected:
            if not self.registry.known(agent_id):
                raise HTTPError(404, "no agent %r is registered" % agent_id) from None
            raise
        requests = self._viewer_requests(handler, agent_id,
                                         "http" in "".join(answer).split())
        self._start_viewer(handler, service, requests, requests.feed(first))

    def _serve_local_viewer(self, handler, link: Link, requests, early: bytes) -> None:
        """A plain viewer of an agent held here: its socket is the stream's user.

        A duplicate of the socket is given to the stream, so that the
        handler can still answer 502/503/504 if the stream does not open.
        """
        from websockify.tunnel.http_face import HttpStreamUser
        agent_id = link.agent_id
        fd = os.dup(handler.socket.fileno())
        sock = _socket.socket(handler.socket.family, socket.SOCK_STREAM, 0, fd)
        sock.setblocking(False)
        try:
            user = HttpStreamUser(self.loop, sock, link, {"face": "http", "peer": handler.peer},
                                  requests, early, label=viewer_label(handler, agent_id),
                                  open_timeout=self.connect_timeout)
        except StreamLimitError as exc:
            sock.close()
            raise AgentUnavailable("agent %s: %s" % (agent_id, exc)) from None
        try:
            wait_for_open(user, agent_id, self.connect_timeout)
        except BaseException:
            user.abandon()
            raise
        if user.finished:
            # Opened and ended in one go (its duplicate socket is closed): the
            # handler still answers.
            raise BadGateway("agent %s: the stream ended as soon as it opened" % agent_id)
        # Counted from here on: a failed open is no viewer.
        user.on_finish = self._viewer_finished
        _hand_over(handler).close()       # the stream's duplicate carries the connection
        tune_stream(sock)
        self._viewer_started(user)
        user.start()

    def _viewer_requests(self, handler, agent_id: str, keep_alive: bool):
        """How this viewer's requests are rewritten for the agent's service."""
        from websockify.protocol.http1 import ViewerRequests
        from websockify.tunnel.http_face import forwarded_headers
        proxies = self.server.trusted_proxy
        trusted = bool(proxies) and proxies.trusts_peer(handler.client_address)
        address = handler.client_address
        client = address[0] if isinstance(address, tuple) else "unix"
        secure = handler.tls is not None or bool((handler.handoff or {}).get("tls"))
        scheme = "https" if secure else "http"
        return ViewerRequests(
            self.http_path, agent_id,
            lambda head: forwarded_headers(head, client=client, scheme=scheme, trusted=trusted),
            keep_alive=keep_alive)

    def _local_stream(self, handler, link: Link, face: str):
        """A stream of ``link`` opened for ``handler``'s client, before anything is
        answered: (our end of a socketpair, the StreamUser at the other); raises 5xx."""
        agent_id = link.agent_id
        ours, theirs = socket.socketpair()
        ours, theirs = _raw(ours), _raw(theirs)
        try:
            user = StreamUser(self.loop, theirs, link, {"face": face, "peer": handler.peer},
                              label="%s -> agent %s (%s)" % (handler.peer, agent_id, face),
                              open_timeout=self.connect_timeout)
        except StreamLimitError as exc:
            ours.close()
            theirs.close()
            raise AgentUnavailable("agent %s: %s" % (agent_id, exc)) from None
        try:
            wait_for_open(user, agent_id, self.connect_timeout)
        except BaseException:
            user.abandon()
            ours.close()
            raise
        user.start()
        return ours, user

    def _start_viewer(self, handler, service, requests, early: bytes) -> None:
        """A TLS viewer, or one of an agent held at another node: a pipe to ``service``
        (a socket carrying the stream)."""
        from websockify.tunnel.http_face import HttpFacePipe
        viewer = _hand_over(handler)
        if handler.tls is None:
            tune_stream(viewer)
        pipe = HttpFacePipe(self.loop, viewer, service, requests,
                            label=viewer_label(handler, requests.agent_id),
                            on_finish=self._viewer_finished)
        pipe.up_bytes = len(early)
        self._viewer_started(pipe)
        pipe.start(early)

    def _viewer_started(self, carrier) -> None:
        self.pipes.add(carrier)
        self._count_viewer(carrier.agent_id, 1, 0)

    def _viewer_finished(self, pipe) -> None:
        self._count_viewer(pipe.agent_id, -1, pipe.requests.requests - pipe.counted)
        log.info("%s: viewer connection closed after %d request(s), %d bytes to the agent, "
                 "%d from it", pipe.label, pipe.requests.requests, pipe.up_bytes,
                 pipe.down_bytes)
        self._pipe_finished(pipe)

    def _count_viewer(self, agent_id: str, viewers: int, requests: int) -> None:
        viewers_then, requests_then = self.viewer_counts.get(agent_id, (0, 0))
        self.viewer_counts[agent_id] = (viewers_then + viewers, requests_then + requests)

    # -- hand-offs from other workers -----------------------------------------------

    def _on_handoff(self, header: dict, data: bytes, fd: int) -> None:
        kind = header.get("kind")
        agent_id = header.get("agent", "")
        if kind == "drop":
            link = self.links.get(agent_id)
            if link is not None and (self.registry.holder(agent_id) != self.pid
                                     or self.registry.serial(agent_id) != link.serial):
                self.links.pop(agent_id, None)
                self._close_link(link, 1000, "replaced by a new connection")
            return
        if fd < 0:
            return
        sock = _socket.socket(fileno=fd)
        sock.setblocking(False)
        if kind == "tcp":
            link = self.links.get(agent_id)
            if link is None and self.cluster is not None:
                # It left this worker meanwhile (perhaps for another node).
                gevent.spawn(self.cluster.remote_tcp_user, agent_id, sock,
                             header.get("peer", "?"))
                return
            if link is None:
                log.info("%s: agent %s is not connected here any more; TCP user closed",
                         header.get("peer"), agent_id)
                sock.close()
                return
            self._serve_tcp(link, sock, header.get("peer", "?"))
        elif kind in ("bridge", "http"):
            gevent.spawn(self._serve_handed_request, sock, header, data)
        elif kind == "node" and self.cluster is not None:
            self.cluster.handed(header, data, sock)
        else:
            sock.close()

    def _serve_handed_request(self, sock, header: dict, data: bytes) -> None:
        """A browser's request another worker read: handled here as if accepted here."""
        from gevent import socket as gsocket
        server = self.server
        gsock = gsocket.socket(fileno=sock.detach())
        address = tuple(header.get("address") or ("?", 0))
        server.connections += 1
        handler = None
        try:
            handler = server.handler_class(gsock, address, server)
            handler.handoff = header
            handler.rfile.buffer = data
            handler.handle()
        finally:
            if handler is None or not handler.detached:
                server.release()

    # -- the status page --------------------------------------------------------------

    def status(self, handler) -> bytes:
        """The status page's whole response (403 from outside status_allow)."""
        from websockify.tunnel.status import build_document
        address = handler.client_address[0] if isinstance(handler.client_address, tuple) \
            else ""
        if not status_allowed(address, self.tunnels.status_allow):
            raise HTTPError(403, "the tunnel status is not shown to %s" % address)
        document = build_document(self.tunnels, self.registry.snapshot(), time.time())
        if self.cluster is not None:
            self.cluster.add_nodes(document)
        content_type, body = status_response(document, handler.headers.get("accept", ""))
        head = ("HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
                % (content_type, len(body))).encode("latin-1")
        return head + (body if handler.command != "HEAD" else b"")

    # -- stopping -------------------------------------------------------------------------

    def drain(self) -> None:
        """Stop accepting users on the TCP faces (another generation serves them)."""
        self.draining = True
        for acceptor in self.acceptors.values():
            acceptor.close()
        self.acceptors = {}
        if self.cluster is not None:
            self.cluster.drain()

    @property
    def busy(self) -> bool:
        return bool(self.links or self.users or self.pipes)

    def shutdown(self, code: int = 1001, reason: str = "Server shutting down") -> None:
        self.drain()
        for link in list(self.links.values()):
            self._close_link(link, code, reason)

    def close(self) -> None:
        self._timer.stop()
        self.listener.close()
        self.sender.close()
        if self.cluster is not None:
            self.cluster.close()
