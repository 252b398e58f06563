"""websockify-agent against the real server: both as processes on loopback.

The server is ``websockify --tunnel-config`` (two workers, so users reach an
agent held by the other worker too); the agent is the real
``websockify-agent``; the services are TCP servers in this process; users
are raw sockets (the TCP face) and a raw WebSocket (the bridge face).
"""

import hashlib
import json
import re
import socket
import subprocess
import threading
import time

import pytest

from tests.helpers import (PYTHON, RawWebSocket, SharedProcess, free_port, pattern, port_open,
                           start_nginx, wait_for)
from tests.tunnel_agent import Service, agent_token
from websockify.config import OPTIONS

# The server's --tunnel-config and the rendezvous come from two branches.
pytestmark = pytest.mark.skipif(
    not any("--tunnel-config" in opt.flags for opt in OPTIONS),
    reason="this tree's server has no --tunnel-config yet")

SECRET = b"agent tests' tunnel secret"
AGENT = [PYTHON, "-m", "websockify.agent"]
LIVENESS = {"WEBSOCKIFY_TUNNEL_PING": "0.3", "WEBSOCKIFY_TUNNEL_DEAD": "1.0"}
def write_config(directory, agents):
    (directory / "tunnel.key").write_bytes(SECRET + b"\n")
    lines = ["[tunnels]", 'path = "/tunnel/"', 'secrets = ["tunnel.key"]']
    for agent_id, port in agents.items():
        lines += ["[tunnels.agent.%s]" % agent_id, 'listen = "127.0.0.1:%d"' % port,
                  "token = true"]
    path = directory / "tunnels.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


IDS = ("tcp", "bridge", "refusing", "expired", "stdin", "bulk", "restart", "twice", "novnc", "many")


class Rendezvous:
    def __init__(self, proc, port, faces, directory):
        self.proc = proc
        self.port = port
        self.faces = faces
        self.directory = directory

    def url(self, agent_id, scheme="ws"):
        return "%s://127.0.0.1:%d/tunnel/%s" % (scheme, self.port, agent_id)

    def token_file(self, agent_id, lifetime=3600.0, **claims):
        path = self.directory / ("%s-%d.token" % (agent_id, time.monotonic_ns()))
        path.write_text(agent_token(agent_id, SECRET, lifetime, **claims) + "\n")
        return str(path)


@pytest.fixture(scope="module")
def rendezvous(module_websockify, tmp_path_factory):
    directory = tmp_path_factory.mktemp("rendezvous")
    faces = {agent_id: free_port() for agent_id in IDS}
    path = write_config(directory, faces)
    proc, port = module_websockify("--tunnel-config", path, "--workers", "2",
                                   "--connect-timeout", "2", "{port}", env=LIVENESS)
    return Rendezvous(SharedProcess(proc), port, faces, directory)


@pytest.fixture
def server(rendezvous):
    rendezvous.proc.mark()
    return rendezvous


@pytest.fixture
def echo():
    service = Service()
    yield service
    service.close()


def start_agent(processes, server_url, service_port, *args, **kwargs):
    argv = AGENT + ["--service", "127.0.0.1:%d" % service_port, "--server", server_url,
                    "--max-retry-delay", "1"] + [str(a) for a in args]
    return processes(argv, name="agent", **kwargs)


def connected(server, agent, agent_id, count=1):
    wait_for(lambda: len(re.findall(r"agent %s connected from" % agent_id,
                                    server.proc.log())) >= count,
             what="agent %s connected (%d)" % (agent_id, count))
    agent.wait_log(r"tunnel up")


def transfer(port, payload, timeout=60.0):
    """Send ``payload`` through the TCP face to an echo service; returns what came back."""
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as user:
        def send():
            user.sendall(payload)
            user.shutdown(socket.SHUT_WR)
        sender = threading.Thread(target=send)
        sender.start()
        while True:
            chunk = user.recv(262144)
            if not chunk:
                break
            received += chunk
        sender.join()
    return bytes(received)


def test_tcp_face_through_the_agent_exact_bytes_and_half_close(processes, server, echo):
    agent = start_agent(processes, server.url("tcp"), echo.port,
                        "--token-file", server.token_file("tcp"))
    connected(server, agent, "tcp")
    payload = pattern(3 * 1024 * 1024 + 5)
    # Several users, one after another: each is a stream of the one tunnel
    # (with two workers, some are handed over to the agent's worker).
    for _ in range(4):
        assert transfer(server.faces["tcp"], payload) == payload
    assert echo.accepted == 4
    assert agent.log().count("tunnel up") == 1


def test_sixty_four_users_at_once_through_one_agent(processes, server, echo):
    agent = start_agent(processes, server.url("many"), echo.port,
                        "--token-file", server.token_file("many"))
    connected(server, agent, "many")
    # 64: the server's limit of unanswered opens per agent (more at once may
    # be refused before the agent answers, by design).
    payloads = [pattern(300000 + 997 * n)[n:] for n in range(64)]
    results = [None] * len(payloads)

    def user(index):
        try:
            results[index] = transfer(server.faces["many"], payloads[index])
        except OSError as exc:
            results[index] = exc
    threads = [threading.Thread(target=user, args=(n,)) for n in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    wrong = [(n, len(got) if isinstance(got, bytes) else got, len(sent))
             for n, (got, sent) in enumerate(zip(results, payloads)) if got != sent]
    assert not wrong
    assert echo.accepted == len(payloads)


def test_bridge_face_session_through_the_agent(processes, server, echo):
    agent = start_agent(processes, server.url("bridge"), echo.port,
                        "--token-file", server.token_file("bridge"))
    connected(server, agent, "bridge")
    ws = RawWebSocket(server.port, path="/websockify?token=bridge")
    try:
        assert ws.status == 101, ws.buffer
        payload = pattern(300000)
        ws.send_binary(payload)
        assert ws.recv_data(len(payload)) == payload
    finally:
        ws.close()


def _rfb_like(conn):
    """A VNC-shaped service: version exchange, then a 'framebuffer' for the client."""
    with conn:
        conn.sendall(b"RFB 003.008\n")
        got = b""
        while len(got) < 12:
            got += conn.recv(12 - len(got))
        assert got == b"RFB 003.008\n"
        conn.sendall(b"\x01\x01" + pattern(1 << 20))
        conn.recv(1)


def test_a_novnc_style_session_through_the_agent(processes, server):
    service = Service(_rfb_like)
    try:
        agent = start_agent(processes, server.url("novnc"), service.port,
                            "--token-file", server.token_file("novnc"))
        connected(server, agent, "novnc")
        # noVNC's path form: websockify?token=..., subprotocol binary.
        ws = RawWebSocket(server.port, path="/websockify?token=novnc", protocols="binary")
        try:
            assert ws.status == 101, ws.buffer
            assert ws.headers.get("sec-websocket-protocol") == "binary"
            assert ws.recv_data(12) == b"RFB 003.008\n"
            ws.send_binary(b"RFB 003.008\n")
            assert ws.recv_data(2 + (1 << 20)) == b"\x01\x01" + pattern(1 << 20)
        finally:
            ws.close()
    finally:
        service.close()


def test_a_refusing_service_is_a_502_on_the_bridge(processes, server):
    agent = start_agent(processes, server.url("refusing"), free_port(),
                        "--token-file", server.token_file("refusing"))
    connected(server, agent, "refusing")
    ws = RawWebSocket(server.port, path="/websockify?token=refusing")
    try:
        assert ws.status == 502
    finally:
        ws.close()
    agent.wait_log(r"stream \d+ for [^:]+:\d+: service: Connection refused")


def test_an_expired_token_is_refused_with_the_servers_reason(processes, server, echo):
    agent = start_agent(processes, server.url("expired"), echo.port,
                        "--token-file", server.token_file("expired", lifetime=-120))
    line = agent.wait_log(r"the server refused the agent: 401 Unauthorized: ([^\n]+); "
                          r"retrying in 1\.0 s")
    assert "expired" in line.group(1), line.group(0)
    # Retried at the cap: a second refusal.
    wait_for(lambda: agent.log().count("the server refused the agent") >= 2,
             what="second attempt")


def test_an_id_not_in_the_config_is_refused_403(processes, server, echo):
    agent = start_agent(processes, server.url("nobody"), echo.port,
                        "--token-file", server.token_file("nobody"))
    agent.wait_log(r"the server refused the agent: 403 Forbidden[^\n]*; retrying in 1\.0 s")


def test_a_second_agent_for_the_id_replaces_the_first_which_waits(processes, server, echo):
    token = server.token_file("twice")
    first = start_agent(processes, server.url("twice"), echo.port, "--token-file", token)
    connected(server, first, "twice")
    second = start_agent(processes, server.url("twice"), echo.port, "--token-file", token)
    second.wait_log(r"tunnel up")
    first.wait_log(r"the server is going away \(1000: replaced by a new connection\): no new "
                   r"streams")
    first.wait_log(r"tunnel closed: the server closed the tunnel \(1000: replaced by a new "
                   r"connection\); reconnecting in 1\.0 s")
    payload = pattern(100000)
    assert transfer(server.faces["twice"], payload) == payload


def test_token_stdin_against_the_server(processes, server, echo):
    agent = start_agent(processes, server.url("stdin"), echo.port, "--token-stdin",
                        stdin=subprocess.PIPE)
    agent.proc.stdin.write((agent_token("stdin", b"wrong secret") + "\n").encode())
    agent.proc.stdin.flush()
    agent.wait_log(r"the server refused the agent: 401 Unauthorized")
    agent.proc.stdin.write((agent_token("stdin", SECRET) + "\n").encode())
    agent.proc.stdin.flush()
    connected(server, agent, "stdin")
    payload = pattern(100000)
    assert transfer(server.faces["stdin"], payload) == payload


def test_the_agent_comes_back_after_the_server_restarts(processes, tmp_path, echo):
    faces = {"restart": free_port()}
    config = write_config(tmp_path, faces)
    port = free_port()
    argv = [PYTHON, "-m", "websockify", "--tunnel-config", config, "--workers", "1",
            str(port)]
    first = processes(argv, name="websockify", env=LIVENESS)
    wait_for(lambda: port_open(port), what="server up")
    token = tmp_path / "restart.token"
    token.write_text(agent_token("restart", SECRET) + "\n")
    agent = start_agent(processes, "ws://127.0.0.1:%d/tunnel/restart" % port, echo.port,
                        "--token-file", token)
    agent.wait_log(r"tunnel up")
    first.stop()
    agent.wait_log(r"tunnel closed: [^\n]+; reconnecting in \d+\.\d s")
    wait_for(lambda: "cannot connect to" in agent.log(), what="a failed attempt")
    second = processes(argv, name="websockify", env=LIVENESS)
    wait_for(lambda: agent.log().count("tunnel up") == 2, timeout=15, what="second tunnel")
    wait_for(lambda: "agent restart connected from" in second.log(), what="server sees it")
    payload = pattern(50000)
    assert transfer(faces["restart"], payload) == payload


def test_wss_with_the_servers_certificate_verified(processes, tmp_path, pki, echo):
    faces = {"secure": free_port()}
    config = write_config(tmp_path, faces)
    port = free_port()
    server = processes([PYTHON, "-m", "websockify", "--cert", pki.server.cert, "--key",
                        pki.server.key, "--tunnel-config", config, "--workers", "1",
                        str(port)], name="websockify")
    wait_for(lambda: port_open(port), what="server up")
    token = tmp_path / "secure.token"
    token.write_text(agent_token("secure", SECRET) + "\n")
    good = start_agent(processes, "wss://127.0.0.1:%d/tunnel/secure" % port, echo.port,
                       "--token-file", token, "--ca-cert", pki.ca.cert, "-v")
    good.wait_log(r"tunnel up")
    # Several MiB: the agent's in-place messages go out over TLS one view per send.
    payload = pattern(6 * 1024 * 1024 + 5)
    assert transfer(faces["secure"], payload) == payload
    bad = start_agent(processes, "wss://127.0.0.1:%d/tunnel/secure" % port, echo.port,
                      "--token-file", token, "--ca-cert", pki.other_ca.cert)
    bad.wait_log(r"cannot connect to wss://127\.0\.0\.1:%d/tunnel/secure: TLS: certificate "
                 r"verify failed" % port)


def test_reverse_websockify_deployment_with_client_certificates(processes, tmp_path, pki,
                                                                echo):
    # reverse_websockify's config.toml, its agents at /forward_to_me/<ID>, the
    # client certificate's CN as the ID, the server doing the TLS itself.
    face = free_port()
    config = tmp_path / "config.toml"
    config.write_text('http_server_endpoint = "127.0.0.1:39000"\n'
                      '[remote_service.alice]\nnickname = "Bus02"\n'
                      'local_listen_endpoint = "127.0.0.1:%d"\n' % face)
    port = free_port()
    server = processes([PYTHON, "-m", "websockify", "--cert", pki.server.cert, "--key",
                        pki.server.key, "--verify-client", "--cafile", pki.ca.cert,
                        "--tunnel-config", str(config), "--workers", "1", str(port)],
                       name="websockify")
    wait_for(lambda: port_open(port), what="server up")
    alice = start_agent(processes, "wss://127.0.0.1:%d/forward_to_me/alice" % port, echo.port,
                        "--ca-cert", pki.ca.cert, "--client-cert", pki.alice.cert,
                        "--client-key", pki.alice.key)
    alice.wait_log(r"tunnel up")
    payload = pattern(100000)
    assert transfer(face, payload) == payload
    # Bob's certificate is signed by the same CA but names another ID.
    bob = start_agent(processes, "wss://127.0.0.1:%d/forward_to_me/alice" % port, echo.port,
                      "--ca-cert", pki.ca.cert, "--client-cert", pki.bob.cert,
                      "--client-key", pki.bob.key)
    bob.wait_log(r"the server refused the agent: 401 Unauthorized[^\n]*CN 'bob'")


# -- throughput ----------------------------------------------------------------------------

def _sink_and_source(size):
    """A service that sends ``size`` bytes then reads until EOF, counting and hashing."""
    seen = {}

    def handler(conn):
        with conn:
            conn.sendall(pattern(size))
            conn.shutdown(socket.SHUT_WR)
            digest = hashlib.sha256()
            total = 0
            while True:
                chunk = conn.recv(262144)
                if not chunk:
                    break
                total += len(chunk)
                digest.update(chunk)
            seen["total"], seen["sha256"] = total, digest.hexdigest()
    return Service(handler), seen


def test_one_stream_throughput_through_the_agent(processes, server, capsys):
    size = 64 * 1024 * 1024
    service, seen = _sink_and_source(size)
    try:
        agent = start_agent(processes, server.url("bulk"), service.port,
                            "--token-file", server.token_file("bulk"))
        connected(server, agent, "bulk")
        with socket.create_connection(("127.0.0.1", server.faces["bulk"]), timeout=60) as user:
            start = time.monotonic()
            digest = hashlib.sha256()
            total = 0
            while total < size:
                chunk = user.recv(262144)
                assert chunk, "closed after %d bytes" % total
                total += len(chunk)
                digest.update(chunk)
            down = time.monotonic() - start
            assert digest.hexdigest() == hashlib.sha256(pattern(size)).hexdigest()
            start = time.monotonic()
            user.sendall(pattern(size))
            user.shutdown(socket.SHUT_WR)
            assert user.recv(1) == b""
            wait_for(lambda: seen.get("total") == size, timeout=60, what="upload counted")
            up = time.monotonic() - start
        assert seen["sha256"] == hashlib.sha256(pattern(size)).hexdigest()
        with capsys.disabled():
            print("\none stream through the agent: service->user %.0f MB/s, user->service "
                  "%.0f MB/s" % (size / down / 1e6, size / up / 1e6))
    finally:
        service.close()


# -- reverse_websockify's nginx deployment, with this project at both ends -------------------

NGINX_MTLS = """
  # the agents' endpoint: TLS, and only clients with a certificate of our CA
  server {{
    listen 127.0.0.1:{tls_port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_verify_client on;
    ssl_client_certificate {ca};
    location /tunnel/ {{
      proxy_pass http://127.0.0.1:{ws_port};
      proxy_set_header Host $http_host;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection "upgrade";
      proxy_buffering off;
    }}
  }}
  # the intranet's status page
  server {{
    listen 127.0.0.1:{admin_port};
    location = /tunnel/ {{
      proxy_pass http://127.0.0.1:{ws_port};
      proxy_http_version 1.1;
    }}
  }}
"""


def test_reverse_websockify_nginx_deployment_with_our_agent_and_server(processes, tmp_path,
                                                                      pki, echo):
    """The seed's deployment: nginx terminates TLS and checks client certificates
    (ssl_verify_client on), the rendezvous behind it on plain HTTP; here the
    rendezvous is websockify and the agent websockify-agent, which presents the
    certificate to nginx and its token to the server."""
    from tests.helpers import require_program
    nginx_program = require_program("nginx", "nginx")
    faces = {"alice": free_port()}
    config = write_config(tmp_path, faces)
    ws_port, tls_port, admin_port = free_port(), free_port(), free_port()
    processes([PYTHON, "-m", "websockify", "--tunnel-config", config, "--workers", "2",
               "127.0.0.1:%d" % ws_port], name="websockify")
    wait_for(lambda: port_open(ws_port), what="websockify up")
    nginx = start_nginx(processes, nginx_program, tmp_path, NGINX_MTLS.format(
        tls_port=tls_port, admin_port=admin_port, ws_port=ws_port,
        cert=pki.server.cert, key=pki.server.key, ca=pki.ca.cert), tls_port)
    token = tmp_path / "alice.token"
    token.write_text(agent_token("alice", SECRET) + "\n")
    url = "wss://127.0.0.1:%d/tunnel/alice" % tls_port
    alice = start_agent(processes, url, echo.port, "--token-file", token, "--ca-cert",
                        pki.ca.cert, "--client-cert", pki.alice.cert, "--client-key",
                        pki.alice.key)
    alice.wait_log(r"tunnel up")
    payload = pattern(3 * 1024 * 1024 + 7)
    assert transfer(faces["alice"], payload) == payload
    # The status page through nginx's intranet server: the agent, connected.
    with socket.create_connection(("127.0.0.1", admin_port), timeout=10) as conn:
        conn.sendall(b"GET /tunnel/ HTTP/1.1\r\nHost: admin\r\nAccept: application/json\r\n"
                     b"Connection: close\r\n\r\n")
        answer = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    rows = {row["id"]: row for row in json.loads(body)["agents"]}
    assert rows["alice"]["connected"] is True
    # Without a client certificate nginx refuses the agent before websockify sees it.
    stranger = start_agent(processes, url, echo.port, "--token-file", token, "--ca-cert",
                           pki.ca.cert)
    stranger.wait_log(r"handshake with %s failed: 400 Bad Request: 400 No required SSL "
                      r"certificate was sent; retrying" % re.escape(url))
