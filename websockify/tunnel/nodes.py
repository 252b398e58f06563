"""The internal link's I/O: streams to agents another instance holds, and from others.

Opening side (``open_remote_stream``): a user for an agent the cluster
registry places on another node gets one TCP connection to that node;
protocol/nodelink.py's handshake names the agent and the face, and once the
holder answers 200 the connection *is* the stream (a plain non-blocking
socket: the TCP face pipes the user into it, the bridge face makes it the
session's target, any other face can do the same).  A refusal is the
holder's status (502, 503, 504); a node that cannot be reached, does not
answer within the deadline or is not one of ours is 503.

Holding side: every worker accepts on the node address (the master bound
it, as the TCP faces).  Not the master: it does no per-connection I/O (a
supervisor that a busy link could stall), and a stream accepted there
would need one more hop to a worker anyway; a worker that accepts for an
agent another worker holds passes the descriptor on (tunnel/handoff.py),
after which the bytes flow in the holder alone.  A connection's handshake
is read in a short greenlet
under a deadline, then handed to the hub (``on_request``), which opens the
agent's stream (``NodeStreamUser``) or hands the connection to the worker
holding the agent.  A forged or malformed opening is refused with one log
line and its status in the signed answer.
"""

import logging
import os
import socket
import _socket
from typing import Callable, Optional, Tuple

import gevent
from gevent import socket as gsocket

from websockify.addr import format_host_port
from websockify.errors import HTTPError
from websockify.protocol.nodelink import (OPEN_OK, HolderHandshake, NodeLinkError,
                                          OpenerHandshake)
from websockify.tunnel.faces import AgentUnavailable, StreamUser, open_error

log = logging.getLogger("websockify")

#: What the holder reads at most with the opening (the rest waits in the socket).
OPENING_READ = 16 * 1024
#: Idle internal connections are probed, so a vanished node ends its streams.
KEEPALIVE = (15, 5, 3)


def tune_internal(sock) -> None:
    """No Nagle delay; keepalive probes (a dead peer ends the stream, not a hang)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        idle, interval, count = KEEPALIVE
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    except (OSError, AttributeError):
        pass


def _raw(gsock) -> _socket.socket:
    raw = _socket.socket(fileno=gsock.detach())
    raw.setblocking(False)
    return raw


# -- the opening side ----------------------------------------------------------------

def dial_node(node: str, secret: bytes, header: dict, first_bytes: bytes,
              timeout: float, answer_reason: Optional[list] = None) -> _socket.socket:
    """A stream of ``header["agent"]`` at ``node``: the connected socket once the holder
    answered 200; raises HTTPError (502, 503, 504) otherwise.  Cooperative (gevent).

    ``answer_reason`` gets the holder's reason text (``open``, ``open http`` for
    an agent whose service speaks HTTP)."""
    from websockify.addr import parse_host_port
    agent_id = header["agent"]
    host, port = parse_host_port(node)
    sock = None
    try:
        with gevent.Timeout(timeout, False):
            sock = gsocket.create_connection((host, port))
            tune_internal(sock)
            opener = OpenerHandshake(secret, os.urandom(16), header)
            while opener.wanted():
                chunk = sock.recv(opener.wanted())
                if not chunk:
                    raise AgentUnavailable("agent %s: node %s closed the internal link"
                                           % (agent_id, node))
                result = opener.receive(chunk)
                if isinstance(result, bytes):
                    sock.sendall(result + first_bytes)
            answer = opener.answer
            if answer.status != OPEN_OK:
                error = HTTPError(answer.status if answer.status in (502, 503, 504) else 503,
                                  "agent %s at node %s: %s" % (agent_id, node, answer.reason))
                raise error
            if answer_reason is not None:
                answer_reason.append(answer.reason)
            raw, sock = _raw(sock), None
            return raw
        raise AgentUnavailable("agent %s: node %s did not open the stream within %g s"
                               % (agent_id, node, timeout))
    except NodeLinkError as exc:
        raise AgentUnavailable("agent %s at node %s: %s" % (agent_id, node, exc.text)) from None
    except OSError as exc:
        raise AgentUnavailable("agent %s: node %s cannot be reached: %s"
                               % (agent_id, node, exc.strerror or exc)) from None
    finally:
        if sock is not None:
            sock.close()


# -- the holding side ----------------------------------------------------------------------

def read_opening(fd: int, address, secret: bytes,
                 timeout: float) -> Tuple[Optional[tuple], object]:
    """Read one connection's opening: ((request, handshake, rest), socket), or
    (None, None) after a refusal (answered and logged here)."""
    sock = gsocket.socket(fileno=fd)
    peer = format_host_port(address[0], address[1]) if isinstance(address, tuple) else "?"
    handshake = HolderHandshake(secret, os.urandom(32))
    try:
        with gevent.Timeout(timeout, False):
            sock.sendall(handshake.challenge)
            while True:
                data = sock.recv(OPENING_READ)
                if not data:
                    log.info("internal link from %s: closed before its opening", peer)
                    sock.close()
                    return None, None
                request = handshake.receive(data)
                if request is not None:
                    tune_internal(sock)
                    return (request, handshake, handshake.rest), _raw(sock)
        log.info("internal link from %s: no opening within %g s; closed", peer, timeout)
    except NodeLinkError as exc:
        log.warning("internal link from %s refused: %d %s", peer, exc.status, exc.text)
        try:
            sock.sendall(handshake.answer(exc.status, exc.text))
        except OSError:
            pass
    except OSError as exc:
        log.info("internal link from %s: %s", peer, exc.strerror or exc)
    sock.close()
    return None, None


def answer_now(sock, handshake: HolderHandshake, status: int, reason: str) -> bool:
    """Send the signed answer on a non-blocking socket that has nothing queued."""
    data = handshake.answer(status, reason)
    try:
        return sock.send(data) == len(data)
    except OSError:
        return False


class NodeStreamUser(StreamUser):
    """A stream of a local agent opened for a user at another instance.

    The holder's answer goes out before the stream's bytes: 200 when the
    agent accepts (then the bytes read with the opening go to the agent),
    else the refusal's status; then the socket is closed.
    """

    def __init__(self, loop, sock, link, meta: dict, *, handshake: HolderHandshake,
                 early: bytes, label: str, on_finish: Optional[Callable] = None,
                 open_timeout: float = 10.0):
        self.handshake = handshake
        self.early = early
        self.open_timeout = open_timeout
        super().__init__(loop, sock, link, meta, label=label, on_finish=on_finish,
                         open_timeout=open_timeout)

    def accepted(self) -> None:
        reason = "open http" if getattr(self.link, "http_service", False) else "open"
        if not answer_now(self.sock, self.handshake, OPEN_OK, reason):
            self._finish()
            return
        if self.early:
            taken = self.link.send(self.stream_id, self.early)
            self.bytes_up += taken
            self.early = b""
            self.link.kick()
        super().accepted()

    def _refuse(self, outcome: tuple) -> None:
        error = open_error(outcome, self.link.agent_id, self.open_timeout)
        if error is not None:
            answer_now(self.sock, self.handshake, error.status, error.text)

    def reset(self, code: int, reason: str) -> None:
        if self.outcome is None:
            self._refuse(("reset", code, reason))
        super().reset(code, reason)

    def _open_timed_out(self) -> None:
        if self.outcome is None:
            self._refuse(("timeout",))
        super()._open_timed_out()
