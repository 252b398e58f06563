"""How users reach an agent: the TCP face, the bridge face and the status page.

* TCP face: each agent's ``listen`` socket is bound by the master and
  accepted on by every worker (``FaceAcceptor``); a user becomes a stream
  (``StreamUser``) on the agent's link, or is handed to the worker that
  holds it, or is closed at once when the agent is absent.
* Bridge face: a browser's WebSocket with ``?token=<ID>``.  The stream is
  opened before the 101 (``open_bridge_stream``: 503 agent absent, 502 its
  service refused, 504 no answer in time); then server/relay.py carries the
  session with its target being one end of a socketpair whose other end is
  a ``StreamUser``: every codec, close handshake and heartbeat of the
  bridge stays the relay's.
* Status: ``GET <path>`` from ``status_allow`` networks, JSON or HTML
  (tunnel/status.py renders it).

``StreamUser`` moves bytes with the mux's credit: the user socket is read
only while the stream's send window is open, and at most that many bytes
at a time, so nothing waits on our side; what the agent sends is written to
the user and then acknowledged (``consumed``), so a user who stops reading
stops only their own stream.
"""

import ipaddress
import json
import logging
import socket
from typing import Callable, Optional

from gevent.event import Event

from websockify.errors import BadGateway, GatewayTimeout, HTTPError
from websockify.net.sendqueue import send_some
from websockify.protocol.mux import ResetCode

log = logging.getLogger("websockify")

USER_CHUNK = 64 * 1024

_READ = 1
_WRITE = 2


class AgentUnavailable(HTTPError):
    def __init__(self, text: str):
        super().__init__(503, text)


class AgentNotConnected(AgentUnavailable):
    """No instance holds the agent (as opposed to one that cannot be reached)."""


class StreamUser:
    """One user's socket carried as a stream of an agent's link."""

    def __init__(self, loop, sock, link, meta: dict, *, label: str,
                 on_finish: Optional[Callable[["StreamUser"], None]] = None,
                 open_timeout: float = 10.0):
        self.loop = loop
        self.sock = sock
        self.link = link
        self.label = label
        self.on_finish = on_finish
        fd = sock.fileno()
        self.reader = loop.io(fd, _READ)
        self.writer = loop.io(fd, _WRITE)
        self.out = []
        self.out_bytes = 0
        self.plain = not getattr(sock, "encrypted", False)
        # Views of the link's read buffer go out gathered in one sendmsg; a
        # TLS socket sends one buffer a call, so it is given joined bytes.
        self.takes_views = self.plain
        self.is_open = False        # OPEN_OK came
        self.read_done = False      # the user sent EOF (our FIN is queued)
        self.peer_done = False      # the agent sent FIN
        self.shut = False
        self.finished = False
        self.outcome: Optional[tuple] = None   # ("ok",) or ("reset", code, reason) or ("timeout",)
        self.decided = Event()
        self.bytes_up = 0
        self.bytes_down = 0
        #: Bytes at the front of ``out`` that are not the agent's as sent (credited already).
        self.uncredited = 0
        self._timer = loop.timer(open_timeout)
        # 0 while waiting for a place among the agent's unanswered opens.
        self.stream_id = link.open_stream(meta, self)      # may raise StreamLimitError
        self._timer.start(self._open_timed_out)

    def assigned(self, stream_id: int) -> None:
        """The link opened our stream after a wait (the open timer kept running)."""
        self.stream_id = stream_id

    # -- the link's events ---------------------------------------------------

    def accepted(self) -> None:
        self._timer.stop()
        self.is_open = True
        self.outcome = ("ok",)
        self.decided.set()
        self._update()

    def data(self, data: bytes) -> None:
        if self.finished:
            self.link.consumed(self.stream_id, len(data))
            return
        self.out.append(data)
        self.out_bytes += len(data)
        if not self.link.defer(self):
            self._update()

    def data_views(self, views: list, size: int) -> None:
        """DATA as views of the link's read buffer: written with the rest of the
        read at its end; what the socket does not take then is copied."""
        if self.finished:
            self.link.consumed(self.stream_id, size)
            return
        self.out.extend(views)
        self.out_bytes += size
        if not self.link.defer(self):
            self.write_deferred()

    def write_deferred(self) -> None:
        """The read that brought ``data`` is done: write what it queued."""
        self._guarded(self._update)
        # What the socket did not take of the read buffer's views is copied.
        self.link.keep(self.out)

    def window_opened(self) -> None:
        self._update()

    def ended(self) -> None:
        self.peer_done = True
        self._update()

    def reset(self, code: int, reason: str) -> None:
        self._timer.stop()
        if self.out and self.is_open and not self.finished:
            # What came before the RESET in the same read (its write is
            # deferred to the read's end) still goes out, as far as it fits.
            try:
                self._flush()
            except OSError:
                pass
        if self.outcome is None:
            self.outcome = ("reset", code, reason)
            self.decided.set()
        if not self.finished:
            log.debug("%s: stream reset by the agent (%s %s)", self.label, code, reason)
        self._finish(tell_link=False)

    def closed(self) -> None:
        # The agent's FIN came after ours: the mux forgets the stream, but what
        # the agent sent may still be queued for a slow user.  The user gets it
        # all, then the EOF (``_update`` ends us once ``out`` is written).
        self.peer_done = True
        self._update()

    def _open_timed_out(self) -> None:
        if self.outcome is None:
            self.outcome = ("timeout",)
            self.decided.set()
            if self.stream_id:
                self.link.reset(self.stream_id, ResetCode.TIMEOUT, "no answer to OPEN in time")
                self.link.kick()
            else:
                self.link.cancel_waiting(self)
            self._finish(tell_link=False)

    # -- pumping ---------------------------------------------------------------

    def start(self) -> None:
        self._update()

    def _update(self) -> None:
        if self.finished or not self.is_open:
            return
        try:
            done = self._flush()
        except OSError:
            self._finish()
            return
        if done:
            if self.writer.active:
                self.writer.stop()
            if self.peer_done and not self.shut:
                self.shut = True
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            if self._over():
                # Both FINs: the stream is over (the mux forgets it).
                self.link.forget(self.stream_id)
                self._finish(tell_link=False)
                return
        elif not self.writer.active:
            self.writer.start(self._guarded, self._update)
        if self._wants_read():
            if not self.reader.active:
                self.reader.start(self._guarded, self._on_readable)
        elif self.reader.active:
            self.reader.stop()

    def _over(self) -> bool:
        """Everything delivered and both sides ended."""
        return self.shut and self.read_done

    def _wants_read(self) -> bool:
        return not self.read_done and self.link.send_window(self.stream_id) > 0

    def _guarded(self, func) -> None:
        try:
            func()
        except Exception:
            log.exception("%s: internal error", self.label)
            self._finish()

    def _flush(self) -> bool:
        out = self.out
        sock = self.sock
        written = 0
        try:
            while out:
                # All that one read of the agent brought, in one system call.
                written += send_some(sock, out, self.plain)
            return True
        except (BlockingIOError, InterruptedError):
            return False
        finally:
            if written:
                self.out_bytes -= written
                self.bytes_down += written
                credit = written
                if self.uncredited:
                    skipped = min(written, self.uncredited)
                    self.uncredited -= skipped
                    credit -= skipped
                self.link.consumed(self.stream_id, credit)
                self.link.kick()

    def _on_readable(self) -> None:
        if self.finished:
            return
        if not self._wants_read():
            self.reader.stop()
            return
        try:
            data = self.sock.recv(min(USER_CHUNK, self.link.send_window(self.stream_id)))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.read_done = True
            self._user_ended()
        else:
            self.bytes_up += len(data)
            self._carry_up(data)
        self.link.kick()
        self._update()

    def _carry_up(self, data: bytes) -> None:
        """What the user sent (at most the send window) goes to the agent."""
        self.link.send(self.stream_id, data)

    def _user_ended(self) -> None:
        self.link.end(self.stream_id)

    def _finish(self, tell_link: bool = True) -> None:
        if self.finished:
            return
        self.finished = True
        self._timer.stop()
        if tell_link:
            if self.stream_id:
                self.link.reset(self.stream_id, ResetCode.CANCEL, "user went away")
                self.link.kick()
            else:
                self.link.cancel_waiting(self)
        for watcher in (self.reader, self.writer):
            watcher.stop()
            watcher.close()
        try:
            self.sock.close()
        except OSError:
            pass
        if self.on_finish is not None:
            self.on_finish(self)

    def abandon(self) -> None:
        """Before the 101 went out: the browser left, give the stream back."""
        self._finish()


class FaceAcceptor:
    """Accepts users on one agent's TCP face (a listener the master bound)."""

    def __init__(self, loop, agent_id: str, listener: socket.socket,
                 on_user: Callable[[str, int, tuple], None],
                 may_accept: Callable[[], bool]):
        self.agent_id = agent_id
        self.listener = listener
        self.on_user = on_user
        self.may_accept = may_accept
        self.watcher = loop.io(listener.fileno(), _READ)
        self.watcher.start(self._accept)
        # While this worker is full, look again later (a readable listener
        # would wake the loop over and over).
        self._retry = loop.timer(0.1)

    def _accept(self) -> None:
        # Several workers share the socket: the one that loses the race sees EAGAIN.
        for _ in range(8):
            if not self.may_accept():
                self.pause()
                if not self._retry.active:
                    self._retry.start(self.resume)
                return
            try:
                fd, address = self.listener._accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.info("agent %s: accept on its TCP face failed: %s", self.agent_id,
                         exc.strerror or exc)
                return
            try:
                self.on_user(self.agent_id, fd, address)
            except Exception:
                log.exception("agent %s: serving a user failed", self.agent_id)

    def pause(self) -> None:
        if self.watcher.active:
            self.watcher.stop()

    def resume(self) -> None:
        if not self.watcher.active:
            self.watcher.start(self._accept)

    def close(self) -> None:
        self._retry.stop()
        self.watcher.stop()
        self.watcher.close()
        try:
            self.listener.close()
        except OSError:
            pass


def wait_for_open(user: StreamUser, agent_id: str, timeout: float) -> None:
    """Before the 101: wait for OPEN_OK, or raise 502 (refused) / 504 (no answer)."""
    user.decided.wait(timeout + 1.0)
    outcome = user.outcome
    if outcome is None:
        user.abandon()
        outcome = ("timeout",)
    error = open_error(outcome, agent_id, timeout)
    if error is not None:
        raise error


def open_error(outcome: tuple, agent_id: str, timeout: float) -> Optional[HTTPError]:
    """What a stream's open outcome means for its user: None (open), 502, 503 or 504."""
    if outcome[0] == "ok":
        return None
    if outcome[0] == "timeout":
        return GatewayTimeout("agent %s: its service did not answer within %g s"
                              % (agent_id, timeout))
    code, reason = outcome[1], outcome[2]
    if code == ResetCode.TIMEOUT:
        return GatewayTimeout("agent %s: its service did not answer in time (%s)"
                              % (agent_id, reason or "timeout"))
    if code == ResetCode.REFUSED:
        return BadGateway("agent %s: its service refused the connection (%s)"
                          % (agent_id, reason or "refused"))
    if code == ResetCode.LIMIT:
        return AgentUnavailable("agent %s: too many streams (%s)" % (agent_id, reason or "limit"))
    try:
        name = ResetCode(code).name
    except ValueError:
        name = str(code)
    return BadGateway("agent %s: stream reset (%s %s)" % (agent_id, name, reason))


def status_allowed(address: str, networks) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if getattr(ip, "ipv4_mapped", None) is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


def status_response(document: dict, accept: str) -> tuple:
    """(content type, body) for the status page: JSON when asked for, else HTML."""
    from websockify.tunnel.status import render_html
    if "application/json" in (accept or ""):
        return "application/json", json.dumps(document, indent=1).encode("utf-8") + b"\n"
    return "text/html; charset=utf-8", render_html(document).encode("utf-8")
