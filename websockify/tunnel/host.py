"""The master's part of the tunnels: the registry, the TCP faces, the hand-off directory.

Made before the first fork (a listen port in use stops the start: exit 5,
one line) and updated on SIGHUP before the new workers fork: new agents get
a registry entry and their listener, removed ones are marked (their
holders close the links) and their listeners closed here; the workers of
the old generation close their copies when they drain.  The hand-off
directory is private (mode 0700) and removed at exit.
"""

import logging
import os
import shutil
import socket
import tempfile
from typing import Dict, Optional, Tuple

from websockify.addr import format_host_port
from websockify.errors import ConfigError
from websockify.net.sockets import ListenError, tcp_listener
from websockify.tunnel.handoff import socket_path
from websockify.tunnel.registry import Registry

log = logging.getLogger("websockify")

MIN_CAPACITY = 4096


class TunnelStartError(ConfigError):
    """A tunnel setting that cannot work at start (exit 5, one line)."""


class TunnelHost:
    """What the master keeps for the tunnels; the workers inherit it at fork."""

    def __init__(self, config, capacity: Optional[int] = None):
        self.config = config
        self.directory = tempfile.mkdtemp(prefix="websockify-tunnel-")
        os.chmod(self.directory, 0o700)
        self.registry = Registry(capacity or max(MIN_CAPACITY, 2 * len(config.agents)),
                                 lock_path=os.path.join(self.directory, "registry.lock"))
        #: agent ID -> (address, listening socket) of its TCP face.
        self.faces: Dict[str, Tuple[Tuple[str, int], socket.socket]] = {}
        try:
            self._apply(config, starting=True)
        except BaseException:
            self.close()
            raise

    def _apply(self, config, starting: bool) -> None:
        left_out = self.registry.configure(config.agents)
        for agent_id in left_out:
            log.error("%s: agent %s: no room left in the tunnel registry (%d entries); "
                      "restart the server to grow it", config.source, agent_id,
                      self.registry.capacity)
        for agent_id, (address, sock) in list(self.faces.items()):
            entry = config.agents.get(agent_id)
            if entry is None or entry.listen != address:
                sock.close()
                del self.faces[agent_id]
        for agent_id, entry in config.agents.items():
            if entry.listen is None or agent_id in self.faces:
                continue
            host, port = entry.listen
            try:
                sock = tcp_listener(host, port)
            except ListenError as exc:
                message = "%s: agent %s: %s" % (config.source, agent_id, exc)
                if starting:
                    raise TunnelStartError(message) from None
                log.error("%s; that TCP face stays closed", message)
                continue
            self.faces[agent_id] = ((host, port), sock)

    def reload(self, config) -> None:
        """SIGHUP: the new configuration, for the workers forked next."""
        self.config = config
        self._apply(config, starting=False)

    def describe(self) -> str:
        faces = ", ".join("%s on %s" % (agent_id, format_host_port(*address))
                          for agent_id, (address, _) in sorted(self.faces.items()))
        return "tunnels: %d agent(s) at %s*%s" % (
            len(self.config.agents), self.config.path,
            ("; TCP faces: " + faces) if faces else "")

    def worker_exited(self, pid: int) -> None:
        """A worker died: what it held is nobody's now, its hand-off socket goes."""
        for agent_id in self.registry.worker_exited(pid):
            log.info("agent %s: its worker (pid %d) exited; the agent must reconnect",
                     agent_id, pid)
        try:
            os.unlink(socket_path(self.directory, pid))
        except OSError:
            pass

    def close(self) -> None:
        for _, sock in self.faces.values():
            try:
                sock.close()
            except OSError:
                pass
        self.faces = {}
        shutil.rmtree(self.directory, ignore_errors=True)
