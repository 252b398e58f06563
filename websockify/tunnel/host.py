"""The master's part of the tunnels: the agents' registry and the hand-off directory.

Made before the first fork, after the master has loaded the tunnel file
and bound the agents' TCP faces (runtime.tunnels, runtime.tunnel_listeners),
and kept through reloads: on SIGHUP the registry follows the new file
before the new workers fork (new agents get an entry, removed ones are
marked so that their holders close the links), and when a worker exits
its entries are cleared.  The hand-off directory is private (mode 0700)
and removed at exit.
"""

import logging
import os
import shutil
import tempfile
from typing import Optional

from websockify.tunnel.handoff import socket_path
from websockify.tunnel.registry import Registry

log = logging.getLogger("websockify")

#: Registry entries made at start (at least twice the agents configured):
#: a reload can add agents up to this many in all.
MIN_CAPACITY = 4096
#: With ``open = true``: entries for openly registered agents too (288 bytes each,
#: touched only when used); past it the one that left longest ago is recycled.
OPEN_CAPACITY = 65536


class TunnelHost:
    """What the master keeps for the tunnels; the workers inherit it at fork."""

    def __init__(self, config, capacity: Optional[int] = None):
        self.config = config
        self.directory = tempfile.mkdtemp(prefix="websockify-tunnel-")
        os.chmod(self.directory, 0o700)
        minimum = OPEN_CAPACITY if getattr(config, "open", False) else MIN_CAPACITY
        self.registry = Registry(capacity or max(minimum, 2 * len(config.agents)),
                                 lock_path=os.path.join(self.directory, "registry.lock"))
        self._configure(config)

    def _configure(self, config) -> None:
        for agent_id in self.registry.configure(config.agents,
                                                keep_open=getattr(config, "open", False)):
            log.error("%s: agent %s: no room left in the tunnel registry (%d entries); "
                      "restart the server to grow it", config.source, agent_id,
                      self.registry.capacity)

    def reload(self, config) -> None:
        """SIGHUP: the new configuration, before the new workers are forked."""
        self.config = config
        self._configure(config)

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
        shutil.rmtree(self.directory, ignore_errors=True)
