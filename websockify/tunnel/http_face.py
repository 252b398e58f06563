"""The HTTP face: a viewer's requests to ``<http_path><ID>/...`` carried to the agent's service.

The handshake handler has read the viewer's first request head; the hub
(tunnel/hub.py) opens a stream of the agent (here, at the worker holding
it, or at the node holding it) before anything is answered, so an absent
agent is a 503, a refusing service 502 and a silent one 504.  Then the
connection is carried: what the viewer sends goes through
protocol/http1.py's ``ViewerRequests`` (each head rewritten for the
service, bodies passed as they are), what the service answers goes back as
it arrives, only its first bytes checked to be an HTTP response (else 502).

Two carriers, one behaviour (``ViewerSide``): a plain viewer of an agent
held by this worker is an ``HttpStreamUser``, the viewer's socket driven
directly as the stream's user (the mux's credit paces both ways, no copy
of ours in between); a TLS viewer, or one whose agent another node holds,
is an ``HttpFacePipe`` between the viewer and a socket carrying the
stream (a socketpair end of a local stream, or the internal link), holding
at most one chunk per direction.  Either way a viewer who stops reading
stops the agent's service.
"""

import logging
import time
from typing import Callable, Optional

from websockify.errors import BadGateway, HTTPError
from websockify.protocol.handshake import refusal_bytes
from websockify.protocol.http1 import ViewerRequests
from websockify.protocol.mux import ResetCode
from websockify.tunnel.faces import StreamUser
from websockify.tunnel.handoff import Pipe

log = logging.getLogger("websockify")

VIEWER = 0
SERVICE = 1
RETRY_AFTER = "5"
_RESPONSE_START = b"HTTP/"
#: A response head longer than this is passed on as it is.
_HEAD_LIMIT = 64 * 1024
#: Seconds a viewer connection may pass no byte either way before it is closed
#: (a relayed WebSocket excepted); a request head once begun must be complete
#: within the handshake timeout.
IDLE_TIMEOUT = 120.0


def forwarded_headers(head, *, client: str, scheme: str, trusted: bool) -> dict:
    """The headers the service gets on a request: X-Forwarded-For / -Proto / -Host and
    x-websocktunnel-original-path, the viewer's copies replaced unless its peer is a
    trusted proxy (then its X-Forwarded-For is extended, its others kept)."""
    headers = {"X-Forwarded-For": client, "X-Forwarded-Proto": scheme,
               "X-Forwarded-Host": head.get("host") or "",
               "x-websocktunnel-original-path": head.target}
    if trusted:
        earlier = head.get("x-forwarded-for")
        if earlier:
            headers["X-Forwarded-For"] = "%s, %s" % (earlier, client)
        for name in ("X-Forwarded-Proto", "X-Forwarded-Host", "x-websocktunnel-original-path"):
            theirs = head.get(name)
            if theirs:
                headers[name] = theirs
    return headers


def response_status(response: bytes) -> int:
    """The status code of a response's first line, 0 when there is none."""
    words = response.split(b"\r\n", 1)[0].split(b" ", 2)
    return int(words[1]) if len(words) > 1 and words[1].isdigit() and len(words[1]) == 3 \
        else 0


def close_connection(response: bytes, end: int) -> bytes:
    """A response whose head ends at ``end`` with ``Connection: close`` in it (replacing
    any Connection header)."""
    lines = response[:end].split(b"\r\n")
    kept = [line for line in lines[1:] if not line.lower().startswith(b"connection:")]
    return b"\r\n".join([lines[0]] + kept + [b"Connection: close"]) + response[end:]


def unavailable_headers(error: HTTPError) -> HTTPError:
    """A 503 for a viewer says when to come back."""
    if error.status == 503 and not any(name.lower() == "retry-after"
                                       for name, _ in error.headers):
        error.headers = list(error.headers) + [("Retry-After", RETRY_AFTER)]
    return error


class ViewerSide:
    """What both carriers do with the bytes: requests rewritten on the way up, the
    first answer checked on the way down, the counts for the log and the status."""

    def _viewer_init(self, requests: ViewerRequests, label: str) -> None:
        self.requests = requests
        self.agent_id = requests.agent_id
        self.label = label
        self.answered = False          # the service's first bytes looked like HTTP
        self.first = b""
        self.refused = False
        self.counted = 0               # requests already added to the registry's figures
        self.up_bytes = 0
        self.down_bytes = 0
        self.active_at = time.monotonic()

    def expired(self, now: float, head_timeout: float) -> Optional[str]:
        """Why this connection should be closed now (None: it should not)."""
        if self.requests.raw:
            return None
        idle = now - self.active_at
        if self.requests.buffer and idle > head_timeout:
            return "a request head not completed within %g s" % head_timeout
        if idle > IDLE_TIMEOUT:
            return "no byte either way for %g s" % IDLE_TIMEOUT
        return None

    def _rewrite_up(self, data) -> bytes:
        """Viewer bytes -> service bytes; a bad later head stops the forwarding (logged)."""
        self.active_at = time.monotonic()
        try:
            out = self.requests.feed(bytes(data))
        except HTTPError as exc:
            # The responses before it may still be in flight: no answer can be
            # put in front of them, so the stream ends here.
            log.info("%s: refused a later request on the connection: %d %s", self.label,
                     exc.status, exc.log_text)
            self.requests.stop("a later request refused (%d)" % exc.status)
            out = b""
        else:
            if self.ends_stream:
                log.debug("%s: %s: connection ends after the responses so far", self.label,
                          self.requests.boundary)
        self.up_bytes += len(out)
        return out

    def _check_down(self, data, eof: bool) -> Optional[bytes]:
        """Service bytes -> viewer bytes: None while too few to judge; the 502 refusal
        (``refused`` set) when they are not an HTTP response."""
        self.active_at = time.monotonic()
        if self.answered:
            self.down_bytes += len(data)
            return data
        self.first += bytes(data)
        if len(self.first) < len(_RESPONSE_START) and not eof:
            return None
        if self.first.startswith(_RESPONSE_START) and (
                not self.requests.keep_alive or self.requests.awaiting_upgrade):
            # The whole head is needed: its status decides an upgrade, and a
            # one-request connection's answer tells the viewer it ends.
            end = self.first.find(b"\r\n\r\n")
            if end < 0 and not eof and len(self.first) <= _HEAD_LIMIT:
                return None
            status = response_status(self.first)
            if self.requests.awaiting_upgrade:
                self._upgrade_decided(self.requests.upgrade_answered(status == 101))
            if end >= 0 and not self.requests.keep_alive and not 100 <= status < 200:
                self.first = close_connection(self.first, end)
        self.answered = True
        if not self.first.startswith(_RESPONSE_START):
            self.refused = True
            what = ("closed the connection without answering" if not self.first
                    else "answered %r, not an HTTP response" % self.first[:32])
            error = BadGateway("agent %s: its service %s" % (self.agent_id, what))
            log.info("%s: 502 %s", self.label, error.log_text)
            return refusal_bytes(error.status_line, error.text, error.headers)
        data, self.first = self.first, b""
        self.down_bytes += len(data)
        return data

    def _upgrade_decided(self, held: bytes) -> None:
        """Send on what the viewer sent after its upgrade (a 101 came), or end the
        forwarding (``held`` empty, ``ends_stream`` true)."""
        raise NotImplementedError

    @property
    def ends_stream(self) -> bool:
        """The forwarding stopped at a request boundary: our FIN tells the service
        no more requests come (it closes after answering)."""
        return self.requests.stopped and bool(self.requests.boundary)

    @property
    def reads_viewer(self) -> bool:
        requests = self.requests
        return ((not requests.stopped or requests.raw) and not requests.awaiting_upgrade
                and not self.refused)


class HttpFacePipe(ViewerSide, Pipe):
    """One viewer connection and a socket carrying the agent's stream."""

    def __init__(self, loop, viewer, service, requests: ViewerRequests, *, label: str,
                 on_finish: Optional[Callable[["HttpFacePipe"], None]] = None):
        Pipe.__init__(self, loop, viewer, service, on_finish=on_finish, half_close=True)
        self._viewer_init(requests, label)

    def _carry(self, index: int, data, eof: bool):
        if index == VIEWER:
            if eof:
                return b""
            out = self._rewrite_up(data)
            if self.ends_stream:
                self.ends[VIEWER].eof = True       # the pipe half-closes the service
            return out
        out = self._check_down(data, eof)
        if out is None:
            return b""
        if self.refused:
            self.ends[SERVICE].eof = True
            self.ends[VIEWER].eof = True
        return out

    def _upgrade_decided(self, held: bytes) -> None:
        if held:
            self.ends[SERVICE].out += held
        elif self.ends_stream:
            self.ends[VIEWER].eof = True       # the pipe half-closes the service

    def _may_read(self, index: int) -> bool:
        if index == VIEWER:
            return self.reads_viewer
        return not self.refused

    def _is_over(self) -> bool:
        # The service has ended and the viewer has had all of it: nothing more
        # can be answered on this connection.
        return self.ends[SERVICE].eof and not self.ends[VIEWER].out


class HttpStreamUser(ViewerSide, StreamUser):
    """A plain viewer's socket as the user of a local agent's stream."""

    def __init__(self, loop, sock, link, meta: dict, requests: ViewerRequests, early: bytes,
                 *, label: str, on_finish=None, open_timeout: float = 10.0):
        self._viewer_init(requests, label)
        #: Rewritten bytes the window has not taken yet; first what the handler read
        #: (sent once the stream is accepted, before the viewer is read again).
        self.pending = early
        self.up_bytes = len(early)
        self.fin_sent = False
        StreamUser.__init__(self, loop, sock, link, meta, label=label, on_finish=on_finish,
                            open_timeout=open_timeout)

    def accepted(self) -> None:
        self._push()                # what the handler read goes before the viewer is read
        StreamUser.accepted(self)

    def _push(self) -> None:
        while self.pending and not self.finished:
            window = self.link.send_window(self.stream_id)
            if window <= 0:
                return
            taken = self.link.send(self.stream_id, self.pending[:window])
            self.pending = self.pending[taken:]
            self.link.kick()
        if not self.pending and not self.finished:
            if self.ends_stream:
                self.read_done = True
            if self.read_done:
                self._send_fin()

    def _send_fin(self) -> None:
        if not self.fin_sent:
            self.fin_sent = True
            self.link.end(self.stream_id)
            self.link.kick()

    def window_opened(self) -> None:
        self._push()
        self._update()

    def _wants_read(self) -> bool:
        return (not self.read_done and not self.pending and self.reads_viewer
                and self.link.send_window(self.stream_id) > 0)

    def _upgrade_decided(self, held: bytes) -> None:
        self.pending += held
        self._push()            # with nothing held and the forwarding over: our FIN

    def close(self) -> None:
        """Closed by the hub (idle): the stream is reset, the viewer's socket closed."""
        self._finish()

    def _carry_up(self, data: bytes) -> None:
        self.pending = self._rewrite_up(data)
        self._push()

    def _user_ended(self) -> None:
        self._push()            # our FIN follows what the window has not taken yet

    def data(self, data: bytes) -> None:
        if self.finished:
            self.link.consumed(self.stream_id, len(data))
            return
        held = len(self.first)
        judged = self.answered
        out = self._check_down(data, False)
        if out is None:
            return                       # credit returned once judged
        if not judged:
            # The first answer may be rewritten (Connection: close) or ours (502):
            # credit the agent's bytes now, none of what is written for them.
            self.link.consumed(self.stream_id, held + len(data))
            self.uncredited += len(out)
        if self.refused:
            self.link.reset(self.stream_id, ResetCode.CANCEL, "not an HTTP response")
            self.link.kick()
            self.out = [out]
            self.peer_done = True
            self.read_done = True
            self.fin_sent = True            # reset: nothing more goes on this stream
            self._update()
            return
        StreamUser.data(self, out)

    def data_views(self, views: list, size: int) -> None:
        if not self.answered or self.refused or self.finished:
            self.data(b"".join(views))       # judged (or refused) on bytes of its own
            return
        self.active_at = time.monotonic()
        self.down_bytes += size
        StreamUser.data_views(self, views, size)

    def reset(self, code: int, reason: str) -> None:
        if self.is_open and not self.answered and not self.finished:
            # Reset before any answer: the viewer still gets one.
            error = BadGateway("agent %s: its service's stream was reset before an answer "
                               "(%s)" % (self.agent_id, reason or code))
            log.info("%s: 502 %s", self.label, error.log_text)
            try:
                self.sock.send(refusal_bytes(error.status_line, error.text, error.headers))
            except OSError:
                pass
        StreamUser.reset(self, code, reason)

    def ended(self) -> None:
        if not self.answered and not self.finished:
            out = self._check_down(b"", True)
            if self.refused:
                self.out = [out]
            elif out:
                self.out.append(out)        # a short answer, then the end
                self.out_bytes += len(out)
        StreamUser.ended(self)

    def _over(self) -> bool:
        # The service ended and the viewer has had all of it: nothing more can
        # be answered on this connection.
        if self.shut:
            self.read_done = True
            self._send_fin()
        return self.shut
