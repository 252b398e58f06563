"""websocktunnel's own client, ``wst-client``, unchanged against our server.

The binaries are built once per run from the sources beside the
repository (``../shared/peers/build.sh``, which needs golang-go and two
golang-*-dev packages; skipped with the reason where they are missing,
failed when CI=true).  The server is ``websockify --tunnel-config`` with two
secrets; wst-client registers with an upgrade to ``/`` carrying
``x-websocktunnel-id`` and its token, and speaks wsmux
(websockify/protocol/wsmux.py).  Its services are TCP servers in this
process; users are raw sockets (the TCP face) and raw WebSockets (the
bridge face).  Liveness is shortened (WEBSOCKIFY_TUNNEL_PING/DEAD, for
tests only) so a frozen client is found dead in about a second.
"""

import hashlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

from tests.helpers import (ROOT, RawWebSocket, SharedProcess, bridge_echoes, find_program,
                           free_port, pattern, port_open, skip_or_fail, wait_for,
                           websocket_echoes)
from tests.tunnel_agent import Service, agent_token, hs256_token

SECRET_A = b"websocktunnel secret A"
SECRET_B = b"websocktunnel secret B"
STRANGER = b"a secret the server does not have"
DEAD_AFTER = 1.0
LIVENESS = {"WEBSOCKIFY_TUNNEL_PING": "0.3", "WEBSOCKIFY_TUNNEL_DEAD": str(DEAD_AFTER)}
BUILD_SCRIPT = os.path.join(os.path.dirname(ROOT), "shared", "peers", "build.sh")
IDS = ("tcp", "bridge", "auth", "bulk", "many", "gone", "status", "bad", "good", "rotated",
       "web", "keep", "download", "wsecho", "plain")
# The IDs whose entries say http = true (viewers at <http_path><ID>/).
HTTP_IDS = ("web", "keep", "download", "wsecho")
@pytest.fixture(scope="session")
def wst_client(tmp_path_factory):
    """The path of a wst-client built from ../shared/peers (once per run)."""
    if not os.path.exists(BUILD_SCRIPT):
        skip_or_fail("websocktunnel's sources are not beside the repository (%s)"
                     % os.path.relpath(BUILD_SCRIPT, ROOT))
    if find_program("go") is None:
        skip_or_fail("go is not installed (Debian packages golang-go, "
                     "golang-github-gorilla-websocket-dev, golang-github-burntsushi-toml-dev)")
    out = tmp_path_factory.mktemp("peers")
    build = subprocess.run(["bash", BUILD_SCRIPT, str(out)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=600)
    path = out / "wst-client"
    assert build.returncode == 0 and path.exists(), build.stdout.decode("utf-8", "replace")
    return str(path)


def write_config(directory, faces, secrets=("a.key", "b.key"), open_registration=False):
    (directory / "a.key").write_bytes(SECRET_A + b"\n")
    (directory / "b.key").write_bytes(SECRET_B + b"\n")
    lines = ["[tunnels]", "secrets = [%s]" % ", ".join('"%s"' % s for s in secrets),
             'http_path = "/view/"', "open = %s" % ("true" if open_registration else "false")]
    for agent_id, port in faces.items():
        lines += ["[tunnels.agent.%s]" % agent_id, 'listen = "127.0.0.1:%d"' % port,
                  "token = true"]
        if agent_id in HTTP_IDS:
            lines.append("http = true")
    path = directory / "tunnels.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


class Rendezvous:
    def __init__(self, proc, port, faces):
        self.proc = proc
        self.port = port
        self.faces = faces


@pytest.fixture(scope="module")
def rendezvous(module_websockify, tmp_path_factory):
    directory = tmp_path_factory.mktemp("wst")
    faces = {agent_id: free_port() for agent_id in IDS}
    proc, port = module_websockify("--tunnel-config", write_config(directory, faces),
                                   "--workers", "1", "{port}", env=LIVENESS)
    return Rendezvous(SharedProcess(proc), port, faces)


@pytest.fixture
def server(rendezvous):
    rendezvous.proc.mark()
    return rendezvous


@pytest.fixture
def echo():
    service = Service()
    yield service
    service.close()


def start_wst(processes, wst_client, port, agent_id, service_port, token, tmp_path,
              wait=True):
    """wst-client as its users run it: ``wst-client ws://HOST:PORT ID PORT --token JWT``."""
    out_file = tmp_path / ("%s.url" % agent_id)
    proc = processes([wst_client, "ws://127.0.0.1:%d" % port, agent_id, str(service_port),
                      "--token", token, "--out-file", str(out_file)], name="wst-%s" % agent_id)
    if wait:
        wait_for(lambda: out_file.exists() and out_file.read_text(),
                 what="wst-client %s's URL file" % agent_id)
    return proc, out_file


def connected(server, agent_id, count=1):
    pattern_ = r"agent %s connected from \S+ \(worker \d+, websocktunnel client\)" % agent_id
    wait_for(lambda: len(re.findall(pattern_, server.proc.log())) >= count,
             what="agent %s connected (%d)" % (agent_id, count))


def exchange(port, payload, timeout=60.0) -> bytes:
    """Send ``payload`` to an echo service through the TCP face; read as many bytes back.

    wst-client closes its service connection as soon as the user's side
    ends, so the user reads the whole echo before closing.
    """
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as user:
        sender = threading.Thread(target=user.sendall, args=(payload,))
        sender.start()
        while len(received) < len(payload):
            chunk = user.recv(262144)
            if not chunk:
                break
            received += chunk
        sender.join()
    return bytes(received)


# -- registration -----------------------------------------------------------------------

def test_wst_client_registers_and_the_tcp_face_carries_bytes_both_ways(
        processes, wst_client, server, echo, tmp_path):
    proc, out_file = start_wst(processes, wst_client, server.port, "tcp", echo.port,
                               agent_token("tcp", SECRET_A), tmp_path)
    # The 101's x-websocktunnel-client-url: <scheme>://<Host><http_path><ID>/.
    assert out_file.read_text() == "http://127.0.0.1:%d/view/tcp/" % server.port
    connected(server, "tcp")
    for size in (1, 1000, 100000, 2 * 1024 * 1024 + 3):
        payload = pattern(size)
        assert exchange(server.faces["tcp"], payload) == payload
    server.proc.wait_log(r"127\.0\.0\.1:\d+ -> agent tcp: closed after 2097155 bytes to the "
                         r"agent, 2097155 from it")
    assert proc.proc.poll() is None


def test_a_token_signed_with_the_second_secret_registers(processes, wst_client, server, echo,
                                                         tmp_path):
    start_wst(processes, wst_client, server.port, "rotated", echo.port,
              agent_token("rotated", SECRET_B), tmp_path)
    connected(server, "rotated")
    assert exchange(server.faces["rotated"], b"rotation") == b"rotation"


def test_the_bridge_face_reaches_a_wst_client(processes, wst_client, server, echo, tmp_path):
    start_wst(processes, wst_client, server.port, "bridge", echo.port,
              agent_token("bridge", SECRET_A), tmp_path)
    connected(server, "bridge")
    bridge_echoes(server.port, "bridge")


@pytest.mark.parametrize("case,reason", [
    ("another ID", 'token is for agent "tcp", not "auth"'),
    ("expired", "token expired"),
    ("neither secret", "bad token signature"),
])
def test_refused_tokens_are_401_and_wst_client_gives_up(processes, wst_client, server, echo,
                                                        tmp_path, case, reason):
    now = int(time.time())
    token = {
        "another ID": agent_token("tcp", SECRET_A),
        "expired": hs256_token({"tid": "auth", "nbf": now - 7200, "exp": now - 3600}, SECRET_B),
        "neither secret": agent_token("auth", STRANGER),
    }[case]
    proc, _ = start_wst(processes, wst_client, server.port, "auth", echo.port, token, tmp_path,
                        wait=False)
    assert proc.wait(30) == 1
    assert 'level=fatal msg="auth failed"' in proc.log()
    line = server.proc.wait_log(r"refused 'GET / HTTP/1\.1': 401 agent auth: (.*)")
    assert line.group(1) == reason
    assert len(re.findall(r"refused 'GET / HTTP/1\.1'", server.proc.log())) == 1
    assert "agent auth connected" not in server.proc.log()


def _register(server, agent_id, token=None, host=None, extra=()):
    headers = ["x-websocktunnel-id: %s" % agent_id] if agent_id is not None else []
    if token:
        headers.append("Authorization: Bearer %s" % token)
    return RawWebSocket(server.port, path="/", protocols=None, host=host or "127.0.0.1",
                        extra=tuple(headers) + tuple(extra))


@pytest.mark.parametrize("agent_id,token,status,reason", [
    ("bad id!", "x", 400, "agent ID 'bad id!' is not a valid ID"),
    ("nobody", agent_token("nobody", SECRET_A), 403,
     "agent ID 'nobody' is not in the tunnel configuration"),
    ("auth", None, 401, "agent auth: no credentials"),
])
def test_bad_registrations(server, agent_id, token, status, reason):
    ws = _register(server, agent_id, token)
    try:
        assert ws.status == status, ws.buffer
    finally:
        ws.close()
    line = server.proc.wait_log(r"refused 'GET / HTTP/1\.1': (\d+) (.*)")
    assert line.group(1) == str(status) and line.group(2).startswith(reason), line.group(0)


def test_the_101_names_the_url_from_the_host_and_no_subprotocol(server):
    ws = _register(server, "status", agent_token("status", SECRET_A),
                   extra=("X-Forwarded-Proto: https",))
    try:
        assert ws.status == 101, ws.buffer
        # X-Forwarded-Proto is believed only from a --trusted-proxy.
        assert ws.headers["x-websocktunnel-client-url"] == \
            "http://127.0.0.1/view/status/"
        assert "sec-websocket-protocol" not in ws.headers
        ws.send(0x8, struct.pack("!H", 1000))
        assert ws.expect_close()[0] == 1000
    finally:
        ws.close()


@pytest.mark.parametrize("frame,reason", [
    (b"\x07\x00\x00\x00\x00", "unknown wsmux frame type 7"),
    (b"\x01\x01\x00\x00\x00", "wsmux SYN from the agent"),
    (b"\x00\x02", "wsmux frame of 2 bytes"),
    (b"\x00\x08\x00\x00\x00data", "wsmux DAT for stream 8, never opened"),
])
def test_a_malformed_wsmux_frame_closes_that_agent_with_1002(server, frame, reason):
    good = _register(server, "good", agent_token("good", SECRET_A))
    bad = _register(server, "bad", agent_token("bad", SECRET_A))
    try:
        assert good.status == 101 and bad.status == 101
        server.proc.mark()
        bad.send_binary(frame)
        code, _ = bad.expect_close()
        assert code == 1002
        line = server.proc.wait_log(r"agent bad \(127\.0\.0\.1:\d+\): protocol error: (.*) "
                                    r"\(closing 1002\)")
        assert line.group(1).startswith(reason)
        assert len(re.findall("protocol error", server.proc.log())) == 1
        # The other client is untouched: it still answers a WebSocket ping.
        good.send(0x9, b"still")
        while True:
            _, opcode, payload = good.recv_frame()
            if opcode == 0xA and payload == b"still":
                break
    finally:
        good.close()
        bad.close()


# -- streams ----------------------------------------------------------------------------------

def test_a_64_mib_download_arrives_exact(processes, wst_client, server, tmp_path):
    size = 64 * 1024 * 1024

    def source(conn):
        with conn:
            conn.sendall(pattern(size))
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass

    service = Service(source)
    try:
        start_wst(processes, wst_client, server.port, "bulk", service.port,
                  agent_token("bulk", SECRET_A), tmp_path)
        connected(server, "bulk")
        digest = hashlib.sha256()
        total = 0
        with socket.create_connection(("127.0.0.1", server.faces["bulk"]), timeout=60) as user:
            while True:
                chunk = user.recv(262144)
                if not chunk:
                    break
                total += len(chunk)
                digest.update(chunk)
        assert total == size
        assert digest.hexdigest() == hashlib.sha256(pattern(size)).hexdigest()
    finally:
        service.close()


def test_several_concurrent_streams_each_exact(processes, wst_client, server, echo, tmp_path):
    start_wst(processes, wst_client, server.port, "many", echo.port,
              agent_token("many", SECRET_A), tmp_path)
    connected(server, "many")
    payloads = [pattern(100000 + 7919 * i)[i:] for i in range(12)]
    results = [None] * len(payloads)

    def user(index):
        results[index] = exchange(server.faces["many"], payloads[index])

    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [r == p for r, p in zip(results, payloads)] == [True] * len(payloads)
    wait_for(lambda: len(re.findall(r"-> agent many: closed after", server.proc.log())) == 12,
             what="the twelve users' lines")


def test_a_frozen_wst_client_closes_its_users_within_the_dead_peer_time(
        processes, wst_client, server, echo, tmp_path):
    proc, _ = start_wst(processes, wst_client, server.port, "gone", echo.port,
                        agent_token("gone", SECRET_A), tmp_path)
    connected(server, "gone")
    with socket.create_connection(("127.0.0.1", server.faces["gone"]), timeout=10) as user:
        user.sendall(b"hello")
        assert user.recv(5) == b"hello"
        proc.signal(signal.SIGSTOP)        # vanished: no FIN, no pong, nothing
        try:
            start = time.monotonic()
            user.settimeout(DEAD_AFTER + 3.0)
            try:
                assert user.recv(65536) == b""
            except ConnectionResetError:
                pass
            assert time.monotonic() - start < DEAD_AFTER + 2.0
        finally:
            proc.signal(signal.SIGCONT)
    server.proc.wait_log(r"agent gone \(127\.0\.0\.1:\d+\): no message for 1 s: the agent "
                         r"is dead")


def _status(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /tunnel/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Accept: application/json\r\n\r\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data.partition(b"\r\n\r\n")[2])


def test_the_status_page_lists_a_wst_client(processes, wst_client, server, echo, tmp_path):
    start_wst(processes, wst_client, server.port, "status", echo.port,
              agent_token("status", SECRET_A, lifetime=7200), tmp_path)
    connected(server, "status")
    assert exchange(server.faces["status"], b"12345") == b"12345"

    def row():
        found = [a for a in _status(server.port)["agents"] if a["id"] == "status"][0]
        return found if found["bytes_from_agent"] == 5 and found["open_streams"] == 0 else None

    found = wait_for(row, what="the figures published")
    assert found["connected"] is True
    assert re.fullmatch(r"127\.0\.0\.1:\d+", found["peer"])
    assert (found["bytes_to_agent"], found["bytes_from_agent"]) == (5, 5)
    assert abs(found["token_expires"] - (time.time() + 7200)) < 30
    assert found["listen"] == "127.0.0.1:%d" % server.faces["status"] and found["bridge"]


# -- a server of its own -------------------------------------------------------------------

def test_wst_client_comes_back_after_the_server_restarts(processes, wst_client, tmp_path, echo):
    from tests.helpers import PYTHON
    faces = {"restart": free_port()}
    config = write_config(tmp_path, faces)
    port = free_port()
    argv = [PYTHON, "-m", "websockify", "--tunnel-config", config, "--workers", "1",
            str(port)]
    first = processes(argv, name="websockify", env=LIVENESS)
    wait_for(lambda: port_open(port), what="server up")
    proc, _ = start_wst(processes, wst_client, port, "restart", echo.port,
                        agent_token("restart", SECRET_A), tmp_path)
    wait_for(lambda: "agent restart connected from" in first.log(), what="first registration")
    assert exchange(faces["restart"], b"before") == b"before"
    first.stop()
    second = processes(argv, name="websockify", env=LIVENESS)
    wait_for(lambda: "agent restart connected from" in second.log(), timeout=30,
             what="wst-client registered again")
    payload = pattern(300000)
    assert exchange(faces["restart"], payload) == payload
    assert proc.proc.poll() is None


def open_registration_server(processes, tmp_path):
    """A server with ``open = true`` and no agent entries, two workers: (process, port, file)."""
    from tests.helpers import PYTHON
    config = write_config(tmp_path, {}, open_registration=True)
    port = free_port()
    server = processes([PYTHON, "-m", "websockify", "--tunnel-config", config, "--workers",
                        "2", str(port)], name="websockify", env=LIVENESS)
    wait_for(lambda: port_open(port), what="server up")
    return server, port, config


def test_wst_client_registers_openly_and_a_bad_token_is_refused(processes, wst_client,
                                                                tmp_path, echo):
    """[tunnels] open = true and no agent entries: websocktunnel's fleet model."""
    from tests.helpers import tunnel_status
    server, port, config = open_registration_server(processes, tmp_path)
    proc, out_file = start_wst(processes, wst_client, port, "fleet-7", echo.port,
                               agent_token("fleet-7", SECRET_B), tmp_path)
    assert out_file.read_text() == "http://127.0.0.1:%d/view/fleet-7/" % port
    server.wait_log(r"agent fleet-7: registered openly \(no entry in %s\)" % re.escape(config))
    server.wait_log(r"agent fleet-7 connected from 127\.0\.0\.1:\d+ \(worker [12], "
                    r"websocktunnel client\)")
    rows = {row["id"]: row for row in tunnel_status(port)["agents"]}
    assert rows["fleet-7"]["connected"] is True
    # Another ID with a token signed by neither secret: 401, no entry made.
    stranger, _ = start_wst(processes, wst_client, port, "fleet-8", echo.port,
                            agent_token("fleet-8", STRANGER), tmp_path, wait=False)
    assert stranger.wait(30) == 1
    server.wait_log(r"refused 'GET / HTTP/1\.1': 401 agent fleet-8: bad token signature")
    assert "fleet-8: registered openly" not in server.log()
    assert "fleet-8" not in {row["id"] for row in tunnel_status(port)["agents"]}
    assert proc.proc.poll() is None


# -- the HTTP face: viewers at the URL the 101 told ------------------------------------------

@pytest.fixture
def http_service():
    from tests.http_service import HttpService
    service = HttpService()
    yield service
    service.close()


def http_client(processes, wst_client, server, agent_id, service_port, tmp_path):
    """A wst-client serving ``service_port``; an HTTPConnection to its viewer URL and the
    URL's path (``/view/<ID>/``)."""
    import http.client
    from urllib.parse import urlsplit
    _, out_file = start_wst(processes, wst_client, server.port, agent_id, service_port,
                            agent_token(agent_id, SECRET_A), tmp_path)
    connected(server, agent_id)
    url = urlsplit(out_file.read_text())
    assert (url.scheme, url.port, url.path) == ("http", server.port, "/view/%s/" % agent_id)
    return http.client.HTTPConnection(url.hostname, url.port, timeout=60), url.path


def answer(conn, method, path, body=None, headers=None):
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response.status, response, response.read()


def test_viewers_get_and_post_through_the_url_the_101_told(processes, wst_client, server,
                                                            http_service, tmp_path):
    conn, base = http_client(processes, wst_client, server, "web", http_service.port, tmp_path)
    try:
        status, _, body = answer(conn, "GET", base + "index.html")
        assert (status, body) == (200, b"hello")
        status, _, body = answer(conn, "GET", base + "echo/x?y=1")
        seen = json.loads(body)
        assert seen["path"] == "/echo/x?y=1"
        assert {name: value for name, value in seen["headers"].items()
                if name.lower().startswith(("x-forwarded-", "x-websocktunnel-"))} == {
            "X-Forwarded-For": "127.0.0.1", "X-Forwarded-Proto": "http",
            "X-Forwarded-Host": "127.0.0.1:%d" % server.port,
            "x-websocktunnel-original-path": base + "echo/x?y=1"}
        payload = pattern(1024 * 1024)
        status, _, body = answer(conn, "POST", base + "echo", body=payload)
        assert status == 200
        seen = json.loads(body)
        assert seen["method"] == "POST" and seen["path"] == "/echo"
        assert hashlib.sha256(seen["body"].encode("latin-1")).hexdigest() == \
            hashlib.sha256(payload).hexdigest()
    finally:
        conn.close()
    assert [(r["method"], r["path"]) for r in http_service.requests] == [
        ("GET", "/index.html"), ("GET", "/echo/x?y=1"), ("POST", "/echo")]


def test_three_keep_alive_requests_on_one_viewer_connection(processes, wst_client, server,
                                                            http_service, tmp_path):
    conn, base = http_client(processes, wst_client, server, "keep", http_service.port,
                             tmp_path)
    try:
        for index in range(3):
            status, response, body = answer(conn, "GET", base + "bytes/%d" % (1000 + index))
            assert (status, body) == (200, pattern(1000 + index))
            assert not response.will_close
    finally:
        conn.close()
    # one stream, one connection from wst-client to the service, no Connection: close
    assert len(http_service.connections) == 1
    assert [r["path"] for r in http_service.requests] == ["/bytes/1000", "/bytes/1001",
                                                           "/bytes/1002"]
    assert all("Connection" not in r["headers"] for r in http_service.requests)
    server.proc.wait_log(r"127\.0\.0\.1:\d+ -> agent keep \(http\): viewer connection closed "
                         r"after 3 request\(s\)")


def test_a_16_mib_download_through_the_http_face_arrives_exact(processes, wst_client, server,
                                                               http_service, tmp_path):
    size = 16 * 1024 * 1024
    conn, base = http_client(processes, wst_client, server, "download", http_service.port,
                             tmp_path)
    try:
        for path in ("bytes/%d" % size, "chunked/%d" % (size + 1)):
            status, response, body = answer(conn, "GET", base + path)
            assert status == 200
            expected = pattern(int(path.split("/")[1]))
            assert len(body) == len(expected)
            assert hashlib.sha256(body).hexdigest() == hashlib.sha256(expected).hexdigest()
    finally:
        conn.close()


def test_a_websocket_through_the_http_face_to_a_websocket_service(processes, wst_client,
                                                                  server, tmp_path):
    """A real ``websockify --echo`` as the wst-client's local service."""
    from tests.helpers import websockify_argv
    echo_port = free_port()
    processes(websockify_argv("--echo", "127.0.0.1:%d" % echo_port), name="echo")
    wait_for(lambda: port_open(echo_port), what="websockify --echo")
    _, out_file = start_wst(processes, wst_client, server.port, "wsecho", echo_port,
                            agent_token("wsecho", SECRET_A), tmp_path)
    connected(server, "wsecho")
    assert out_file.read_text() == "http://127.0.0.1:%d/view/wsecho/" % server.port
    websocket_echoes(server.port, "/view/wsecho/", (3, 70000, 1024 * 1024 + 3))
    server.proc.wait_log(r"127\.0\.0\.1:\d+ -> agent wsecho \(http\): viewer connection closed "
                         r"after 1 request\(s\)")


def test_a_wst_client_without_http_true_has_no_http_face(processes, wst_client, server,
                                                         http_service, tmp_path):
    """The operator opts an ID into the HTTP face (http = true), as for our agents: the
    URL its 101 names (wst-client needs one) answers 404 until then."""
    conn, base = http_client(processes, wst_client, server, "plain", http_service.port,
                             tmp_path)
    try:
        assert answer(conn, "GET", base)[::2] == \
            (404, b"no agent 'plain' with an HTTP face here\n")
    finally:
        conn.close()


# -- open registration ([tunnels] open = true, no entry for the ID) -------------------------

def test_open_registration_a_wst_client_serves_viewers_and_another_ids_token_is_401(
        processes, wst_client, tmp_path, http_service):
    import http.client
    server, port, config = open_registration_server(processes, tmp_path)
    proc, out_file = start_wst(processes, wst_client, port, "fleet-1", http_service.port,
                               agent_token("fleet-1", SECRET_A), tmp_path)
    assert out_file.read_text() == "http://127.0.0.1:%d/view/fleet-1/" % port
    server.wait_log(r"agent fleet-1: registered openly \(no entry in %s\)" % re.escape(config))
    # viewers reach it, whichever of the two workers accepts them
    for index in range(4):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            payload = pattern(1000 * index + 1)
            status, _, body = answer(conn, "POST", "/view/fleet-1/echo/%d" % index, payload)
            assert status == 200
            seen = json.loads(body)
            assert (seen["path"], seen["body"].encode("latin-1")) == ("/echo/%d" % index,
                                                                      payload)
            status, _, body = answer(conn, "GET", "/view/fleet-1/bytes/300000")
            assert (status, body) == (200, pattern(300000))
        finally:
            conn.close()
    assert len(http_service.connections) == 4
    # a token for another ID: 401, wst-client gives up, no entry, viewers get 404
    stranger, _ = start_wst(processes, wst_client, port, "fleet-2", http_service.port,
                            agent_token("fleet-1", SECRET_A), tmp_path, wait=False)
    assert stranger.wait(30) == 1
    assert 'level=fatal msg="auth failed"' in stranger.log()
    line = server.wait_log(r"refused 'GET / HTTP/1\.1': 401 agent fleet-2: (.*)")
    assert line.group(1) == 'token is for agent "fleet-1", not "fleet-2"'
    assert "fleet-2: registered openly" not in server.log()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        status, _, body = answer(conn, "GET", "/view/fleet-2/")
        assert (status, body) == (404, b"no agent 'fleet-2' with an HTTP face here\n")
    finally:
        conn.close()
    # the first is untouched
    assert proc.proc.poll() is None
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        assert answer(conn, "GET", "/view/fleet-1/")[::2] == (200, b"hello")
    finally:
        conn.close()
    # once it left: 503 with Retry-After (its open entry stays until recycled)
    mark = len(server.log())
    proc.stop()
    wait_for(lambda: re.search(r"agent fleet-1 \(127\.0\.0\.1:\d+\): tunnel closed",
                               server.log()[mark:]), what="fleet-1's tunnel closed")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        status, response, body = answer(conn, "GET", "/view/fleet-1/")
        assert (status, response.getheader("Retry-After"), body) == (
            503, "5", b"agent fleet-1 is not connected\n")
    finally:
        conn.close()
