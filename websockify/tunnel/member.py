"""One worker as a member of a cluster of instances ([tunnels] registry).

The hub (tunnel/hub.py) keeps serving its own agents as before and asks
this object at a few points:

* an agent's upgrade: ``register`` records the new link in Redis
  (tunnel/cluster.py) before the 101 (409 when refused), ``link_finished``
  deletes the record; a refresh that finds another node's record closes
  this stale copy (``_registration_lost``);
* a user for an agent no worker here holds: ``open_remote_stream`` (any
  face: a socket that is the stream), ``remote_tcp_user`` (the TCP face,
  piped into it);
* the node address: openings from other instances (tunnel/nodes.py),
  served as a stream of the local agent or passed to the worker holding it
  (a hand-off message of kind ``node``);
* the status page: ``add_nodes``.
"""

import logging
from typing import Optional

import gevent

from websockify.errors import HTTPError
from websockify.net.sockets import tune_stream
from websockify.protocol.mux import StreamLimitError
from websockify.protocol.nodelink import HolderHandshake, OpenRequest
from websockify.tunnel.cluster import ClusterRegistry, RegistryUnavailable
from websockify.tunnel.faces import AgentNotConnected, AgentUnavailable, FaceAcceptor
from websockify.tunnel.handoff import Pipe
from websockify.tunnel.nodes import NodeStreamUser, answer_now, dial_node, read_opening

log = logging.getLogger("websockify")


class ClusterMember:
    """The cluster side of one worker's hub."""

    def __init__(self, hub, runtime):
        self.hub = hub
        tunnels = hub.tunnels
        self.tunnels = tunnels
        self.secret = tunnels.cluster_secret
        self.node: str = tunnels.node_description
        self.registry = ClusterRegistry(tunnels.registry, self.node, tunnels.registry_ttl,
                                        hub.registry, self._registration_lost)
        self.acceptor = None
        sock = runtime.tunnel_listeners.get(tunnels.node)
        if sock is not None:
            sock.setblocking(False)
            self.acceptor = FaceAcceptor(hub.loop, "(internal link)", sock,
                                         self._node_connection, hub._may_accept)

    # -- the links held here -----------------------------------------------------------

    def register(self, agent_id: str, serial: int) -> str:
        """Record a new link: its holding string.

        The newest registration wins; with on_duplicate = "refuse" an agent
        held at another node is refused (409, the local claim given back).
        Redis down: the link is held unrecorded, and recorded once Redis
        answers (the refresher writes missing records).
        """
        holding = self.registry.new_holding()
        try:
            taken, previous = self.registry.register(
                agent_id, holding, refuse=self.tunnels.on_duplicate == "refuse")
        except RegistryUnavailable:
            return holding
        if not taken:
            self.hub.registry.release(agent_id, self.hub.pid, serial)
            raise HTTPError(409, "agent %s is already connected (at node %s)"
                            % (agent_id, previous))
        if previous and previous != self.node:
            log.info("agent %s: now held at this node; node %s closes its copy", agent_id,
                     previous)
        return holding

    def link_finished(self, link) -> None:
        holding = getattr(link, "holding", None)
        if holding:
            gevent.spawn(self.registry.release, link.agent_id, holding)

    def _registration_lost(self, agent_id: str, holding: str, node: str) -> None:
        """A refresh found the agent registered elsewhere since: this copy is stale."""
        link = self.hub.links.get(agent_id)
        if link is None or getattr(link, "holding", None) != holding:
            return
        log.info("agent %s (%s): registered at node %s since; closing the copy held here",
                 agent_id, link.peer, node)
        self.hub.links.pop(agent_id, None)
        self.hub._close_link(link, 1000, "replaced by a connection at another instance")

    # -- users of agents held elsewhere ----------------------------------------------------

    def open_remote_stream(self, agent_id: str, first_bytes: bytes = b"", *, face: str,
                           peer: str, answer: Optional[list] = None):
        """See TunnelHub.open_remote_stream."""
        try:
            node = self.registry.lookup(agent_id)
        except RegistryUnavailable as exc:
            raise AgentUnavailable("agent %s is not held here, and the %s" % (agent_id, exc)) \
                from None
        if node is None or node == self.node:
            raise AgentNotConnected("agent %s is not connected" % agent_id)
        header = {"agent": agent_id, "face": face, "peer": peer, "from": self.node}
        return dial_node(node, self.secret, header, first_bytes, self.hub.connect_timeout + 1.0,
                         answer)

    def remote_tcp_user(self, agent_id: str, sock, peer: str) -> None:
        """A TCP user for an agent another node holds: piped into a stream opened there
        (in a greenlet)."""
        hub = self.hub
        hub.server.connections += 1
        try:
            remote = self.open_remote_stream(agent_id, face="tcp", peer=peer)
        except HTTPError as exc:
            log.info("%s: %s; TCP user closed", peer, exc.text)
            sock.close()
            hub.server.release()
            return
        tune_stream(sock)
        pipe = Pipe(hub.loop, sock, remote, on_finish=hub._pipe_finished, half_close=True)
        hub.pipes.add(pipe)
        log.debug("%s: TCP user for agent %s carried to its node", peer, agent_id)
        pipe.start()

    # -- streams other instances open here ------------------------------------------------

    def _node_connection(self, _label: str, fd: int, address) -> None:
        gevent.spawn(self._read_opening, fd, address)

    def _read_opening(self, fd: int, address) -> None:
        opening, sock = read_opening(fd, address, self.secret, self.hub.connect_timeout)
        if opening is not None:
            request, handshake, rest = opening
            self._serve(sock, request, handshake, rest)

    def handed(self, header: dict, data: bytes, sock) -> None:
        """A ``node`` hand-off: an opening another worker read, for an agent held here."""
        server_nonce, client_nonce = header.get("nonces") or ("", "")
        handshake = HolderHandshake(self.secret, bytes.fromhex(server_nonce))
        handshake.client_nonce = bytes.fromhex(client_nonce)
        request = OpenRequest(header.get("agent", ""), header.get("face", "tcp"),
                              header.get("peer", "?"), header)
        self._serve(sock, request, handshake, data, handed=True)

    def _serve(self, sock, request, handshake, rest: bytes, handed: bool = False) -> None:
        """An authenticated opening: a stream of the agent here, or to the worker that
        holds it, or a signed refusal (503 for the user at the other instance)."""
        hub = self.hub
        agent_id = request.agent_id
        link = hub.links.get(agent_id)
        if link is None:
            pid = hub.registry.holder(agent_id)
            if pid and pid != hub.pid and not handed:
                header = {"kind": "node", "agent": agent_id, "face": request.face,
                          "peer": request.peer, "from": request.header.get("from", "?"),
                          "nonces": [handshake.server_nonce.hex(), handshake.client_nonce.hex()]}
                hub._hand_off(pid, header, rest, sock)
                return
            log.info("%s (via the internal link): agent %s is not held at this node; "
                     "refused", request.peer, agent_id)
            answer_now(sock, handshake, 404, "agent %s is not held at node %s"
                       % (agent_id, self.node))
            sock.close()
            return
        hub.server.connections += 1
        try:
            user = NodeStreamUser(hub.loop, sock, link,
                                  {"face": request.face, "peer": request.peer},
                                  handshake=handshake, early=rest,
                                  label="%s -> agent %s (%s, via node %s)"
                                  % (request.peer, agent_id, request.face,
                                     request.header.get("from", "?")),
                                  on_finish=hub._user_finished,
                                  open_timeout=hub.connect_timeout)
        except StreamLimitError as exc:
            log.info("%s: agent %s: stream refused (%s); internal link closed", request.peer,
                     agent_id, exc)
            answer_now(sock, handshake, 503, "agent %s: %s" % (agent_id, exc))
            sock.close()
            hub.server.release()
            return
        hub.users.add(user)

    # -- the status page, stopping --------------------------------------------------------

    def add_nodes(self, document: dict) -> None:
        """This node, and each agent's holding node (None: nowhere, or unknown while
        the registry is unreachable)."""
        document["node"] = self.node
        elsewhere = [agent["id"] for agent in document["agents"] if not agent["connected"]]
        try:
            nodes = self.registry.nodes_of(elsewhere)
        except RegistryUnavailable:
            nodes = {}
        for agent in document["agents"]:
            agent["node"] = self.node if agent["connected"] else nodes.get(agent["id"])

    def drain(self) -> None:
        if self.acceptor is not None:
            self.acceptor.close()
            self.acceptor = None

    def close(self) -> None:
        self.registry.close()

