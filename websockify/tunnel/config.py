"""--tunnel-config FILE: our TOML layout or reverse_websockify's config.toml -> an immutable TunnelConfig.

Our layout::

    [tunnels]
    path = "/tunnel/"                  # agents upgrade at <path><ID>
    secrets = ["a.key", "b.key"]       # HS256 secrets, relative to FILE; either verifies
    audience = "websockify"            # optional: tokens must carry this aud
    on_duplicate = "replace"           # or "refuse"
    status_allow = ["127.0.0.1/32", "::1/128"]
    connect_timeout = 10               # seconds an OPEN may wait for the agent's answer
    registry = "redis://10.0.0.9:6379/0"   # optional, many instances: who holds which agent
    node = "10.0.0.5:7001"             # with registry: where the other instances reach this one
    cluster_secret = "cluster.key"     # with registry: the internal link's key, relative to FILE
    registry_ttl = 10                  # seconds a registration outlives its last refresh
    http_path = "/t/"                  # viewers' URLs <http_path><ID>/ (told to wst-client)
    open = false                       # true: any ID with a valid token registers (HTTP face)

    [tunnels.agent.LKLAFA151NA774655]
    nickname = "Bus02"
    listen = "127.0.0.1:39036"         # optional TCP face
    token = true                       # optional bridge face (?token=<ID>)
    http = true                        # optional HTTP face (<http_path><ID>/)

reverse_websockify's ``config.toml`` is read as it is: top-level
``http_server_endpoint`` (informational: our listen address is the command
line's), ``[remote_service.<ID>]`` with ``nickname`` and
``local_listen_endpoint``; its agents upgrade at ``/forward_to_me/<ID>`` and
authenticate with a client certificate, so it names no secrets.

Every problem is one TunnelConfigError, "FILE: problem" (exit status 5).
Reading the file and the secret files is the only I/O here; binding the
listen addresses is the master's (a port in use is found there).
"""

import ipaddress
import os
import re
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from websockify.addr import AddressError, format_host_port, parse_host_port
from websockify.errors import ConfigError

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

OURS = "websockify"
REVERSE_WEBSOCKIFY = "reverse_websockify"

DEFAULT_PATH = "/tunnel/"
#: Where viewers reach agents over HTTP: <http_path><ID>/ (the URL told to wst-client).
DEFAULT_HTTP_PATH = "/t/"
REVERSE_WEBSOCKIFY_PATH = "/forward_to_me/"
ON_DUPLICATE = ("replace", "refuse")
DEFAULT_STATUS_ALLOW = ("127.0.0.1/32", "::1/128")
DEFAULT_CONNECT_TIMEOUT = 10.0

# websocktunnel's rule for client IDs, with a length bound.
AGENT_ID = re.compile(r"[A-Za-z0-9_~.%-]{1,128}")
_ID_RULE = "1 to 128 of A-Z a-z 0-9 _ ~ . % -"

_TUNNELS_KEYS = ("path", "secrets", "audience", "on_duplicate", "status_allow",
                 "connect_timeout", "http_path", "agent", "registry", "node",
                 "cluster_secret", "registry_ttl", "open")
REGISTRY_SCHEMES = ("redis://", "rediss://", "unix://")
DEFAULT_REGISTRY_TTL = 10.0
_AGENT_KEYS = ("nickname", "listen", "token", "http")
_REVERSE_TOP_KEYS = ("http_server_endpoint", "remote_service")
_REMOTE_SERVICE_KEYS = ("nickname", "local_listen_endpoint")
# A listen host meaning every address: it overlaps any other host on its port.
_WILDCARD = ("", "0.0.0.0", "::")


class TunnelConfigError(ConfigError):
    """A tunnel configuration that cannot be used: ``FILE: problem`` or ``FILE:LINE: problem``."""

    def __init__(self, message: str, path: str, line: Optional[int] = None):
        where = "%s:%d" % (path, line) if line else path
        super().__init__("%s: %s" % (where, message))
        self.path = path
        self.line = line
        self.message = message


@dataclass(frozen=True)
class AgentEntry:
    """One agent the configuration names."""

    agent_id: str
    nickname: str = ""
    #: The TCP face: (host, port), host "" for every address; None: no TCP face.
    listen: Optional[Tuple[str, int]] = None
    #: The bridge face: reachable as ``?token=<ID>``.
    token: bool = False
    #: The HTTP face: viewers reach the agent's service at ``<http_path><ID>/``.
    http: bool = False

    @property
    def listen_description(self) -> Optional[str]:
        return format_host_port(*self.listen) if self.listen else None


@dataclass(frozen=True)
class TunnelConfig:
    """What ``--tunnel-config`` says; built once per (re)load, never changed."""

    path: str = DEFAULT_PATH
    secrets: Tuple[bytes, ...] = ()
    audience: Optional[str] = None
    on_duplicate: str = "replace"
    status_allow: Tuple[Network, ...] = tuple(ipaddress.ip_network(n) for n in DEFAULT_STATUS_ALLOW)
    #: Agents by ID, in the file's order (a read-only mapping).
    agents: Mapping[str, AgentEntry] = field(default_factory=lambda: types.MappingProxyType({}))
    #: The file it was read from (absolute).
    source: str = ""
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    #: OURS or REVERSE_WEBSOCKIFY: which layout the file used.
    layout: str = OURS
    #: reverse_websockify's http_server_endpoint, (host, port): informational only.
    http_server_endpoint: Optional[Tuple[str, int]] = None
    #: Many instances: the Redis URL of the agents' registry (None: this instance alone).
    registry: Optional[str] = None
    #: This instance's internal address, (host, port), where the others reach it.
    node: Optional[Tuple[str, int]] = None
    #: The key of the internal link between instances.
    cluster_secret: bytes = b""
    #: Seconds a registration lives in Redis unless refreshed.
    registry_ttl: float = DEFAULT_REGISTRY_TTL

    @property
    def node_description(self) -> Optional[str]:
        return format_host_port(*self.node) if self.node else None
    #: The HTTP face's prefix: an agent's viewer URL is <scheme>://<host><http_path><ID>/.
    http_path: str = DEFAULT_HTTP_PATH
    #: Open registration: any valid ID with a valid token registers (HTTP face only).
    open: bool = False

    def describe(self) -> str:
        faces = sum(1 for agent in self.agents.values() if agent.listen)
        return ("%d tunnel agent(s) at %s<ID> (%d TCP port(s)), from %s%s"
                % (len(self.agents), self.path, faces, self.source,
                   " (reverse_websockify's layout)" if self.layout == REVERSE_WEBSOCKIFY else ""))


def load_tunnel_config(path: str) -> TunnelConfig:
    """Read and check ``path``; TunnelConfigError (exit 5) on any problem."""
    path = os.path.abspath(path)
    return _Loader(path).load()


def _toml_module(path: str):
    if sys.version_info >= (3, 11):
        import tomllib
        return tomllib
    try:
        import tomli
    except ImportError:
        raise TunnelConfigError("reading TOML needs the tomli package on Python < 3.11 "
                                "(pip install 'websockify[tunnel]')", path) from None
    return tomli


_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    for kind, name in ((str, "a string"), (int, "an integer"), (float, "a float"),
                       (list, "an array"), (dict, "a table")):
        if isinstance(value, kind):
            return name
    return "a date or time"


class _Loader:
    """One load of one file: every error names the file."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, message: str, line: Optional[int] = None) -> TunnelConfigError:
        return TunnelConfigError(message, self.path, line)

    def load(self) -> TunnelConfig:
        document = self._parse()
        reverse = [key for key in _REVERSE_TOP_KEYS if key in document]
        for key in document:
            if key != "tunnels" and key not in _REVERSE_TOP_KEYS:
                raise self.fail("unknown key %r at the top level" % key)
        if reverse and "tunnels" in document:
            raise self.fail("[tunnels] cannot be mixed with reverse_websockify's %s"
                            % " and ".join(reverse))
        if reverse:
            return self._reverse_websockify(document)
        return self._ours(self._table(document.get("tunnels", {}), "tunnels", "the top level"))

    # -- reading -----------------------------------------------------------------

    def _parse(self) -> Dict[str, Any]:
        toml = _toml_module(self.path)
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise self.fail("cannot read: %s" % (exc.strerror or exc)) from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("not UTF-8 text") from None
        try:
            return toml.loads(text)
        except toml.TOMLDecodeError as exc:
            message = str(exc)
            position = _TOML_POSITION.search(message)
            if position is None:
                raise self.fail("TOML syntax error: %s" % message) from None
            raise self.fail("TOML syntax error: %s (column %s)"
                            % (message[:position.start()], position.group(2)),
                            int(position.group(1))) from None

    # -- typed values ----------------------------------------------------------------

    def _table(self, value: Any, name: str, where: str) -> Dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail("%s in %s must be a table, not %s" % (name, where, _type_name(value)))
        return value

    def _known(self, table: Dict[str, Any], keys: Tuple[str, ...], where: str) -> None:
        for key in table:
            if key not in keys:
                raise self.fail("unknown key %r in %s" % (key, where))

    def _string(self, table: Dict[str, Any], key: str, where: str,
                default: Optional[str] = None) -> Optional[str]:
        value = table.get(key, default)
        if value is not default and not isinstance(value, str):
            raise self.fail("%s in %s must be a string, not %s" % (key, where, _type_name(value)))
        return value

    def _strings(self, table: Dict[str, Any], key: str, where: str,
                 default: Tuple[str, ...]) -> Tuple[str, ...]:
        value = table.get(key, default)
        if value is default:
            return default
        if not isinstance(value, list):
            raise self.fail("%s in %s must be an array of strings, not %s"
                            % (key, where, _type_name(value)))
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise self.fail("%s[%d] in %s must be a string, not %s"
                                % (key, index, where, _type_name(item)))
        return tuple(value)

    def _boolean(self, table: Dict[str, Any], key: str, where: str) -> bool:
        value = table.get(key, False)
        if not isinstance(value, bool):
            raise self.fail("%s in %s must be true or false, not %s"
                            % (key, where, _type_name(value)))
        return value

    def _prefix(self, table: Dict[str, Any], key: str, where: str, default: str) -> str:
        """A URL path prefix: "/" ... "/", no spaces, '?' or '#'."""
        value = self._string(table, key, where, default)
        if not (value.startswith("/") and value.endswith("/")) or any(
                c.isspace() or c in "?#" for c in value):
            raise self.fail("%s in %s must start and end with '/' (no spaces, '?' or '#'), "
                            "not %r" % (key, where, value))
        return value

    def _agent_id(self, agent_id: str, where: str) -> str:
        if not AGENT_ID.fullmatch(agent_id):
            raise self.fail("bad agent ID %r in %s (%s)" % (agent_id, where, _ID_RULE))
        return agent_id

    def _listen(self, text: str, key: str, where: str) -> Tuple[str, int]:
        try:
            host, port = parse_host_port(text, listen=True)
        except AddressError as exc:
            raise self.fail("bad %s address %r in %s: %s" % (key, text, where, exc)) from None
        if port == 0:
            raise self.fail("bad %s address %r in %s: port 0 is not a fixed port"
                            % (key, text, where))
        return host, int(port)

    # -- the layouts ---------------------------------------------------------------

    def _ours(self, tunnels: Dict[str, Any]) -> TunnelConfig:
        where = "[tunnels]"
        self._known(tunnels, _TUNNELS_KEYS, where)
        path = self._prefix(tunnels, "path", where, DEFAULT_PATH)
        http_path = self._prefix(tunnels, "http_path", where, DEFAULT_HTTP_PATH)
        secrets = tuple(self._secret(name) for name in self._strings(tunnels, "secrets", where, ()))
        audience = self._string(tunnels, "audience", where)
        if audience == "":
            raise self.fail("audience in %s must not be empty" % where)
        on_duplicate = self._string(tunnels, "on_duplicate", where, "replace")
        if on_duplicate not in ON_DUPLICATE:
            raise self.fail("on_duplicate in %s must be 'replace' or 'refuse', not %r"
                            % (where, on_duplicate))
        status_allow = self._networks(
            self._strings(tunnels, "status_allow", where, DEFAULT_STATUS_ALLOW), where)
        timeout = tunnels.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise self.fail("connect_timeout in %s must be a positive number of seconds, not %r"
                            % (where, timeout))
        cluster = self._cluster(tunnels, where)
        agents: List[AgentEntry] = []
        for agent_id, table in self._table(tunnels.get("agent", {}), "agent", where).items():
            self._agent_id(agent_id, "[tunnels.agent]")
            agent_where = "[tunnels.agent.%s]" % agent_id
            table = self._table(table, agent_id, "[tunnels.agent]")
            self._known(table, _AGENT_KEYS, agent_where)
            listen = self._string(table, "listen", agent_where)
            agents.append(AgentEntry(
                agent_id, self._string(table, "nickname", agent_where, ""),
                self._listen(listen, "listen", agent_where) if listen is not None else None,
                self._boolean(table, "token", agent_where),
                self._boolean(table, "http", agent_where)))
        open_registration = self._boolean(tunnels, "open", where)
        if open_registration and not secrets:
            raise self.fail("open = true in %s needs secrets (open registration is by token)"
                            % where)
        agents_map = self._agents(agents, "listen", "tunnels.agent")
        self._node_apart(cluster.get("node"), agents)
        return TunnelConfig(path=path, secrets=secrets, audience=audience,
                            on_duplicate=on_duplicate, status_allow=status_allow,
                            agents=agents_map, source=self.path,
                            connect_timeout=float(timeout), layout=OURS, http_path=http_path,
                            open=open_registration, **cluster)

    def _cluster(self, tunnels: Dict[str, Any], where: str) -> Dict[str, Any]:
        """registry, node, cluster_secret and registry_ttl: all three or none, checked."""
        registry = self._string(tunnels, "registry", where)
        node = self._string(tunnels, "node", where)
        secret_name = self._string(tunnels, "cluster_secret", where)
        ttl = tunnels.get("registry_ttl", DEFAULT_REGISTRY_TTL)
        given = [key for key, value in (("registry", registry), ("node", node),
                                        ("cluster_secret", secret_name)) if value is not None]
        if not given:
            if "registry_ttl" in tunnels:
                raise self.fail("registry_ttl in %s needs registry" % where)
            return {}
        if len(given) < 3:
            missing = [key for key in ("registry", "node", "cluster_secret") if key not in given]
            raise self.fail("%s in %s also needs %s" % (" and ".join(given), where,
                                                        " and ".join(missing)))
        if not registry.startswith(REGISTRY_SCHEMES) or len(registry) <= len(
                registry.split("//", 1)[0]) + 2:
            raise self.fail("registry in %s must be a redis://HOST:PORT/DB, rediss:// or "
                            "unix:// URL, not %r" % (where, registry))
        import importlib.util
        if importlib.util.find_spec("redis") is None:
            raise self.fail("registry in %s needs the redis package "
                            "(pip install 'websockify[redis]')" % where)
        host, port = self._listen(node, "node", where)
        if host in _WILDCARD:
            raise self.fail("node %r in %s must be an address the other instances can reach "
                            "(not every address)" % (node, where))
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl >= 1:
            raise self.fail("registry_ttl in %s must be at least 1 second, not %r"
                            % (where, ttl))
        return {"registry": registry, "node": (host, port),
                "cluster_secret": self._secret(secret_name), "registry_ttl": float(ttl)}

    def _node_apart(self, node: Optional[Tuple[str, int]], agents: List[AgentEntry]) -> None:
        if node is None:
            return
        for agent in agents:
            if agent.listen is not None and agent.listen[1] == node[1] and (
                    agent.listen[0] == node[0] or agent.listen[0] in _WILDCARD):
                raise self.fail("node %s in [tunnels] overlaps agent %s's listen %s"
                                % (format_host_port(*node), agent.agent_id,
                                   agent.listen_description))

    def _reverse_websockify(self, document: Dict[str, Any]) -> TunnelConfig:
        endpoint = self._string(document, "http_server_endpoint", "the top level")
        http_endpoint = (self._listen(endpoint, "http_server_endpoint", "the top level")
                         if endpoint is not None else None)
        agents: List[AgentEntry] = []
        services = self._table(document.get("remote_service", {}), "remote_service",
                               "the top level")
        for agent_id, table in services.items():
            self._agent_id(agent_id, "[remote_service]")
            where = "[remote_service.%s]" % agent_id
            table = self._table(table, agent_id, "[remote_service]")
            self._known(table, _REMOTE_SERVICE_KEYS, where)
            listen = self._string(table, "local_listen_endpoint", where)
            agents.append(AgentEntry(
                agent_id, self._string(table, "nickname", where, ""),
                self._listen(listen, "local_listen_endpoint", where)
                if listen is not None else None, False))
        return TunnelConfig(path=REVERSE_WEBSOCKIFY_PATH, on_duplicate="replace",
                            status_allow=self._networks(DEFAULT_STATUS_ALLOW, "defaults"),
                            agents=self._agents(agents, "local_listen_endpoint",
                                                "remote_service"),
                            source=self.path, layout=REVERSE_WEBSOCKIFY,
                            http_server_endpoint=http_endpoint)

    # -- parts -----------------------------------------------------------------------

    def _secret(self, name: str) -> bytes:
        secret_path = os.path.join(os.path.dirname(self.path), name)
        try:
            with open(secret_path, "rb") as handle:
                secret = handle.read().strip()
        except OSError as exc:
            raise self.fail("cannot read secret file %s: %s"
                            % (secret_path, exc.strerror or exc)) from None
        if not secret:
            raise self.fail("secret file %s is empty" % secret_path)
        return secret

    def _networks(self, texts: Tuple[str, ...], where: str) -> Tuple[Network, ...]:
        networks = []
        for text in texts:
            try:
                networks.append(ipaddress.ip_network(text.strip(), strict=False))
            except ValueError:
                raise self.fail("bad network %r in status_allow in %s" % (text, where)) from None
        return tuple(networks)

    def _agents(self, agents: List[AgentEntry], key: str, table: str) -> Mapping[str, AgentEntry]:
        """The read-only mapping, once no two agents share a listen address."""
        seen: List[AgentEntry] = []
        for agent in agents:
            if agent.listen is not None:
                host, port = agent.listen
                for other in seen:
                    other_host, other_port = other.listen
                    if port == other_port and (host == other_host or host in _WILDCARD
                                               or other_host in _WILDCARD):
                        raise self.fail("%s %s in [%s.%s] overlaps agent %s's %s"
                                        % (key, agent.listen_description, table,
                                           agent.agent_id, other.agent_id,
                                           other.listen_description))
                seen.append(agent)
        return types.MappingProxyType({agent.agent_id: agent for agent in agents})
