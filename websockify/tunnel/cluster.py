"""Many instances, one Redis: which instance (node) holds which agent.

Each worker records the agents whose links it holds under
``websockify:tunnel:<ID>`` = ``"<node> <holding>"`` (``holding`` is random per
link), with a TTL that it refreshes every third of it while the link lives,
and deletes the key when the link ends.  Three short Lua scripts keep every
change atomic in Redis:

* ``register`` sets the key (the newest registration wins) and returns what
  it replaced; with ``on_duplicate = "refuse"`` it leaves another holder's
  key alone and says so;
* ``refresh`` extends the key if it is still ours, sets it again if it is
  gone (Redis restarted, or an outage outlived the TTL), and answers 0 when
  another holding replaced it: that link is a stale copy and is closed;
* ``release`` deletes the key only if it is still ours.

A user for an agent not held on this host is looked up here (``lookup``).
While Redis cannot be reached, lookups raise ``RegistryUnavailable`` (503 /
close for those users), the agents held here go on, and one line is logged
per outage for the whole host (the shared-memory registry records the
state, so the workers do not each log it), and one when it is back.
"""

import logging
import os
from typing import Callable, Dict, Optional, Tuple

import gevent
from gevent.event import Event

log = logging.getLogger("websockify")

KEY_PREFIX = "websockify:tunnel:"
#: Redis calls give up after this long (a stalled Redis is an outage, not a hang).
REDIS_TIMEOUT = 1.0
#: While Redis is down, how often the refresher tries again.
RETRY_INTERVAL = 1.0

_REGISTER = """
local old = redis.call('GET', KEYS[1])
if ARGV[3] == '1' and old and old ~= ARGV[1] then return {0, old} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {1, old or ''}
"""
_REFRESH = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not current then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 2 end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RegistryUnavailable(Exception):
    """Redis could not be asked (the caller answers 503 or closes)."""


def parse_value(value) -> Tuple[str, str]:
    """(node, holding) from a key's value."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    node, _, holding = (value or "").partition(" ")
    return node, holding


class ClusterRegistry:
    """One worker's view of the cluster registry in Redis.

    ``on_lost(agent_id, holding, node)`` is called (in a greenlet) when a
    refresh finds that another instance registered the agent since.
    """

    def __init__(self, url: str, node: str, ttl: float, shared,
                 on_lost: Callable[[str, str, str], None]):
        import redis
        self.url = url
        self.node = node
        self.ttl_ms = int(ttl * 1000)
        self.interval = ttl / 3.0
        self.shared = shared
        self.on_lost = on_lost
        self._redis_errors = (redis.RedisError, OSError)
        self.client = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT,
                                           socket_connect_timeout=REDIS_TIMEOUT)
        self._register = self.client.register_script(_REGISTER)
        self._refresh = self.client.register_script(_REFRESH)
        self._release = self.client.register_script(_RELEASE)
        #: agent ID -> the holding string of this worker's link.
        self.held: Dict[str, str] = {}
        self._wake = Event()
        self._refresher = gevent.spawn(self._refresh_loop)

    @staticmethod
    def new_holding() -> str:
        return os.urandom(12).hex()

    def _value(self, holding: str) -> str:
        return "%s %s" % (self.node, holding)

    # -- outages -------------------------------------------------------------------

    def _failed(self, exc: Exception) -> RegistryUnavailable:
        if self.shared.note_registry(down=True):
            log.warning("tunnel registry %s unreachable (%s); serving only the agents held "
                        "here until it is back", self.url, exc)
        return RegistryUnavailable("tunnel registry unreachable: %s" % exc)

    def _answered(self) -> None:
        if self.shared.note_registry(down=False):
            log.info("tunnel registry %s reachable again; the agents held here are "
                     "registered again", self.url)
            self._wake.set()

    @property
    def down(self) -> bool:
        return self.shared.registry_down()

    # -- the agents held here -----------------------------------------------------

    def register(self, agent_id: str, holding: str, refuse: bool) -> Tuple[bool, str]:
        """Record a new link: (taken, the node that held it before or "").

        Raises RegistryUnavailable; the link is then held without a record,
        and the refresher records it once Redis answers again.
        """
        self.held[agent_id] = holding
        try:
            taken, old = self._register(keys=[KEY_PREFIX + agent_id],
                                        args=[self._value(holding), self.ttl_ms,
                                              "1" if refuse else "0"])
        except self._redis_errors as exc:
            raise self._failed(exc) from None
        self._answered()
        if not taken:
            del self.held[agent_id]
        return bool(taken), parse_value(old)[0] if old else ""

    def release(self, agent_id: str, holding: str) -> None:
        """The link ended: delete its record if it is still its own (in a greenlet)."""
        if self.held.get(agent_id) == holding:
            del self.held[agent_id]
        try:
            self._release(keys=[KEY_PREFIX + agent_id], args=[self._value(holding)])
        except self._redis_errors as exc:
            # The TTL removes it; the refresher notices the outage too.
            self._failed(exc)
            return
        self._answered()

    def _refresh_loop(self) -> None:
        while True:
            self._wake.wait(RETRY_INTERVAL if self.down else self.interval)
            self._wake.clear()
            try:
                self.refresh_all()
            except Exception:
                log.exception("tunnel registry: refreshing failed")

    def refresh_all(self) -> None:
        held = list(self.held.items())
        if not held and not self.down:
            return
        try:
            if not held:
                self.client.ping()
                self._answered()
                return
            with self.client.pipeline(transaction=False) as pipe:
                for agent_id, holding in held:
                    self._refresh(keys=[KEY_PREFIX + agent_id],
                                  args=[self._value(holding), self.ttl_ms], client=pipe)
                results = pipe.execute()
        except self._redis_errors as exc:
            self._failed(exc)
            return
        self._answered()
        for (agent_id, holding), result in zip(held, results):
            if result == 0 and self.held.get(agent_id) == holding:
                del self.held[agent_id]
                try:
                    node = self.lookup(agent_id) or "?"
                except RegistryUnavailable:
                    node = "?"
                self.on_lost(agent_id, holding, node)
            elif result == 2:
                log.debug("agent %s: registered again in the tunnel registry", agent_id)

    # -- users ---------------------------------------------------------------------------

    def lookup(self, agent_id: str) -> Optional[str]:
        """The node holding ``agent_id``, or None; raises RegistryUnavailable."""
        try:
            value = self.client.get(KEY_PREFIX + agent_id)
        except self._redis_errors as exc:
            raise self._failed(exc) from None
        self._answered()
        return parse_value(value)[0] if value else None

    def nodes_of(self, agent_ids) -> Dict[str, str]:
        """agent ID -> holding node, for those held anywhere (one MGET); raises
        RegistryUnavailable."""
        agent_ids = list(agent_ids)
        if not agent_ids:
            return {}
        try:
            values = self.client.mget([KEY_PREFIX + agent_id for agent_id in agent_ids])
        except self._redis_errors as exc:
            raise self._failed(exc) from None
        self._answered()
        return {agent_id: parse_value(value)[0]
                for agent_id, value in zip(agent_ids, values) if value}

    def close(self) -> None:
        self._refresher.kill(block=False)
        try:
            self.client.close()
        except Exception:
            pass

