"""--tunnel-config files (websockify.tunnel.config): both layouts, every refusal's exact message."""

import dataclasses
import ipaddress
import os
import sys
import types

import pytest

from websockify.errors import EXIT_CONFIG, ConfigError
from websockify.tunnel import config as tc
from websockify.tunnel.config import (AgentEntry, TunnelConfig, TunnelConfigError,
                                      load_tunnel_config)

LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))

OURS = """\
[tunnels]
path = "/tunnel/"
secrets = ["tunnel-a.key", "keys/tunnel-b.key"]
audience = "websockify"
on_duplicate = "refuse"
status_allow = ["127.0.0.1/32", "::1/128", "10.1.0.0/16"]
connect_timeout = 2.5

[tunnels.agent.LKLAFA151NA774655]
nickname = "Bus02"
listen = "127.0.0.1:39036"
token = true

[tunnels.agent."a.b~c%d-e_f"]
token = true

[tunnels.agent.only-listen]
listen = "[::1]:39037"
"""

# reverse_websockify's example config.toml, as it ships (with its comment).
REVERSE = """\
# 建议使用nginx反向代理套上SSL，并且使用客户端证书鉴权后，再暴露到公网
http_server_endpoint = "127.0.0.1:39000"

[remote_service.LKLAFA155MA767657]
nickname = "Bus01"
local_listen_endpoint = "0.0.0.0:39034"
[remote_service.LKLAFA151NA774655]
nickname = "Bus02"
local_listen_endpoint = "0.0.0.0:39036"
"""


def write(path, text, mode="w"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode) as handle:
        handle.write(text)
    return str(path)


@pytest.fixture
def folder(tmp_path):
    write(tmp_path / "tunnel-a.key", b"  secret-a\n\n", "wb")
    write(tmp_path / "keys" / "tunnel-b.key", b"\tsecret b \r\n", "wb")
    return tmp_path


def load(folder, text):
    return load_tunnel_config(write(folder / "tunnels.toml", text))


def error(folder, text):
    with pytest.raises(TunnelConfigError) as info:
        load(folder, text)
    return str(info.value)


# -- the two layouts -------------------------------------------------------------

def test_our_layout_parses_to_the_exact_config(folder):
    config = load(folder, OURS)
    assert config == TunnelConfig(
        path="/tunnel/", secrets=(b"secret-a", b"secret b"), audience="websockify",
        on_duplicate="refuse",
        status_allow=LOOPBACK + (ipaddress.ip_network("10.1.0.0/16"),),
        agents=types.MappingProxyType({
            "LKLAFA151NA774655": AgentEntry("LKLAFA151NA774655", "Bus02",
                                            ("127.0.0.1", 39036), True),
            "a.b~c%d-e_f": AgentEntry("a.b~c%d-e_f", "", None, True),
            "only-listen": AgentEntry("only-listen", "", ("::1", 39037), False),
        }),
        source=str(folder / "tunnels.toml"), connect_timeout=2.5, layout=tc.OURS,
        http_server_endpoint=None)
    assert list(config.agents) == ["LKLAFA151NA774655", "a.b~c%d-e_f", "only-listen"]


def test_http_path_defaults_to_t_and_is_read(folder):
    assert load(folder, "[tunnels]\n").http_path == "/t/"
    assert load(folder, "[tunnels]\nhttp_path = '/'\n").http_path == "/"
    assert load(folder, "[tunnels]\nhttp_path = '/view/'\n").http_path == "/view/"
    assert load(folder, REVERSE).http_path == "/t/"


def test_reverse_websockify_config_toml_parses_as_it_is(folder):
    config = load(folder, REVERSE)
    assert config == TunnelConfig(
        path="/forward_to_me/", secrets=(), audience=None, on_duplicate="replace",
        status_allow=LOOPBACK,
        agents=types.MappingProxyType({
            "LKLAFA155MA767657": AgentEntry("LKLAFA155MA767657", "Bus01",
                                            ("0.0.0.0", 39034), False),
            "LKLAFA151NA774655": AgentEntry("LKLAFA151NA774655", "Bus02",
                                            ("0.0.0.0", 39036), False),
        }),
        source=str(folder / "tunnels.toml"), connect_timeout=10.0,
        layout=tc.REVERSE_WEBSOCKIFY, http_server_endpoint=("127.0.0.1", 39000))
    assert config.describe() == (
        "2 tunnel agent(s) at /forward_to_me/<ID> (2 TCP port(s)), from %s "
        "(reverse_websockify's layout)" % (folder / "tunnels.toml"))


def test_defaults_of_our_layout(folder):
    config = load(folder, "[tunnels]\n")
    assert config == TunnelConfig(source=str(folder / "tunnels.toml"))
    assert (config.path, config.secrets, config.audience, config.on_duplicate,
            config.status_allow, dict(config.agents), config.connect_timeout) == (
        "/tunnel/", (), None, "replace", LOOPBACK, {}, 10.0)


def test_an_empty_file_is_a_config_without_agents(folder):
    assert load(folder, "") == TunnelConfig(source=str(folder / "tunnels.toml"))


def test_secret_paths_are_relative_to_the_config_file_not_the_cwd(folder, tmp_path_factory,
                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    config = load_tunnel_config(os.path.relpath(write(folder / "tunnels.toml", OURS)))
    assert config.secrets == (b"secret-a", b"secret b")
    assert config.source == str(folder / "tunnels.toml")


def test_an_absolute_secret_path_is_used_as_it_is(folder, tmp_path_factory):
    other = tmp_path_factory.mktemp("keys") / "abs.key"
    write(other, b"\n  absolute  \n", "wb")
    config = load(folder, '[tunnels]\nsecrets = ["%s"]\n' % other)
    assert config.secrets == (b"absolute",)


def test_listen_forms(folder):
    config = load(folder, '[tunnels.agent.a]\nlisten = "39036"\n'
                          '[tunnels.agent.b]\nlisten = "localhost:39037"\n'
                          '[tunnels.agent.c]\nlisten = ":39038"\n')
    assert [agent.listen for agent in config.agents.values()] == [
        ("", 39036), ("localhost", 39037), ("", 39038)]
    assert [agent.listen_description for agent in config.agents.values()] == [
        ":39036", "localhost:39037", ":39038"]


def test_the_config_is_immutable(folder):
    config = load(folder, OURS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.path = "/x/"
    with pytest.raises(TypeError):
        config.agents["new"] = AgentEntry("new")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.agents["only-listen"].listen = None
    assert isinstance(config.secrets, tuple) and isinstance(config.status_allow, tuple)


def test_the_error_is_a_config_error_with_exit_status_5(folder):
    with pytest.raises(ConfigError) as info:
        load(folder, "[tunnels]\npath = 1\n")
    assert info.value.exit_code == EXIT_CONFIG == 5
    assert info.value.path == str(folder / "tunnels.toml")
    assert info.value.message == "path in [tunnels] must be a string, not an integer"


# -- refusals: "FILE: problem", exactly -------------------------------------------

BAD = [
    # TOML syntax, with its line
    ("[tunnels]\npath = \n", ":2: TOML syntax error: Invalid value (column 8)"),
    ("[tunnels]\n[tunnels]\n", ":2: TOML syntax error: Cannot declare ('tunnels',) twice "
                               "(column 9)"),
    # unknown keys, named with their table
    ("[tunnels]\npaht = '/x/'\n", ": unknown key 'paht' in [tunnels]"),
    ("[tunnels.agent.A]\nlisten_on = '1'\n", ": unknown key 'listen_on' in [tunnels.agent.A]"),
    ("tunnel = 1\n", ": unknown key 'tunnel' at the top level"),
    ("http_server_endpoint = '127.0.0.1:1'\n[remote_service.A]\nnickname = 'x'\ntoken = true\n",
     ": unknown key 'token' in [remote_service.A]"),
    ("[tunnels]\n[remote_service.A]\n",
     ": [tunnels] cannot be mixed with reverse_websockify's remote_service"),
    # wrong types
    ("tunnels = 3\n", ": tunnels in the top level must be a table, not an integer"),
    ("[tunnels]\npath = 1\n", ": path in [tunnels] must be a string, not an integer"),
    ("[tunnels]\nsecrets = 'a.key'\n",
     ": secrets in [tunnels] must be an array of strings, not a string"),
    ("[tunnels]\nsecrets = ['tunnel-a.key', 2]\n",
     ": secrets[1] in [tunnels] must be a string, not an integer"),
    ("[tunnels]\naudience = true\n", ": audience in [tunnels] must be a string, not a boolean"),
    ("[tunnels]\naudience = ''\n", ": audience in [tunnels] must not be empty"),
    ("[tunnels]\nstatus_allow = '127.0.0.1'\n",
     ": status_allow in [tunnels] must be an array of strings, not a string"),
    ("[tunnels]\nconnect_timeout = 0\n",
     ": connect_timeout in [tunnels] must be a positive number of seconds, not 0"),
    ("[tunnels]\nconnect_timeout = '5'\n",
     ": connect_timeout in [tunnels] must be a positive number of seconds, not '5'"),
    ("[tunnels]\nagent = []\n", ": agent in [tunnels] must be a table, not an array"),
    ("[tunnels.agent]\nA = 1\n", ": A in [tunnels.agent] must be a table, not an integer"),
    ("[tunnels.agent.A]\nnickname = 7\n",
     ": nickname in [tunnels.agent.A] must be a string, not an integer"),
    ("[tunnels.agent.A]\ntoken = 'yes'\n",
     ": token in [tunnels.agent.A] must be true or false, not a string"),
    ("[tunnels.agent.A]\nhttp = 1\n",
     ": http in [tunnels.agent.A] must be true or false, not an integer"),
    ("[tunnels]\nopen = 'yes'\n", ": open in [tunnels] must be true or false, not a string"),
    ("[tunnels]\nopen = true\n",
     ": open = true in [tunnels] needs secrets (open registration is by token)"),
    ("[tunnels.agent.A]\nlisten = 39036\n",
     ": listen in [tunnels.agent.A] must be a string, not an integer"),
    ("remote_service = 'x'\n", ": remote_service in the top level must be a table, not a string"),
    ("[remote_service.A]\nlocal_listen_endpoint = 1\n",
     ": local_listen_endpoint in [remote_service.A] must be a string, not an integer"),
    ("http_server_endpoint = 39000\n",
     ": http_server_endpoint in the top level must be a string, not an integer"),
    # path
    ("[tunnels]\npath = 'tunnel/'\n",
     ": path in [tunnels] must start and end with '/' (no spaces, '?' or '#'), not 'tunnel/'"),
    ("[tunnels]\npath = '/tun nel/'\n",
     ": path in [tunnels] must start and end with '/' (no spaces, '?' or '#'), not '/tun nel/'"),
    ("[tunnels]\nhttp_path = 't/'\n",
     ": http_path in [tunnels] must start and end with '/' (no spaces, '?' or '#'), not 't/'"),
    ("[tunnels]\nhttp_path = '/t?x/'\n",
     ": http_path in [tunnels] must start and end with '/' (no spaces, '?' or '#'), not '/t?x/'"),
    ("[tunnels]\nhttp_path = 3\n", ": http_path in [tunnels] must be a string, not an integer"),
    # bad listen addresses
    ("[tunnels.agent.A]\nlisten = '127.0.0.1:99999'\n",
     ": bad listen address '127.0.0.1:99999' in [tunnels.agent.A]: port 99999 out of range"),
    ("[tunnels.agent.A]\nlisten = 'nowhere'\n",
     ": bad listen address 'nowhere' in [tunnels.agent.A]: bad port 'nowhere'"),
    ("[tunnels.agent.A]\nlisten = '127.0.0.1:0'\n",
     ": bad listen address '127.0.0.1:0' in [tunnels.agent.A]: port 0 is not a fixed port"),
    ("[tunnels.agent.A]\nlisten = '[::1:39036'\n",
     ": bad listen address '[::1:39036' in [tunnels.agent.A]: '[::1:39036' is not host:port"),
    ("[remote_service.A]\nlocal_listen_endpoint = 'x:y'\n",
     ": bad local_listen_endpoint address 'x:y' in [remote_service.A]: bad port 'y'"),
    ("http_server_endpoint = 'a b:80'\n",
     ": bad http_server_endpoint address 'a b:80' in the top level: bad host 'a b'"),
    # two agents on one listen address
    ("[tunnels.agent.A]\nlisten = '127.0.0.1:39036'\n[tunnels.agent.B]\n"
     "listen = '127.0.0.1:39036'\n",
     ": listen 127.0.0.1:39036 in [tunnels.agent.B] overlaps agent A's 127.0.0.1:39036"),
    ("[tunnels.agent.A]\nlisten = '39036'\n[tunnels.agent.B]\nlisten = '127.0.0.1:39036'\n",
     ": listen 127.0.0.1:39036 in [tunnels.agent.B] overlaps agent A's :39036"),
    ("[remote_service.A]\nlocal_listen_endpoint = '0.0.0.0:39036'\n[remote_service.B]\n"
     "local_listen_endpoint = '127.0.0.1:39036'\n",
     ": local_listen_endpoint 127.0.0.1:39036 in [remote_service.B] overlaps agent A's "
     "0.0.0.0:39036"),
    # bad IDs
    ("[tunnels.agent.'a b']\n",
     ": bad agent ID 'a b' in [tunnels.agent] (1 to 128 of A-Z a-z 0-9 _ ~ . % -)"),
    ("[tunnels.agent.'a/b']\n",
     ": bad agent ID 'a/b' in [tunnels.agent] (1 to 128 of A-Z a-z 0-9 _ ~ . % -)"),
    ("[tunnels.agent.'']\n",
     ": bad agent ID '' in [tunnels.agent] (1 to 128 of A-Z a-z 0-9 _ ~ . % -)"),
    ("[tunnels.agent.'%s']\n" % ("x" * 129),
     ": bad agent ID '%s' in [tunnels.agent] (1 to 128 of A-Z a-z 0-9 _ ~ . %% -)" % ("x" * 129)),
    ("[tunnels.agent.'é']\n",
     ": bad agent ID 'é' in [tunnels.agent] (1 to 128 of A-Z a-z 0-9 _ ~ . % -)"),
    ("[remote_service.\"a\\nb\"]\n",
     ": bad agent ID 'a\\nb' in [remote_service] (1 to 128 of A-Z a-z 0-9 _ ~ . % -)"),
    # status_allow networks
    ("[tunnels]\nstatus_allow = ['127.0.0.1/33']\n",
     ": bad network '127.0.0.1/33' in status_allow in [tunnels]"),
    ("[tunnels]\nstatus_allow = ['localhost']\n",
     ": bad network 'localhost' in status_allow in [tunnels]"),
    # on_duplicate
    ("[tunnels]\non_duplicate = 'kick'\n",
     ": on_duplicate in [tunnels] must be 'replace' or 'refuse', not 'kick'"),
    ("[tunnels]\non_duplicate = 1\n",
     ": on_duplicate in [tunnels] must be a string, not an integer"),
    # many instances: registry, node and cluster_secret together
    ("[tunnels]\nregistry = 'redis://127.0.0.1:6379/0'\n",
     ": registry in [tunnels] also needs node and cluster_secret"),
    ("[tunnels]\nnode = '10.0.0.5:7001'\ncluster_secret = 'tunnel-a.key'\n",
     ": node and cluster_secret in [tunnels] also needs registry"),
    ("[tunnels]\nregistry_ttl = 5\n", ": registry_ttl in [tunnels] needs registry"),
    ("[tunnels]\nregistry = 'http://127.0.0.1:6379'\nnode = '10.0.0.5:7001'\n"
     "cluster_secret = 'tunnel-a.key'\n",
     ": registry in [tunnels] must be a redis://HOST:PORT/DB, rediss:// or unix:// URL, "
     "not 'http://127.0.0.1:6379'"),
    ("[tunnels]\nregistry = 'redis://'\nnode = '10.0.0.5:7001'\ncluster_secret = 'tunnel-a.key'\n",
     ": registry in [tunnels] must be a redis://HOST:PORT/DB, rediss:// or unix:// URL, "
     "not 'redis://'"),
    ("[tunnels]\nregistry = 'redis://r:6379/0'\nnode = '0.0.0.0:7001'\n"
     "cluster_secret = 'tunnel-a.key'\n",
     ": node '0.0.0.0:7001' in [tunnels] must be an address the other instances can reach "
     "(not every address)"),
    ("[tunnels]\nregistry = 'redis://r:6379/0'\nnode = '7001'\ncluster_secret = 'tunnel-a.key'\n",
     ": node '7001' in [tunnels] must be an address the other instances can reach "
     "(not every address)"),
    ("[tunnels]\nregistry = 'redis://r:6379/0'\nnode = '10.0.0.5:0'\n"
     "cluster_secret = 'tunnel-a.key'\n",
     ": bad node address '10.0.0.5:0' in [tunnels]: port 0 is not a fixed port"),
    ("%sregistry_ttl = 0.5\n" % "CLUSTER",
     ": registry_ttl in [tunnels] must be at least 1 second, not 0.5"),
    ("%sregistry_ttl = true\n" % "CLUSTER",
     ": registry_ttl in [tunnels] must be at least 1 second, not True"),
    ("%s[tunnels.agent.A]\nlisten = '10.0.0.5:7001'\n" % "CLUSTER",
     ": node 10.0.0.5:7001 in [tunnels] overlaps agent A's listen 10.0.0.5:7001"),
    ("%s[tunnels.agent.A]\nlisten = '7001'\n" % "CLUSTER",
     ": node 10.0.0.5:7001 in [tunnels] overlaps agent A's listen :7001"),
]


CLUSTER = ("[tunnels]\nregistry = 'redis://127.0.0.1:6379/0'\nnode = '10.0.0.5:7001'\n"
           "cluster_secret = 'tunnel-a.key'\n")


@pytest.mark.parametrize("text, problem", [(t.replace("CLUSTER", CLUSTER), p) for t, p in BAD])
def test_bad_file_gets_one_exact_message(folder, text, problem):
    assert error(folder, text) == str(folder / "tunnels.toml") + problem


def test_many_instances_keys(folder):
    pytest.importorskip("redis")
    config = load(folder, CLUSTER + "registry_ttl = 4\n[tunnels.agent.A]\nlisten = '10.0.0.5:7002'\n")
    assert (config.registry, config.node, config.node_description, config.cluster_secret,
            config.registry_ttl) == ("redis://127.0.0.1:6379/0", ("10.0.0.5", 7001),
                                     "10.0.0.5:7001", b"secret-a", 4.0)
    assert load(folder, CLUSTER).registry_ttl == 10.0
    single = load(folder, "[tunnels]\n")
    assert (single.registry, single.node, single.cluster_secret) == (None, None, b"")


def test_a_missing_cluster_secret_file(folder):
    message = error(folder, CLUSTER.replace("tunnel-a.key", "missing.key"))
    assert message.startswith(str(folder / "tunnels.toml") + ": cannot read secret file ")
    assert "missing.key" in message


def test_registry_without_the_redis_package(folder, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "redis" else real(name, *a))
    assert error(folder, CLUSTER) == str(folder / "tunnels.toml") + (
        ": registry in [tunnels] needs the redis package (pip install 'websockify[redis]')")


def test_a_128_character_id_is_fine(folder):
    config = load(folder, "[tunnels.agent.%s]\n" % ("x" * 128))
    assert list(config.agents) == ["x" * 128]


def test_missing_secret_file(folder):
    assert error(folder, "[tunnels]\nsecrets = ['tunnel-a.key', 'nope.key']\n") == (
        "%s: cannot read secret file %s: No such file or directory"
        % (folder / "tunnels.toml", folder / "nope.key"))


def test_unreadable_secret_file(folder):
    if os.geteuid() == 0:
        # root reads any file: a directory stands in for the unreadable one.
        (folder / "dir.key").mkdir()
        assert error(folder, "[tunnels]\nsecrets = ['dir.key']\n") == (
            "%s: cannot read secret file %s: Is a directory"
            % (folder / "tunnels.toml", folder / "dir.key"))
        return
    write(folder / "locked.key", "secret")
    os.chmod(folder / "locked.key", 0)
    assert error(folder, "[tunnels]\nsecrets = ['locked.key']\n") == (
        "%s: cannot read secret file %s: Permission denied"
        % (folder / "tunnels.toml", folder / "locked.key"))


def test_secret_directory(folder):
    (folder / "dir.key").mkdir()
    assert error(folder, "[tunnels]\nsecrets = ['dir.key']\n") == (
        "%s: cannot read secret file %s: Is a directory"
        % (folder / "tunnels.toml", folder / "dir.key"))


@pytest.mark.parametrize("content", [b"", b" \n\t\r\n"])
def test_empty_secret_file(folder, content):
    write(folder / "empty.key", content, "wb")
    assert error(folder, "[tunnels]\nsecrets = ['empty.key']\n") == (
        "%s: secret file %s is empty" % (folder / "tunnels.toml", folder / "empty.key"))


def test_missing_config_file(tmp_path):
    with pytest.raises(TunnelConfigError) as info:
        load_tunnel_config(str(tmp_path / "none.toml"))
    assert str(info.value) == "%s: cannot read: No such file or directory" % (
        tmp_path / "none.toml")


def test_config_file_not_utf8(folder):
    path = write(folder / "tunnels.toml", b"[tunnels]\npath = '\xff'\n", "wb")
    with pytest.raises(TunnelConfigError) as info:
        load_tunnel_config(path)
    assert str(info.value) == "%s: not UTF-8 text" % path


def test_without_tomllib_or_tomli_the_error_says_what_to_install(folder, monkeypatch):
    monkeypatch.setattr(sys, "version_info", (3, 10, 0))
    monkeypatch.setitem(sys.modules, "tomli", None)     # import tomli: ImportError
    assert error(folder, OURS) == (
        "%s: reading TOML needs the tomli package on Python < 3.11 "
        "(pip install 'websockify[tunnel]')" % (folder / "tunnels.toml"))


def test_tomli_is_used_before_python_3_11(folder, monkeypatch):
    tomllib = pytest.importorskip("tomllib")
    monkeypatch.setattr(sys, "version_info", (3, 10, 0))
    monkeypatch.setitem(sys.modules, "tomli", tomllib)  # the same API under tomli's name
    assert load(folder, OURS).secrets == (b"secret-a", b"secret b")
    assert error(folder, "[tunnels]\npath = \n") == (
        "%s:2: TOML syntax error: Invalid value (column 8)" % (folder / "tunnels.toml"))


# -- the command line ------------------------------------------------------------

def test_tunnel_config_alone_needs_no_target(tmp_path, monkeypatch):
    from websockify import cli
    monkeypatch.chdir(tmp_path)
    config = cli.parse_args(["--tunnel-config", "tunnels.toml", "6080"])
    assert (config.tunnel_config, config.listen_port, config.target_host,
            config.target_port) == (str(tmp_path / "tunnels.toml"), 6080, None, None)
    assert config.target_description == "tunnel agents only (no target)"


def test_tunnel_config_with_a_target_or_a_token_plugin(tmp_path):
    from websockify import cli
    config = cli.parse_args(["--tunnel-config", "t.toml", "6080", "localhost:5900"])
    assert (config.target_host, config.target_port) == ("localhost", 5900)
    assert config.target_description == "localhost:5900"
    config = cli.parse_args(["--tunnel-config", "t.toml", "--token-plugin", "TokenFile",
                             "--token-source", "x", "6080"])
    assert config.target_port is None and config.token_plugin == "TokenFile"


def test_without_tunnel_config_a_target_is_still_required():
    from websockify import cli
    from websockify.errors import UsageError
    with pytest.raises(UsageError) as info:
        cli.parse_args(["6080"])
    assert str(info.value) == "Too few arguments"
    with pytest.raises(UsageError) as info:
        cli.parse_args(["--tunnel-config", "t.toml", "6080", "localhost:5900", "extra"])
    assert str(info.value) == "Too many arguments"


def test_open_registration_and_the_http_face_are_read(folder):
    (folder / "k.key").write_text("s\n")
    config = load(folder, "[tunnels]\nsecrets = ['k.key']\nopen = true\n"
                          "[tunnels.agent.web]\nhttp = true\n[tunnels.agent.tcp]\ntoken = true\n")
    assert config.open is True
    assert (config.agents["web"].http, config.agents["web"].token) == (True, False)
    assert (config.agents["tcp"].http, config.agents["tcp"].token) == (False, True)
    assert load(folder, "[tunnels]\n").open is False
