"""The HTTP face: a viewer's requests to ``<http_path><ID>/...`` carried to the agent's service.

The handshake handler has read the viewer's first request head; the hub
(tunnel/hub.py) opens a stream of the agent (here, at the worker holding
it, or at the node holding it) before anything is answered, so an absent
agent is a 503, a refusing service 502 and a silent one 504.  Then an
``HttpFacePipe`` carries the connection: what the viewer sends goes through
protocol/http1.py's ``ViewerRequests`` (each head rewritten for the
service, bodies passed as they are), what the service answers goes back as
it arrives, only its first bytes checked to be an HTTP response (else 502).
Flow control is the stream's credit: the pipe holds at most one chunk per
direction and reads a side only when the other side has taken the last one,
so a viewer who stops reading stops the agent's service.
"""

import logging
from typing import Callable, Optional

from websockify.errors import BadGateway, HTTPError
from websockify.protocol.handshake import refusal_bytes
from websockify.protocol.http1 import ViewerRequests
from websockify.tunnel.handoff import Pipe

log = logging.getLogger("websockify")

VIEWER = 0
SERVICE = 1
RETRY_AFTER = "5"
_RESPONSE_START = b"HTTP/"


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


def unavailable_headers(error: HTTPError) -> HTTPError:
    """A 503 for a viewer says when to come back."""
    if error.status == 503 and not any(name.lower() == "retry-after"
                                       for name, _ in error.headers):
        error.headers = list(error.headers) + [("Retry-After", RETRY_AFTER)]
    return error


class HttpFacePipe(Pipe):
    """One viewer connection and one stream to the agent's service."""

    def __init__(self, loop, viewer, service, requests: ViewerRequests, *, label: str,
                 on_finish: Optional[Callable[["HttpFacePipe"], None]] = None):
        super().__init__(loop, viewer, service, on_finish=on_finish, half_close=True)
        self.requests = requests
        self.label = label
        self.answered = False          # the service's first bytes looked like HTTP
        self.first = b""
        self.refused = False
        self.bytes_up = 0
        self.bytes_down = 0
        self.agent_id = requests.agent_id
        self.counted = 0            # requests already added to the registry's figures
        self.user = None            # the StreamUser of a local stream (None: remote)

    def _carry(self, index: int, data, eof: bool):
        if index == VIEWER:
            return self._from_viewer(data, eof)
        return self._from_service(data, eof)

    def _from_viewer(self, data, eof: bool) -> bytes:
        if eof:
            return b""
        try:
            out = self.requests.feed(bytes(data))
        except HTTPError as exc:
            # The responses before it may still be in flight: no answer can be
            # put in front of them, so the stream ends here.
            log.info("%s: refused a later request on the connection: %d %s", self.label,
                     exc.status, exc.log_text)
            self.requests.stopped = True
            self.requests.boundary = "refused"
            out = b""
        if self.requests.stopped and self.requests.boundary:
            if self.requests.boundary != "refused":
                log.debug("%s: %s: connection ends after the responses so far",
                          self.label, self.requests.boundary)
            # Our FIN tells the service no more requests come; it closes after answering.
            self.ends[VIEWER].eof = True
        self.bytes_up += len(out)
        return out

    def _from_service(self, data, eof: bool):
        if not self.answered:
            self.first += bytes(data)
            if len(self.first) < len(_RESPONSE_START) and not eof:
                return b""
            if not self.first.startswith(_RESPONSE_START):
                return self._refuse_garbage()
            self.answered = True
            data, self.first = self.first, b""
        self.bytes_down += len(data)
        return data

    def _refuse_garbage(self) -> bytes:
        what = ("closed the connection without answering" if not self.first
                else "answered %r, not an HTTP response" % self.first[:32])
        error = BadGateway("agent %s: its service %s" % (self.requests.agent_id, what))
        log.info("%s: 502 %s", self.label, error.log_text)
        self.refused = True
        self.answered = True
        self.ends[SERVICE].eof = True
        self.ends[VIEWER].eof = True
        return refusal_bytes(error.status_line, error.text, error.headers)

    def _may_read(self, index: int) -> bool:
        if index == VIEWER:
            return not self.requests.stopped or self.requests.raw
        return not self.refused

    def _is_over(self) -> bool:
        # The service has ended and the viewer has had all of it: nothing more
        # can be answered on this connection.
        return self.ends[SERVICE].eof and not self.ends[VIEWER].out
