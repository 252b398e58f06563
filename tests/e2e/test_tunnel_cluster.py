"""Many instances, one Redis: two real servers on loopback sharing a real redis-server.

Instance A and instance B read the same agents (each with its own TCP face
port, as two hosts would use one port each) and the same cluster secret;
an agent connects to one of them, users arrive at either.  Skipped, with
the reason, where redis-server, nginx or redis-py is missing; in CI
(CI=true) that fails instead.
"""

import hashlib
import os
import re
import signal
import socket
import struct
import time

import pytest

from tests.e2e.test_tokens_redis import redis, redis_program, start_redis  # noqa: F401 (fixtures)
from tests.e2e.test_tunnel_server import (LIVENESS, SECRET, eof_within, pattern,
                                          send_and_read_to_eof, tcp_user)
from tests.helpers import (RawWebSocket, children_of, free_port, port_open, read_http_response,
                           require_program, start_nginx, wait_for, websocket_echoes,
                           websockify_argv)
from tests.tunnel_agent import ScriptedAgent, Service, agent_token

CLUSTER_SECRET = b"the instances' shared secret"
TTL = 2
AGENT = "bus02"


class Instance:
    def __init__(self, name, proc, port, node, face):
        self.name = name
        self.proc = proc
        self.port = port
        self.node = node
        self.face = face

    def pids(self):
        return [self.proc.pid] + children_of(self.proc.pid)


class Cluster:
    def __init__(self, processes, tmp_path, redis_program, redis_module, websockify,
                 on_duplicate="replace", http=False, open_registration=False):
        self.processes = processes
        self.tmp_path = tmp_path
        self.redis_program = redis_program
        self.redis_port = free_port()
        self.redis = None
        self.start_redis()
        self.store = redis_module.Redis(port=self.redis_port)
        (tmp_path / "tunnel.key").write_bytes(SECRET + b"\n")
        (tmp_path / "cluster.key").write_bytes(CLUSTER_SECRET + b"\n")
        self.instances = {}
        # Every port chosen before any is bound: free_port alone could repeat one.
        ports = set()
        while len(ports) < 6:
            ports.add(free_port())
        ports = sorted(ports)
        for name in ("a", "b"):
            node, face, listen = ports.pop(), ports.pop(), ports.pop()
            path = tmp_path / ("tunnels-%s.toml" % name)
            path.write_text("\n".join([
                "[tunnels]", 'secrets = ["tunnel.key"]',
                'registry = "redis://127.0.0.1:%d/0"' % self.redis_port,
                'node = "127.0.0.1:%d"' % node, 'cluster_secret = "cluster.key"',
                "registry_ttl = %d" % TTL, "connect_timeout = 2",
                'on_duplicate = "%s"' % on_duplicate,
                "open = %s" % ("true" if open_registration else "false"),
                "[tunnels.agent.%s]" % AGENT, 'listen = "127.0.0.1:%d"' % face, "token = true",
                "http = %s" % ("true" if http else "false"),
            ]) + "\n")
            # Two workers: internal connections also reach the worker not holding the agent.
            proc, port = websockify("--tunnel-config", str(path), "--workers", "2",
                                    "--connect-timeout", "2", "{port}", port=listen,
                                    env=LIVENESS)
            self.instances[name] = Instance(name, proc, port, "127.0.0.1:%d" % node, face)
        self.a, self.b = self.instances["a"], self.instances["b"]

    def start_redis(self):
        self.redis = start_redis(self.processes, self.redis_program, self.redis_port,
                                 self.tmp_path, name="redis")
        wait_for(lambda: port_open(self.redis_port) or self.redis.proc.poll() is not None,
                 what="redis-server")
        assert self.redis.proc.poll() is None, self.redis.log()

    def holder(self, agent_id=AGENT):
        value = self.store.get("websockify:tunnel:" + agent_id)
        return value.decode().split(" ")[0] if value else None

    def connect(self, instance, service, agent_id=AGENT, extra=()):
        mark = len(instance.proc.log())
        agent = ScriptedAgent(instance.port, agent_id, token=agent_token(agent_id, SECRET),
                              service=service.port, extra=extra)
        assert agent.status == 101, (agent.status, agent.body)
        wait_for(lambda: "agent %s connected from" % agent_id in instance.proc.log()[mark:],
                 what="agent connected")
        wait_for(lambda: self.holder(agent_id) == instance.node, what="agent registered")
        return agent

    def real_agent(self, instance, service, agent_id=AGENT):
        """websockify-agent (the real one) connected to ``instance``."""
        from tests.helpers import PYTHON
        token_file = self.tmp_path / ("%s.token" % agent_id)
        token_file.write_text(agent_token(agent_id, SECRET) + "\n")
        proc = self.processes([PYTHON, "-m", "websockify.agent", "--service",
                               "127.0.0.1:%d" % service.port, "--server",
                               "ws://127.0.0.1:%d/tunnel/%s" % (instance.port, agent_id),
                               "--token-file", str(token_file), "--max-retry-delay", "1"],
                              name="agent")
        wait_for(lambda: self.holder(agent_id) == instance.node, what="agent registered")
        return proc


@pytest.fixture
def cluster(processes, tmp_path, redis_program, redis, websockify):
    return Cluster(processes, tmp_path, redis_program, redis, websockify)


@pytest.fixture
def echo_service():
    service = Service()
    yield service
    service.close()


def sha_through(port, size):
    """Send ``size`` bytes through an echo and return (sha256 sent, sha256 received)."""
    import threading
    data = pattern(size)
    received = hashlib.sha256()
    count = [0]
    with tcp_user(port, timeout=30) as user:
        sender = threading.Thread(target=lambda: (user.sendall(data),
                                                  user.shutdown(socket.SHUT_WR)))
        sender.start()
        while True:
            chunk = user.recv(262144)
            if not chunk:
                break
            received.update(chunk)
            count[0] += len(chunk)
        sender.join()
    assert count[0] == size
    return hashlib.sha256(data).hexdigest(), received.hexdigest()


def exact_echo(port, payload):
    with tcp_user(port) as user:
        return send_and_read_to_eof(user, payload)


def bridge_echo(port, payloads=(b"hello", b"x" * 70000)):
    ws = RawWebSocket(port, path="/websockify?token=%s" % AGENT)
    try:
        assert ws.status == 101, ws.buffer
        for payload in payloads:
            ws.send_binary(payload)
            assert ws.recv_data(len(payload)) == payload
        ws.send(0x8, struct.pack("!H", 1000))
        assert ws.expect_close()[0] == 1000
    finally:
        ws.close()


def status_json(port):
    import json
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"GET /tunnel/ HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\n\r\n")
        status, _, body = read_http_response(conn)
        assert status == 200, body
        return json.loads(body)


def tcp_closed_at_once(port):
    """A TCP user that is closed without a byte (agent unreachable)."""
    with tcp_user(port) as user:
        assert eof_within(user, 8) < 8


def test_large_transfers_through_b_with_the_real_agent(cluster, echo_service):
    agent = cluster.real_agent(cluster.a, echo_service)
    for port in (cluster.b.face, cluster.a.face, cluster.b.face):
        sent, received = sha_through(port, 24 * 1024 * 1024 + 7)
        assert sent == received
    ws = RawWebSocket(cluster.b.port, path="/websockify?token=%s" % AGENT)
    try:
        assert ws.status == 101, ws.buffer
        data = pattern(4 * 1024 * 1024 + 1)
        for offset in range(0, len(data), 65536):
            ws.send_binary(data[offset:offset + 65536])
        assert hashlib.sha256(ws.recv_data(len(data))).hexdigest() == \
            hashlib.sha256(data).hexdigest()
    finally:
        ws.close()
    agent.stop()


def test_user_at_b_reaches_the_agent_held_by_a(cluster, echo_service):
    agent = cluster.connect(cluster.a, echo_service)
    try:
        # TCP face: exact bytes (the agent sees the user as if it had arrived at A)
        assert exact_echo(cluster.b.face, b"through instance B\n") == b"through instance B\n"
        assert exact_echo(cluster.b.face, pattern(300000)) == pattern(300000)
        # the agent sees a user as if it had arrived at A
        assert [meta["face"] for _, meta in agent.opened] == ["tcp", "tcp"]
        assert all(re.fullmatch(r"127\.0\.0\.1:\d+", meta["peer"]) for _, meta in agent.opened)
        # the status page of each instance names the holding node
        for instance in (cluster.a, cluster.b):
            document = status_json(instance.port)
            assert document["node"] == instance.node
            assert [(a["id"], a["connected"], a["node"]) for a in document["agents"]] == [
                (AGENT, instance is cluster.a, cluster.a.node)]
        # bridge face at B
        bridge_echo(cluster.b.port)
        assert agent.opened[-1][1]["face"] == "bridge"
        # and at A, directly
        assert exact_echo(cluster.a.face, b"at A") == b"at A"
        bridge_echo(cluster.a.port)
        cluster.a.proc.wait_log(r"-> agent bus02 \(tcp, via node %s\)" % re.escape(cluster.b.node))
    finally:
        agent.close()
    # the agent left: its record goes, users at both are closed / 503
    wait_for(lambda: cluster.holder() is None, what="record removed")
    tcp_closed_at_once(cluster.b.face)
    ws = RawWebSocket(cluster.b.port, path="/?token=%s" % AGENT)
    assert ws.status == 503, ws.buffer
    ws.close()


def test_agent_moving_to_b_keeps_the_same_addresses(cluster, echo_service):
    first = cluster.connect(cluster.a, echo_service)
    assert exact_echo(cluster.b.face, b"one") == b"one"
    first.close()
    wait_for(lambda: cluster.holder() is None, what="A's record removed")
    second = cluster.connect(cluster.b, echo_service)
    try:
        for instance in (cluster.a, cluster.b):
            assert exact_echo(instance.face, b"two %s" % instance.name.encode()) == \
                b"two %s" % instance.name.encode()
            bridge_echo(instance.port)
        assert len(second.opened) == 4
    finally:
        second.close()


def test_two_instances_claiming_an_agent_the_newer_wins(cluster):
    def named(name):
        def handler(conn):
            with conn:
                conn.sendall(name)
        return handler

    one, two = Service(named(b"one")), Service(named(b"two"))
    try:
        old = cluster.connect(cluster.a, one)
        mark = len(cluster.a.proc.log())
        start = time.monotonic()
        new = cluster.connect(cluster.b, two)
        # A finds B's registration at its next refresh and closes its copy
        assert old.closed.wait(TTL + 1), "A kept its stale copy"
        assert time.monotonic() - start < TTL + 1
        assert old.close_code == 1000, old.close_code
        line = cluster.a.proc.wait_log(r"agent bus02 \(.*\): registered at node (\S+) since; "
                                       r"closing the copy held here")
        assert line.group(1) == cluster.b.node
        assert cluster.a.proc.log()[mark:].count("closing the copy held here") == 1
        assert cluster.holder() == cluster.b.node
        for instance in (cluster.a, cluster.b):
            assert exact_echo(instance.face, b"") == b"two"
        new.close()
    finally:
        one.close()
        two.close()


def test_refuse_holds_across_instances(processes, tmp_path, redis_program, redis, websockify,
                                       echo_service):
    cluster = Cluster(processes, tmp_path, redis_program, redis, websockify,
                      on_duplicate="refuse")
    first = cluster.connect(cluster.a, echo_service)
    try:
        second = ScriptedAgent(cluster.b.port, AGENT, token=agent_token(AGENT, SECRET),
                               service=echo_service.port)
        assert second.status == 409, (second.status, second.body)
        assert b"agent bus02 is already connected (at node %s)" % cluster.a.node.encode() \
            in second.body
        second.close()
        cluster.b.proc.wait_log(r"refused .*/tunnel/bus02.*: 409 agent bus02 is already "
                                r"connected \(at node %s\)" % re.escape(cluster.a.node))
        # the first is untouched, and reached from B
        assert cluster.holder() == cluster.a.node
        assert exact_echo(cluster.b.face, b"first") == b"first"
        assert not first.closed.is_set()
    finally:
        first.close()
    # once it left, another copy may come, at either instance
    wait_for(lambda: cluster.holder() is None, what="record removed")
    cluster.connect(cluster.b, echo_service).close()


def test_redis_restarted_mid_traffic(cluster, echo_service):
    agent = cluster.connect(cluster.a, echo_service)
    try:
        # an open stream through B (remote) and one at A (local)
        remote, local = tcp_user(cluster.b.face), tcp_user(cluster.a.face)
        for user in (remote, local):
            user.sendall(b"before")
            assert user.recv(6) == b"before"
        cluster.redis.stop()
        # open streams go on
        for user in (remote, local):
            user.sendall(b"during")
            assert user.recv(6) == b"during"
        # new users: A serves the agent it holds; B cannot find it: 503, TCP closed
        assert exact_echo(cluster.a.face, b"A still") == b"A still"
        bridge_echo(cluster.a.port)
        for _ in range(3):
            ws = RawWebSocket(cluster.b.port, path="/?token=%s" % AGENT)
            assert ws.status == 503, ws.buffer
            assert b"registry unreachable" in ws.buffer
            ws.close()
            tcp_closed_at_once(cluster.b.face)
        # one line per outage and instance, not per request
        for instance in (cluster.a, cluster.b):
            instance.proc.wait_log(r"tunnel registry redis://\S+ unreachable")
        time.sleep(TTL)     # refreshes keep failing meanwhile: still one line
        for instance in (cluster.a, cluster.b):
            assert len(re.findall(r"tunnel registry redis://\S+ unreachable",
                                  instance.proc.log())) == 1, instance.proc.log()
        # Redis comes back empty: A registers its agent again
        cluster.start_redis()
        wait_for(lambda: cluster.holder() == cluster.a.node, timeout=10,
                 what="agent registered again")
        for instance in (cluster.a, cluster.b):
            instance.proc.wait_log(r"tunnel registry redis://\S+ reachable again")
        assert exact_echo(cluster.b.face, b"after") == b"after"
        bridge_echo(cluster.b.port)
        for user in (remote, local):
            user.sendall(b"still open")
            assert user.recv(10) == b"still open"
            user.close()
    finally:
        agent.close()


def test_internal_link_cut_is_a_close_or_503_never_a_hang(cluster, echo_service):
    agent = cluster.connect(cluster.a, echo_service)
    remote = tcp_user(cluster.b.face)
    remote.sendall(b"ping")
    assert remote.recv(4) == b"ping"
    # A stops answering (its processes frozen): new users at B get their answer
    # within the connect timeout, the open stream waits for A
    frozen = cluster.a.pids()
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        ws = RawWebSocket(cluster.b.port, path="/?token=%s" % AGENT, timeout=15)
        assert ws.status == 503, ws.buffer
        assert b"did not open the stream within" in ws.buffer
        ws.close()
        assert time.monotonic() - start < 5
        tcp_closed_at_once(cluster.b.face)
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    remote.close()
    agent.close()
    # (frozen past the liveness deadline, A dropped the agent: it comes again)
    wait_for(lambda: cluster.holder() is None, what="A's record removed")
    agent = cluster.connect(cluster.a, echo_service)
    remote = tcp_user(cluster.b.face)
    remote.sendall(b"ping")
    assert remote.recv(4) == b"ping"
    # A killed outright: the open stream through B is closed, new users get 503
    for pid in cluster.a.pids():
        os.kill(pid, signal.SIGKILL)
    assert eof_within(remote, 5) < 5
    remote.close()
    ws = RawWebSocket(cluster.b.port, path="/?token=%s" % AGENT)
    assert ws.status == 503, ws.buffer
    assert b"cannot be reached" in ws.buffer
    ws.close()
    tcp_closed_at_once(cluster.b.face)
    agent.close()


def test_forged_internal_link_requests_are_refused(cluster, echo_service):
    import hmac as hmac_module
    agent = cluster.connect(cluster.a, echo_service)
    try:
        host, port = cluster.a.node.split(":")
        for secret in (b"a guess", None):
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                challenge = b""
                while len(challenge) < 40:
                    challenge += sock.recv(40 - len(challenge))
                assert challenge[:8] == b"WSKYNOD1"
                raw = b'{"agent":"bus02","face":"tcp","peer":"1.2.3.4:5"}'
                if secret is None:
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    expected = 400
                else:
                    nonce = bytes(16)
                    mac = hmac_module.new(secret, b"\0".join([b"open", challenge[8:], nonce, raw]),
                                          hashlib.sha256).digest()
                    sock.sendall(nonce + struct.pack("!I", len(raw)) + raw + mac)
                    expected = 401
                answer = b""
                while True:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
                assert struct.unpack("!H", answer[:2])[0] == expected, answer
        log = cluster.a.proc.log()
        assert len(re.findall(r"internal link from 127\.0\.0\.1:\d+ refused: 401 internal link: "
                              r"hello not signed with the cluster secret", log)) == 1, log
        assert len(re.findall(r"internal link from 127\.0\.0\.1:\d+ refused: 400", log)) == 1
        assert len(agent.opened) == 0
        # the agent is untouched
        assert exact_echo(cluster.b.face, b"fine") == b"fine"
    finally:
        agent.close()


NGINX_HTTP = """
  upstream rendezvous {{
    server 127.0.0.1:{a};
    server 127.0.0.1:{b};
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://rendezvous;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection "Upgrade";
      proxy_set_header Host $host;
      proxy_buffering off;
    }}
  }}
"""


def test_nginx_in_front_of_two_instances(cluster, echo_service, processes, tmp_path):
    nport = free_port()
    start_nginx(processes, require_program("nginx", "nginx"), tmp_path,
                NGINX_HTTP.format(port=nport, a=cluster.a.port, b=cluster.b.port), nport)
    # the agent too comes through nginx, to whichever instance nginx picks
    holders = []
    for round_ in range(2):
        mark = {name: len(i.proc.log()) for name, i in cluster.instances.items()}
        agent = ScriptedAgent(nport, AGENT, token=agent_token(AGENT, SECRET),
                              service=echo_service.port)
        assert agent.status == 101, (agent.status, agent.body)
        wait_for(lambda: cluster.holder() is not None, what="agent registered")
        holders.append(cluster.holder())
        # round robin: these sessions reach both instances
        for index in range(4):
            bridge_echo(nport, payloads=(b"round %d session %d" % (round_, index),))
        # every instance carried some of them, wherever the agent is
        for name, instance in cluster.instances.items():
            assert re.search(r"/websockify\?token=<redacted> -> agent bus02:None: closed \(1000\)",
                             instance.proc.log()[mark[name]:]), name
        agent.close()
        wait_for(lambda: cluster.holder() is None, what="record removed")
    # five requests a round through round robin: the agent was on each instance once
    assert sorted(holders) == sorted([cluster.a.node, cluster.b.node])


def test_the_registry_scripts_against_redis(processes, tmp_path, redis_program, redis):
    """tunnel/cluster.py's records, called directly: newest wins, refresh, compare-and-delete."""
    from websockify.tunnel.cluster import ClusterRegistry
    from websockify.tunnel.registry import Registry
    port = free_port()
    start_redis(processes, redis_program, port, tmp_path)
    wait_for(lambda: port_open(port), what="redis-server")
    url = "redis://127.0.0.1:%d/0" % port
    lost = []
    a = ClusterRegistry(url, "10.0.0.1:7001", 10, Registry(1),
                        lambda *args: lost.append(("a",) + args))
    b = ClusterRegistry(url, "10.0.0.2:7001", 10, Registry(1),
                        lambda *args: lost.append(("b",) + args))
    store = redis.Redis(port=port)
    try:
        assert a.register("bus", "h1", refuse=False) == (True, "")
        assert store.get("websockify:tunnel:bus") == b"10.0.0.1:7001 h1"
        assert 9000 < store.pttl("websockify:tunnel:bus") <= 10000
        assert b.lookup("bus") == "10.0.0.1:7001"
        # refuse: another node's record stays
        assert b.register("bus", "h2", refuse=True) == (False, "10.0.0.1:7001")
        assert "bus" not in b.held
        # replace: the newest wins, and says whom it replaced
        assert b.register("bus", "h2", refuse=False) == (True, "10.0.0.1:7001")
        a.refresh_all()
        assert lost == [("a", "bus", "h1", "10.0.0.2:7001")]
        assert "bus" not in a.held
        # the stale holder's release leaves the newer record alone
        a.release("bus", "h1")
        assert store.get("websockify:tunnel:bus") == b"10.0.0.2:7001 h2"
        # a record gone (Redis restarted empty) is written again by its holder
        store.flushall()
        b.refresh_all()
        assert store.get("websockify:tunnel:bus") == b"10.0.0.2:7001 h2"
        b.release("bus", "h2")
        assert store.get("websockify:tunnel:bus") is None
        assert a.lookup("bus") is None
    finally:
        a.close()
        b.close()


# -- the HTTP face across instances ------------------------------------------------------

HTTP_AGENT_SERVICE = ("X-Websockify-Service: http",)    # what an agent run with --http sends


@pytest.fixture
def http_cluster(processes, tmp_path, redis_program, redis, websockify):
    """The cluster with ``http = true`` in the agent's entry (its HTTP face at /t/bus02/)."""
    return Cluster(processes, tmp_path, redis_program, redis, websockify, http=True)


@pytest.fixture
def http_service():
    from tests.http_service import HttpService
    service = HttpService()
    yield service
    service.close()


def http_request(port, method, path, body=None, headers=(), timeout=30):
    """One request on a connection of its own: (status, headers lower-cased, body)."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers))
        response = conn.getresponse()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                response.read())
    finally:
        conn.close()


def echoed(port, path, body=None, headers=()):
    """The request as the service behind the agent saw it (its /echo answer)."""
    import json
    status, _, answer = http_request(port, "POST" if body is not None else "GET", path,
                                     body=body, headers=headers)
    assert status == 200, answer
    return json.loads(answer)


def test_http_face_at_b_reaches_the_agent_held_by_a(http_cluster, http_service):
    cluster = http_cluster
    agent = cluster.real_agent(cluster.a, http_service)
    size = 8 * 1024 * 1024
    for instance in (cluster.b, cluster.a):
        status, headers, body = http_request(instance.port, "GET", "/t/bus02/bytes/%d" % size)
        assert status == 200 and headers["content-length"] == str(size)
        assert len(body) == size and body == pattern(size)
    status, headers, body = http_request(cluster.b.port, "GET", "/t/bus02/chunked/300001")
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    assert body == pattern(300001)
    # The service sees the path without the prefix and the forwarded headers,
    # the viewer's own copies replaced (127.0.0.1 is no --trusted-proxy).
    seen = echoed(cluster.b.port, "/t/bus02/echo/deeper?q=1&r=%2F",
                  headers=[("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-Host", "forged"),
                           ("x-websocktunnel-original-path", "/forged")])
    assert seen["method"] == "GET" and seen["path"] == "/echo/deeper?q=1&r=%2F"
    forwarded = {name: value for name, value in seen["headers"].items()
                 if name.lower().startswith(("x-forwarded-", "x-websocktunnel-"))}
    assert forwarded == {"X-Forwarded-For": "127.0.0.1", "X-Forwarded-Proto": "http",
                         "X-Forwarded-Host": "127.0.0.1:%d" % cluster.b.port,
                         "x-websocktunnel-original-path": "/t/bus02/echo/deeper?q=1&r=%2F"}
    # websockify-agent without --http: one request per stream, the service told so
    assert seen["headers"]["Connection"] == "close"
    body = pattern(300007)
    seen = echoed(cluster.b.port, "/t/bus02/echo", body=body)
    assert seen["method"] == "POST" and seen["path"] == "/echo"
    assert seen["body"].encode("latin-1") == body
    assert seen["headers"]["Content-Length"] == str(len(body))
    # each of B's viewers went over the internal link to A
    log = cluster.b.proc.log()
    assert len(re.findall(r"127\.0\.0\.1:\d+ -> agent bus02 \(http\): viewer connection closed "
                          r"after 1 request\(s\)", log)) == 4, log
    assert len(re.findall(r"-> agent bus02 \(http, via node %s\)" % re.escape(cluster.b.node),
                          cluster.a.proc.log())) == 4, cluster.a.proc.log()
    agent.stop()


def test_a_websocket_through_b_to_a_websocket_service_behind_the_agent_at_a(
        http_cluster, processes):
    """A real ``websockify --echo`` as the agent's service; the viewer's upgrade at B."""
    echo_port = free_port()
    processes(websockify_argv("--echo", "127.0.0.1:%d" % echo_port), name="echo")
    wait_for(lambda: port_open(echo_port), what="websockify --echo")
    from types import SimpleNamespace
    agent = http_cluster.real_agent(http_cluster.a, SimpleNamespace(port=echo_port))
    for instance in (http_cluster.b, http_cluster.a):
        websocket_echoes(instance.port, "/t/bus02/ws?x=1", (5, 70000, 2 * 1024 * 1024 + 1))
        instance.proc.wait_log(r"127\.0\.0\.1:\d+ -> agent bus02 \(http\): viewer connection "
                               r"closed after 1 request\(s\)")
    agent.stop()


def test_http_face_through_nginx_in_front_of_both_instances(http_cluster, http_service,
                                                            processes, tmp_path):
    cluster = http_cluster
    nport = free_port()
    start_nginx(processes, require_program("nginx", "nginx"), tmp_path,
                NGINX_HTTP.format(port=nport, a=cluster.a.port, b=cluster.b.port), nport)
    agent = cluster.real_agent(cluster.a, http_service)
    for index in range(10):
        body = pattern(1000 + index)
        seen = echoed(nport, "/t/bus02/echo/%d" % index, body=body)
        assert (seen["path"], seen["body"].encode("latin-1")) == ("/echo/%d" % index, body)
        # nginx is the viewer's peer; its Host ($host) is what the instance saw
        assert (seen["headers"]["X-Forwarded-For"], seen["headers"]["X-Forwarded-Host"]) == \
            ("127.0.0.1", "127.0.0.1")
        status, _, data = http_request(nport, "GET", "/t/bus02/bytes/%d" % (65536 * index + 1))
        assert status == 200 and data == pattern(65536 * index + 1)
    # round robin: each instance answered half of the 20 requests
    for instance in (cluster.a, cluster.b):
        wait_for(lambda: len(re.findall(r"-> agent bus02 \(http\): viewer connection closed",
                                        instance.proc.log())) == 10,
                 what="ten viewers at %s" % instance.name)
    assert len(http_service.requests) == 20
    agent.stop()


def test_http_viewers_at_b_with_the_internal_link_cut_get_503_never_a_hang(http_cluster,
                                                                          http_service):
    cluster = http_cluster
    agent = cluster.connect(cluster.a, http_service)
    assert http_request(cluster.b.port, "GET", "/t/bus02/")[2] == b"hello"
    # A frozen: a new viewer at B has its 503 within the connect timeout (2 s)
    frozen = cluster.a.pids()
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        status, headers, body = http_request(cluster.b.port, "GET", "/t/bus02/", timeout=15)
        assert time.monotonic() - start < 5
        assert (status, headers["retry-after"]) == (503, "5")
        assert b"did not open the stream within" in body
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    agent.close()
    wait_for(lambda: cluster.holder() is None, what="A's record removed")
    agent = cluster.connect(cluster.a, http_service)
    # A killed outright mid-download: B's viewer is closed short, new viewers get 503
    size = 64 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", cluster.b.port), timeout=10) as viewer:
        viewer.sendall(b"GET /t/bus02/bytes/%d HTTP/1.1\r\nHost: x\r\n\r\n" % size)
        head = b""
        while b"\r\n\r\n" not in head:
            head += viewer.recv(65536)
        head, _, body = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: %d" % size in head
        for pid in cluster.a.pids():
            os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        received = len(body)
        try:
            while True:
                chunk = viewer.recv(262144)
                if not chunk:
                    break
                received += len(chunk)
        except ConnectionResetError:
            pass
        assert time.monotonic() - start < 5
        assert received < size
    status, headers, body = http_request(cluster.b.port, "GET", "/t/bus02/")
    assert (status, headers["retry-after"]) == (503, "5")
    assert b"cannot be reached" in body
    agent.close()


def test_http_face_agent_absent_is_503_and_an_unknown_id_404(http_cluster):
    for instance in (http_cluster.a, http_cluster.b):
        status, headers, body = http_request(instance.port, "GET", "/t/bus02/page")
        assert (status, headers["retry-after"]) == (503, "5"), body
        assert b"agent bus02 is not connected" in body
        status, headers, body = http_request(instance.port, "GET", "/t/nobody/page")
        assert status == 404 and "retry-after" not in headers, body
        assert b"no agent 'nobody' with an HTTP face here" in body
        # one line each
        instance.proc.wait_log(r"refused 'GET /t/nobody/page HTTP/1\.1': 404 ")
        log = instance.proc.log()
        assert len(re.findall(r"127\.0\.0\.1:\d+: refused 'GET /t/bus02/page HTTP/1\.1': 503 "
                              r"agent bus02 is not connected$", log, re.M)) == 1, log
        assert len(re.findall(r"127\.0\.0\.1:\d+: refused 'GET /t/nobody/page HTTP/1\.1': 404 "
                              r"no agent 'nobody' with an HTTP face here$", log, re.M)) == 1, log


def test_http_keep_alive_through_b_for_an_http_agent(http_cluster, http_service):
    import http.client
    cluster = http_cluster
    agent = cluster.connect(cluster.a, http_service, extra=HTTP_AGENT_SERVICE)
    conn = http.client.HTTPConnection("127.0.0.1", cluster.b.port, timeout=30)
    try:
        answers = []
        for method, path, body in (("GET", "/t/bus02/echo/1", None),
                                   ("GET", "/t/bus02/bytes/100000", None),
                                   ("POST", "/t/bus02/echo/3", pattern(70000))):
            conn.request(method, path, body=body)
            response = conn.getresponse()
            answers.append((response.status, response.read()))
            assert not response.will_close
        assert [status for status, _ in answers] == [200, 200, 200]
        assert answers[1][1] == pattern(100000)
    finally:
        conn.close()
    assert [(r["method"], r["path"]) for r in http_service.requests] == [
        ("GET", "/echo/1"), ("GET", "/bytes/100000"), ("POST", "/echo/3")]
    assert http_service.requests[2]["body"] == pattern(70000)
    assert all("Connection" not in r["headers"] for r in http_service.requests)
    # one viewer connection: one stream, one connection to the service
    assert len(http_service.connections) == 1
    assert [meta["face"] for _, meta in agent.opened] == ["http"]
    cluster.b.proc.wait_log(r"127\.0\.0\.1:\d+ -> agent bus02 \(http\): viewer connection "
                            r"closed after 3 request\(s\)")
    agent.close()


def test_an_openly_registered_agent_at_a_serves_viewers_at_b(processes, tmp_path,
                                                             redis_program, redis, websockify,
                                                             http_service):
    cluster = Cluster(processes, tmp_path, redis_program, redis, websockify,
                      open_registration=True)
    agent = cluster.connect(cluster.a, http_service, agent_id="fleet-9")
    cluster.a.proc.wait_log(r"agent fleet-9: registered openly")
    for instance in (cluster.b, cluster.a):
        seen = echoed(instance.port, "/t/fleet-9/echo/at-%s" % instance.name)
        assert (seen["path"], seen["headers"]["x-websocktunnel-original-path"]) == (
            "/echo/at-%s" % instance.name, "/t/fleet-9/echo/at-%s" % instance.name)
    assert [meta["face"] for _, meta in agent.opened] == ["http", "http"]
    # an ID no instance holds: 404 at B (any valid ID may be held elsewhere, so asked)
    status, _, body = http_request(cluster.b.port, "GET", "/t/fleet-10/")
    assert (status, body) == (404, b"no agent 'fleet-10' is registered\n")
    agent.close()
    wait_for(lambda: cluster.holder("fleet-9") is None, what="fleet-9's record removed")
    # where it registered, its open entry stays: 503 with Retry-After
    status, headers, body = http_request(cluster.a.port, "GET", "/t/fleet-9/")
    assert (status, headers["retry-after"], body) == (503, "5",
                                                       b"agent fleet-9 is not connected\n")
