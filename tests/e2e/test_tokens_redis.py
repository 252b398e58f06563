"""TokenRedis against a real redis-server, and the seed blog's deployment done
with two websockify instances sharing that Redis behind a real nginx.

Skipped, with the reason, where redis-server, nginx or redis-py is missing;
in CI (CI=true) that fails instead: ``.ci/run`` installs the servers and the
test extra installs redis-py.
"""

import json
import socket
import urllib.request

import pytest

from tests.helpers import (free_port, handshake_request, port_open, read_http_response,
                           require_module, require_program, start_nginx, wait_for)
from tests.helpers import echo_through
from tests.e2e.test_tokens import EchoServer, answer, assert_clean, refusal_lines
from websockify.plugins import tokens as tp


@pytest.fixture(scope="module")
def redis():
    return require_module("redis", "pip install 'websockify[redis]'")


@pytest.fixture(scope="module")
def redis_program():
    return require_program("redis-server", "redis-server")


@pytest.fixture(scope="module")
def nginx_program():
    # Debian installs it as /usr/sbin/nginx, often not on a non-root PATH:
    # require_program looks in the sbin folders too.
    return require_program("nginx", "nginx")


@pytest.fixture
def echo4():
    server = EchoServer()
    yield server
    server.close()


def start_redis(processes, program, port, directory, name="redis"):
    return processes([program, "--port", str(port), "--bind", "127.0.0.1",
                      "--save", "", "--appendonly", "no", "--dir", str(directory),
                      "--daemonize", "no"], name=name)


@pytest.fixture
def redis_server(processes, tmp_path, redis_program):
    """A redis-server on a loopback port; yields (Process, port)."""
    port = free_port()
    proc = start_redis(processes, redis_program, port, tmp_path)
    wait_for(lambda: port_open(port) or proc.proc.poll() is not None,
             what="redis-server on port %d" % port)
    assert proc.proc.poll() is None, proc.log()
    return proc, port


def test_token_redis_values(websockify, echo4, redis_server, redis):
    _, rport = redis_server
    store = redis.Redis(port=rport)
    store.set("plain", "127.0.0.1:%d" % echo4.port)
    store.set("json", json.dumps({"host": "127.0.0.1:%d" % echo4.port}))
    store.set("json2", json.dumps({"host": "127.0.0.1", "port": echo4.port}))
    store.set("garbage", "neither json nor a target")
    store.set("badjson", "{broken")
    store.set("ns:inns", "127.0.0.1:%d" % echo4.port)
    store.set("remote", "remote_host:remote_port")
    proc, port = websockify("--workers", "1", "--token-plugin", "TokenRedis",
                            "--token-source", "127.0.0.1:%d" % rport, "{port}")
    for token in ("plain", "json", "json2"):
        echo_through(port, "/?token=" + token)
    assert answer(port, "/?token=missing")[0] == 404
    for token in ("garbage", "badjson"):
        status, body = answer(port, "/?token=" + token)
        assert status == 502 and b"neither JSON nor host:port" in body
    # held as it is by lookup(); the server cannot use the port
    status, body = answer(port, "/?token=remote")
    assert status == 502 and b"bad port 'remote_port'" in body
    # a token written while the server runs works at once
    store.set("later", "127.0.0.1:%d" % echo4.port)
    echo_through(port, "/?token=later")
    assert_clean(proc)
    # the namespace field, with the empty port and db fields
    proc2, port2 = websockify("--workers", "1", "--token-plugin", "TokenRedis",
                              "--token-source", "127.0.0.1:%d:::ns" % rport, "{port}")
    echo_through(port2, "/?token=inns")
    assert answer(port2, "/?token=plain")[0] == 404


def test_redis_down_is_503_and_recovers(websockify, echo4, redis_server, processes, tmp_path,
                                        redis, redis_program):
    rproc, rport = redis_server
    redis.Redis(port=rport).set("t", "127.0.0.1:%d" % echo4.port)
    proc, port = websockify("--workers", "1", "--token-plugin", "TokenRedis",
                            "--token-source", "127.0.0.1:%d" % rport, "{port}")
    echo_through(port, "/?token=t")
    rproc.stop()
    for _ in range(3):
        status, body = answer(port, "/?token=t")
        assert status == 503 and b"redis" in body
    wait_for(lambda: len(refusal_lines(proc, 503)) == 3, what="one line per 503")
    # Redis comes back: the pool reconnects
    start_redis(processes, redis_program, rport, tmp_path, name="redis2")
    wait_for(lambda: port_open(rport), what="redis again")
    redis.Redis(port=rport).set("t", "127.0.0.1:%d" % echo4.port)
    echo_through(port, "/?token=t")
    assert_clean(proc)


def test_token_redis_lookup_gives_013s_answers(redis, redis_server):
    """The plugin called directly, as 0.13's own tests call it, against a real Redis."""
    _, rport = redis_server
    store = redis.Redis(port=rport)
    values = {
        "plain": ("remote_host:remote_port", ["remote_host", "remote_port"]),
        "spaces": (" remote_host:remote_port ", ["remote_host", "remote_port"]),
        "json": ('{"host": "remote_host:remote_port"}', ["remote_host", "remote_port"]),
        "json_spaces": (' {"host": "remote_host:remote_port"} ', ["remote_host", "remote_port"]),
        "v6": ("[::1]:5900", ["[::1]", "5900"]),
        "unix": ("unix_socket:/run/x.sock", ["unix_socket", "/run/x.sock"]),
        # ours beside 0.13's: host and port apart
        "json_port": ('{"host": "127.0.0.1", "port": 5900}', ["127.0.0.1", 5900]),
        # 0.13: None for these
        "not_json": ('{"host": "remote_host:remote_port"   ', None),
        "no_host": ('{"target": "h:1"}', None),
        "no_port": ('{"host": "h"}', None),
        "garbage": ("neither json nor a target", None),
    }
    for key, (value, _) in values.items():
        store.set(key, value)
        store.set("ns1:ns2:" + key, value)
    plugin = tp.TokenRedis("127.0.0.1:%d" % rport)
    plugin.check()
    for key, (_, expected) in values.items():
        assert plugin.lookup(key) == expected, key
    assert plugin.lookup("missing") is None
    for key in ("not_json", "no_host", "no_port", "garbage"):
        with pytest.raises(tp.BadTarget):
            plugin.resolve(key)
    nested = tp.TokenRedis('127.0.0.1:%d:::"ns1:ns2"' % rport)
    assert nested.lookup("plain") == ["remote_host", "remote_port"]


def test_token_redis_down_lets_redis_error_through(redis, redis_server):
    rproc, rport = redis_server
    plugin = tp.TokenRedis("127.0.0.1:%d" % rport)
    rproc.stop()
    with pytest.raises(redis.exceptions.ConnectionError):      # as 0.13
        plugin.lookup("t")
    with pytest.raises(tp.BackendUnavailable):
        plugin.resolve("t")


NGINX_HTTP = """
  upstream websockify {{
    server 127.0.0.1:{ws1};
    server 127.0.0.1:{ws2};
  }}
  server {{
    listen 127.0.0.1:{port};
    # the seed blog's location blocks, with the upstream in place of one instance
    location /novnc/ {{
      proxy_pass http://websockify/;
    }}
    location /novnc/websockify {{
      proxy_pass http://websockify/;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection "Upgrade";
      proxy_set_header Host $host;
      proxy_read_timeout 600s;
      proxy_buffering off;
    }}
  }}
"""


def test_two_instances_share_redis_behind_nginx(websockify, echo4, redis_server, processes,
                                                tmp_path, redis, nginx_program):
    _, rport = redis_server
    web = tmp_path / "novnc"
    web.mkdir()
    (web / "vnc.html").write_text("<html>noVNC stand-in</html>\n")
    instances = [websockify("--workers", "2", "--web", str(web), "--token-plugin",
                            "TokenRedis", "--token-source", "127.0.0.1:%d" % rport, "{port}")
                 for _ in range(2)]
    nport = free_port()
    start_nginx(processes, nginx_program, tmp_path,
                NGINX_HTTP.format(port=nport, ws1=instances[0][1], ws2=instances[1][1]), nport)

    # the token is written to Redis after both instances started
    store = redis.Redis(port=rport)
    store.set("U6F7msdQ", json.dumps({"host": "127.0.0.1:%d" % echo4.port}))

    # the page through nginx, from either instance
    with urllib.request.urlopen("http://127.0.0.1:%d/novnc/vnc.html" % nport, timeout=10) as r:
        assert r.status == 200 and b"noVNC" in r.read()
    # round robin: consecutive sessions through nginx reach both instances
    for i in range(4):
        echo_through(nport, "/novnc/websockify?token=U6F7msdQ", payload=b"session %d" % i)
    for proc, _ in instances:
        # (logs show the token redacted: tokens are credentials)
        proc.wait_log(r"/\?token=<redacted> -> 127\.0\.0\.1:%d: closed" % echo4.port)
    # and directly, the same token on each instance
    for _, port in instances:
        echo_through(port, "/?token=U6F7msdQ")
    # an unknown token: nginx passes websockify's 404 on, before any upgrade
    sock = socket.create_connection(("127.0.0.1", nport), timeout=10)
    sock.sendall(handshake_request("/novnc/websockify?token=nobody", host="127.0.0.1"))
    status, _, _ = read_http_response(sock)
    sock.close()
    assert status == 404
    # a token removed from Redis stops working on both
    store.delete("U6F7msdQ")
    for _, port in instances:
        assert answer(port, "/?token=U6F7msdQ")[0] == 404
    for proc, _ in instances:
        assert_clean(proc)
