"""The HTTP face: viewers' requests to <http_path><ID>/ carried to agents' HTTP services.

A real ``websockify --tunnel-config`` (two workers, so that viewers also
arrive at the worker that does not hold the agent), real agents (the
``websockify-agent`` process, or tests/tunnel_agent.py's ScriptedAgent where
a test chooses the agent's answers), services in this process
(tests/http_service.py, a standard-library HTTP/1.1 server) and a real
``websockify --echo`` as the WebSocket service behind an agent.
"""

import hashlib
import json
import re
import socket
import struct
import threading
import time

import pytest

from tests.helpers import (RawWebSocket, SharedProcess, free_port, pattern,
                           read_http_response, rss_kib, children_of, wait_for)
from tests.http_service import HttpService
from tests.tunnel_agent import ScriptedAgent, Service, agent_process, agent_token

SECRET = b"http face secret"
LIVENESS = {"WEBSOCKIFY_TUNNEL_PING": "0.3", "WEBSOCKIFY_TUNNEL_DEAD": "1.0"}
HTTP_AGENT = ("X-Websockify-Service: http",)
#: Agents in the file: all with the HTTP face but "tcponly".
AGENTS = ("web", "plain", "ws", "refusing", "ignoring", "garbage", "absent", "slow", "flow",
          "count", "upload")


def write_config(directory, agents, extra=()):
    (directory / "tunnel.key").write_bytes(SECRET + b"\n")
    lines = ["[tunnels]", 'secrets = ["tunnel.key"]', 'http_path = "/t/"'] + list(extra)
    for agent_id in agents:
        lines += ["[tunnels.agent.%s]" % agent_id, "http = true"]
    lines += ["[tunnels.agent.tcponly]", "token = true"]
    path = directory / "tunnels.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


class Server:
    def __init__(self, proc, port):
        self.proc = proc
        self.port = port


@pytest.fixture(scope="module")
def http_server(module_websockify, tmp_path_factory):
    directory = tmp_path_factory.mktemp("http-face")
    proc, port = module_websockify("-v", "--tunnel-config", write_config(directory, AGENTS),
                                   "--workers", "2", "--connect-timeout", "1",
                                   "--handshake-timeout", "2", "{port}", env=LIVENESS)
    return Server(SharedProcess(proc), port)


@pytest.fixture
def server(http_server):
    http_server.proc.mark()
    return http_server


@pytest.fixture(scope="module")
def service():
    service = HttpService()
    yield service
    service.close()


def scripted_agent(server, agent_id, service_port, http=True, **kwargs):
    agent = ScriptedAgent(server.port, agent_id, token=agent_token(agent_id, SECRET),
                          service=service_port, extra=HTTP_AGENT if http else (), **kwargs)
    assert agent.status == 101, (agent.status, agent.body)
    assert agent.headers.get("x-websockify-viewer-url") == \
        "http://127.0.0.1:%d/t/%s/" % (server.port, agent_id)
    server.proc.wait_log(r"agent %s connected from" % re.escape(agent_id))
    return agent


def real_agent(processes, tmp_path, server, agent_id, service_port, *extra):
    proc = agent_process(processes, tmp_path, server.port, agent_id, service_port, SECRET,
                         *extra)
    server.proc.wait_log(r"agent %s connected from" % re.escape(agent_id))
    return proc


def viewer(port, timeout=10.0):
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def request(port, target, method="GET", headers=(), body=b"", sock=None):
    """One request; (status, headers, body); the connection stays open when given."""
    own = sock is None
    sock = sock or viewer(port)
    lines = ["%s %s HTTP/1.1" % (method, target), "Host: 127.0.0.1:%d" % port]
    lines += ["%s: %s" % pair for pair in headers]
    if body:
        lines.append("Content-Length: %d" % len(body))
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    try:
        return read_http_response(sock, limit=1 << 20)
    finally:
        if own:
            sock.close()


def read_head(sock) -> tuple:
    """(status, headers with lower-case names, the body bytes read with the head)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, rest


class Responses:
    """Reads the responses on one keep-alive connection, each by its Content-Length."""

    def __init__(self, sock):
        self.sock = sock
        self.buffer = b""

    def next(self) -> tuple:
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, self.buffer
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = int([line.split(":", 1)[1] for line in lines
                      if line.lower().startswith("content-length:")][0])
        while len(self.buffer) < length:
            chunk = self.sock.recv(65536)
            assert chunk
            self.buffer += chunk
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(lines[0].split()[1]), body


def read_exactly(sock, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise EOFError("closed after %d of %d bytes" % (got, n))
        got += k
    return bytes(buf)


def closed_by_peer(sock, seconds=5.0) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(65536) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


# -- requests carried ---------------------------------------------------------------------

def test_get_rewritten_with_forwarded_headers(server, service, processes, tmp_path):
    real_agent(processes, tmp_path, server, "web", service.port)
    status, headers, body = request(
        server.port, "/t/web/echo/a%20b?x=1&y=%2F",
        headers=[("X-Forwarded-For", "203.0.113.66"), ("X-Forwarded-Proto", "https"),
                 ("X-Forwarded-Host", "evil.example"),
                 ("x-websocktunnel-original-path", "/forged")])
    assert status == 200, body
    seen = json.loads(body)
    assert (seen["method"], seen["path"]) == ("GET", "/echo/a%20b?x=1&y=%2F")
    sent = {name.lower(): value for name, value in seen["headers"].items()}
    # The viewer's copies are replaced (127.0.0.1 is no --trusted-proxy here).
    assert sent["x-forwarded-for"] == "127.0.0.1"
    assert sent["x-forwarded-proto"] == "http"
    assert sent["x-forwarded-host"] == "127.0.0.1:%d" % server.port
    assert sent["x-websocktunnel-original-path"] == "/t/web/echo/a%20b?x=1&y=%2F"
    assert sent["host"] == "127.0.0.1:%d" % server.port
    # Our agent did not say its service speaks HTTP: one request per stream.
    assert sent["connection"] == "close"


def test_post_and_chunked_bodies_both_ways(server, service, processes, tmp_path):
    real_agent(processes, tmp_path, server, "upload", service.port)
    body = pattern(3 * 1024 * 1024 + 17)
    status, _, answer = request(server.port, "/t/upload/slow-body", method="POST", body=body)
    assert (status, answer) == (200, hashlib.sha256(body).hexdigest().encode())
    # A chunked request body, and a chunked response read to its last chunk.
    sock = viewer(server.port)
    try:
        sock.sendall(b"PUT /t/upload/echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked"
                     b"\r\n\r\n4\r\nabcd\r\n3;ext=1\r\nefg\r\n0\r\n\r\n")
        status, _, answer = read_http_response(sock)
        assert status == 200 and json.loads(answer)["body"] == "abcdefg"
    finally:
        sock.close()
    sock = viewer(server.port)
    try:
        sock.sendall(b"GET /t/upload/chunked/300000 HTTP/1.1\r\nHost: h\r\n\r\n")
        data = b""
        while not data.endswith(b"\r\n0\r\n\r\n"):
            chunk = sock.recv(65536)
            assert chunk, data[-100:]
            data += chunk
        head, _, chunked = data.partition(b"\r\n\r\n")
        assert b"Transfer-Encoding: chunked" in head
        decoded, rest = b"", chunked
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if not size:
                break
            decoded, rest = decoded + rest[:size], rest[size + 2:]
        assert decoded == pattern(300000)
    finally:
        sock.close()


def test_big_download_exact_through_either_worker(server, service, processes, tmp_path):
    real_agent(processes, tmp_path, server, "web", service.port)
    size = 32 * 1024 * 1024
    for _ in range(4):          # some land on the worker that does not hold the agent
        sock = viewer(server.port)
        try:
            sock.sendall(b"GET /t/web/bytes/%d HTTP/1.1\r\nHost: h\r\n\r\n" % size)
            status, headers, first = read_head(sock)
            sock.settimeout(None)
            assert status == 200 and int(headers["content-length"]) == size
            rest = read_exactly(sock, size - len(first)) if len(first) < size else b""
            assert hashlib.sha256(first + rest).digest() == hashlib.sha256(pattern(size)).digest()
        finally:
            sock.close()


def test_keep_alive_and_pipelining_for_an_http_agent(server, service):
    agent = scripted_agent(server, "web", service.port)
    try:
        before = set(service.connections)
        sock = viewer(server.port)
        try:
            for index in range(3):
                status, headers, body = request(server.port, "/t/web/echo/%d" % index,
                                                sock=sock)
                assert status == 200 and json.loads(body)["path"] == "/echo/%d" % index
                assert "connection" not in {name.lower() for name in
                                            json.loads(body)["headers"]}
            # Three requests in one packet: answered in order.
            sock.sendall(b"".join(b"GET /t/web/bytes/%d HTTP/1.1\r\nHost: h\r\n\r\n" % n
                                  for n in (10, 20, 30)))
            responses = Responses(sock)
            for n in (10, 20, 30):
                assert responses.next() == (200, pattern(n))
        finally:
            sock.close()
        # One viewer connection: one stream, one connection to the service.
        assert len(agent.opened) == 1
        assert len(service.connections - before) == 1
    finally:
        agent.close()


def test_a_request_for_another_agent_ends_the_connection(server, service):
    agent = scripted_agent(server, "web", service.port)
    try:
        sock = viewer(server.port)
        try:
            status, _, body = request(server.port, "/t/web/echo/first", sock=sock)
            assert status == 200
            count = len(service.requests)
            sock.sendall(b"GET /t/plain/echo/second HTTP/1.1\r\nHost: h\r\n\r\n")
            assert closed_by_peer(sock)
            assert len(service.requests) == count      # never reached the service
        finally:
            sock.close()
    finally:
        agent.close()


def test_an_agent_without_http_gets_one_request_per_connection(server, service):
    agent = scripted_agent(server, "plain", service.port, http=False)
    try:
        sock = viewer(server.port)
        try:
            sock.sendall(b"GET /t/plain/echo/1 HTTP/1.1\r\nHost: h\r\n\r\n"
                         b"GET /t/plain/echo/2 HTTP/1.1\r\nHost: h\r\n\r\n")
            status, headers, body = read_http_response(sock)
            assert status == 200 and json.loads(body)["path"] == "/echo/1"
            # The service did not say so; the viewer is told the connection ends.
            assert headers["connection"] == "close"
            assert json.loads(body)["headers"]["Connection"] == "close"
            assert closed_by_peer(sock)
        finally:
            sock.close()
        assert [r["path"] for r in service.requests if r["path"].startswith("/echo/")][-1] \
            == "/echo/1"
    finally:
        agent.close()


def test_websocket_upgrade_relayed_to_a_websocket_service(server, websockify, processes,
                                                         tmp_path):
    _, echo_port = websockify("--echo", "{port}")
    real_agent(processes, tmp_path, server, "ws", echo_port)
    ws = RawWebSocket(server.port, path="/t/ws/")
    try:
        assert ws.status == 101, ws.buffer
        # The agent has no --http, yet its 101 is passed as it is (a browser
        # would fail a 101 saying Connection: close).
        assert ws.headers["connection"].lower() == "upgrade"
        for payload in (b"hello", pattern(200000)):
            ws.send_binary(payload)
            assert ws.recv_data(len(payload)) == payload
    finally:
        ws.close()


def test_viewer_that_stops_reading_stops_only_its_stream(server, service, processes,
                                                        tmp_path):
    real_agent(processes, tmp_path, server, "flow", service.port)
    worker_rss = sum(rss_kib(pid) for pid in children_of(server.proc.pid))
    stalled = viewer(server.port)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    try:
        stalled.sendall(b"GET /t/flow/bytes/%d HTTP/1.1\r\nHost: h\r\n\r\n" % (512 << 20))
        # Meanwhile another viewer of the same agent is served in full.
        size = 8 * 1024 * 1024
        other = viewer(server.port)
        try:
            other.sendall(b"GET /t/flow/bytes/%d HTTP/1.1\r\nHost: h\r\n\r\n" % size)
            status, headers, first = read_head(other)
            assert status == 200
            assert first + read_exactly(other, size - len(first)) == pattern(size)
        finally:
            other.close()
        # The stalled viewer's 512 MiB wait in the service, not in the server.
        grown = sum(rss_kib(pid) for pid in children_of(server.proc.pid)) - worker_rss
        assert grown < 64 * 1024, grown
        total = 0
        stalled.settimeout(None)
        while total < (512 << 20):
            chunk = stalled.recv(1 << 20)
            assert chunk
            total += len(chunk)
    finally:
        stalled.close()


def test_a_body_sent_slower_than_the_service_reads(server, service, processes, tmp_path):
    real_agent(processes, tmp_path, server, "slow", service.port)
    body = pattern(40000)
    sock = viewer(server.port)
    try:
        sock.sendall(b"POST /t/slow/slow-body HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n"
                     % len(body))
        for start in range(0, len(body), 5000):
            sock.sendall(body[start:start + 5000])
            time.sleep(0.15)         # the viewer's pace (not an assertion's wait)
        status, _, answer = read_http_response(sock)
        assert (status, answer) == (200, hashlib.sha256(body).hexdigest().encode())
    finally:
        sock.close()


# -- refusals ---------------------------------------------------------------------------------

def test_unknown_id_is_404_and_an_agent_without_the_face_too(server):
    for target in ("/t/nobody/", "/t/tcponly/x"):
        status, _, body = request(server.port, target)
        assert status == 404, (target, body)
    server.proc.wait_log(r"refused 'GET /t/nobody/ HTTP/1.1': 404")


def test_absent_agent_is_503_with_retry_after(server):
    status, headers, body = request(server.port, "/t/absent/page")
    assert (status, headers.get("retry-after")) == (503, "5"), body
    assert body == b"agent absent is not connected\n"
    server.proc.wait_log(r"refused 'GET /t/absent/page HTTP/1.1': 503 agent absent is not "
                         r"connected")


def test_the_prefix_without_its_slash_redirects(server):
    status, headers, _ = request(server.port, "/t/web?x=1")
    assert (status, headers.get("location")) == (308, "/t/web/?x=1")


@pytest.mark.parametrize("target", ["/t/web/../other/", "/t/web/%2e%2e/other/",
                                    "/t/web/%2E%2e/other/", "/t/web/.%2e/other/",
                                    "/t/web/a%2fb", "/t/web/a%5Cb", "/t/web/a\\b",
                                    "/t/web/./x"])
def test_paths_leaving_the_prefix_are_400(server, target):
    status, _, body = request(server.port, target)
    assert status == 400, (target, body)
    server.proc.wait_log(r"refused 'GET %s HTTP/1.1': 400"
                         % re.escape(target.replace("\\", "\\\\")))


def test_header_block_over_16_kib_is_431(server):
    status, _, _ = request(server.port, "/t/web/", headers=[("X-Big", "a" * (17 * 1024))])
    assert status == 431
    server.proc.wait_log(r"431")


def test_service_refusing_is_502(server):
    agent = scripted_agent(server, "refusing", free_port())      # nothing listens there
    try:
        status, _, body = request(server.port, "/t/refusing/")
        assert status == 502 and b"refused" in body
    finally:
        agent.close()


def test_no_answer_to_the_open_is_504(server, service):
    agent = scripted_agent(server, "ignoring", service.port, on_open="hold")
    try:
        started = time.monotonic()
        status, _, body = request(server.port, "/t/ignoring/")
        assert status == 504, body
        assert time.monotonic() - started < 5
    finally:
        agent.close()


def test_service_answering_garbage_is_502_with_one_log_line(server):
    def ssh_banner(conn):
        conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        conn.recv(65536)
        conn.close()

    garbage = Service(ssh_banner)
    agent = scripted_agent(server, "garbage", garbage.port)
    try:
        status, _, body = request(server.port, "/t/garbage/")
        assert status == 502
        assert body == b"agent garbage: its service answered b'SSH-2.0-OpenSSH_9.2\\r\\n'" \
                       b", not an HTTP response\n", body
        server.proc.wait_log(r"agent garbage \(http\): 502 agent garbage: its service answered")
        assert len(re.findall(r"502 agent garbage", server.proc.log())) == 1
    finally:
        agent.close()
        garbage.close()


def test_status_page_counts_viewers_and_requests(server, service):
    agent = scripted_agent(server, "count", service.port)
    try:
        held = viewer(server.port)
        try:
            for index in range(4):
                assert request(server.port, "/t/count/echo/%d" % index, sock=held)[0] == 200

            def figures():
                status, _, body = request(server.port, "/tunnel/",
                                          headers=[("Accept", "application/json")])
                row = [a for a in json.loads(body)["agents"] if a["id"] == "count"][0]
                return row["viewers"], row["requests"], row["faces"]["http"]

            wait_for(lambda: figures() == (1, 4, "/t/count/"), what="1 viewer, 4 requests")
        finally:
            held.close()
        wait_for(lambda: figures()[:2] == (0, 4), what="the viewer gone, 4 requests kept")
    finally:
        agent.close()


# -- servers of their own ------------------------------------------------------------------

def test_https_viewers_and_a_trusted_proxy(websockify, tmp_path, pki, service, processes):
    """TLS viewers on both workers (X-Forwarded-Proto https); --trusted-proxy: its
    X-Forwarded-* kept and extended."""
    import ssl
    path = write_config(tmp_path, ["web"])
    proc, port = websockify("-v", "--cert", pki.server.pem, "--trusted-proxy", "127.0.0.1/32",
                            "--tunnel-config", path, "--workers", "2", "{port}", env=LIVENESS)
    server = Server(proc, port)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.ca.cert)
    agent = ScriptedAgent(port, "web", token=agent_token("web", SECRET), service=service.port,
                          extra=HTTP_AGENT, ssl_context=context)
    assert agent.status == 101, agent.body
    assert agent.headers["x-websockify-viewer-url"] == "https://127.0.0.1:%d/t/web/" % port
    try:
        size = 4 * 1024 * 1024 + 1
        for _ in range(6):
            sock = context.wrap_socket(viewer(port), server_hostname="127.0.0.1")
            try:
                responses = Responses(sock)
                sock.sendall(b"GET /t/web/echo HTTP/1.1\r\nHost: h\r\n"
                             b"X-Forwarded-For: 198.51.100.4\r\n\r\n"
                             b"GET /t/web/bytes/%d HTTP/1.1\r\nHost: h\r\n\r\n" % size)
                status, body = responses.next()
                sent = {k.lower(): v for k, v in json.loads(body)["headers"].items()}
                assert status == 200
                assert sent["x-forwarded-for"] == "198.51.100.4, 127.0.0.1"
                assert sent["x-forwarded-proto"] == "https"
                assert responses.next() == (200, pattern(size))
            finally:
                sock.close()
        # Whichever worker accepted them, the holder served them all.
        def servers():
            return re.findall(r"\[(\d+)\] INFO [^\n]* -> agent web \(http\): viewer", proc.log())

        wait_for(lambda: len(servers()) == 6, what="6 viewer connections logged")
        holder = re.search(r"\[(\d+)\] INFO agent web connected from", proc.log()).group(1)
        assert servers() == [holder] * 6
    finally:
        agent.close()


def test_open_registration_reaches_the_http_face(websockify, tmp_path, service):
    path = write_config(tmp_path, [], extra=["open = true"])
    proc, port = websockify("--tunnel-config", path, "--workers", "1", "{port}", env=LIVENESS)
    server = Server(proc, port)
    agent = scripted_agent(server, "fleet-0042.a~b%20", service.port)
    try:
        proc.wait_log(r"agent fleet-0042.a~b%20: registered openly")
        status, _, body = request(port, "/t/fleet-0042.a~b%20/echo/x")
        assert status == 200 and json.loads(body)["path"] == "/echo/x"
        # Never registered: unknown; a bad ID: 400; a bad token: 401.
        assert request(port, "/t/never-seen/")[0] == 404
        bad = ScriptedAgent(port, "bad*id", token=agent_token("bad*id", SECRET))
        assert bad.status == 400, bad.body
        forged = ScriptedAgent(port, "fleet-2", token=agent_token("fleet-2", b"not the secret"))
        assert forged.status == 401, forged.body
    finally:
        agent.close()
    # Gone: known, absent.
    wait_for(lambda: request(port, "/t/fleet-0042.a~b%20/")[0] == 503, what="503 once gone")


def test_a_viewer_that_half_closes_after_its_request_gets_the_answer(server, service):
    agent = scripted_agent(server, "web", service.port)
    try:
        sock = viewer(server.port)
        try:
            body = pattern(200000)
            sock.sendall(b"POST /t/web/slow-body HTTP/1.1\r\nHost: h\r\nContent-Length: %d"
                         b"\r\n\r\n%s" % (len(body), body))
            sock.shutdown(socket.SHUT_WR)
            status, _, answer = read_http_response(sock)
            assert (status, answer) == (200, hashlib.sha256(body).hexdigest().encode())
            # Our FIN reached the service after the body; it closed; so do we.
            assert closed_by_peer(sock)
        finally:
            sock.close()
    finally:
        agent.close()


def test_a_refused_upgrade_lets_nothing_after_it_through(server, service):
    agent = scripted_agent(server, "web", service.port)
    try:
        count = len(service.requests)
        sock = viewer(server.port)
        try:
            # The service ignores the upgrade and answers 200, keeping the
            # connection: what follows must not reach it unchecked.
            sock.sendall(b"GET /t/web/echo/up HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\n\r\n"
                         b"GET /t/web/../../smuggled HTTP/1.1\r\nHost: h\r\n"
                         b"X-Forwarded-For: 7.7.7.7\r\n\r\n")
            status, _, body = read_http_response(sock)
            assert status == 200 and json.loads(body)["path"] == "/echo/up"
            assert closed_by_peer(sock)
        finally:
            sock.close()
        assert [r["path"] for r in service.requests[count:]] == ["/echo/up"]
    finally:
        agent.close()


@pytest.mark.parametrize("head", [
    b"GET /t/web/echo HTTP/1.1\r\nHost: h\nX-Forwarded-For: 6.6.6.6\r\n\r\n",
    b"POST /t/web/echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n-6\r\nXX",
    b"POST /t/web/echo HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 30\r\n\r\n",
])
def test_heads_a_service_could_read_differently_are_400_and_the_worker_lives(server, service,
                                                                           head):
    agent = scripted_agent(server, "web", service.port)
    try:
        count = len(service.requests)
        sock = viewer(server.port)
        try:
            sock.sendall(head)
            status, _, body = read_http_response(sock)
            assert status == 400, body
        finally:
            sock.close()
        assert len(service.requests) == count
        # The worker still serves (a negative chunk size once looped it forever).
        assert request(server.port, "/t/web/echo/after")[0] == 200
    finally:
        agent.close()


def test_an_open_id_needs_its_token_even_with_a_matching_client_certificate(
        websockify, tmp_path, pki, service):
    import ssl
    path = write_config(tmp_path, [], extra=["open = true"])
    proc, port = websockify("--cert", pki.server.pem, "--verify-client", "--cafile",
                            pki.ca.cert, "--tunnel-config", path, "--workers", "1", "{port}",
                            env=LIVENESS)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.ca.cert)
    context.load_cert_chain(pki.alice.cert, pki.alice.key)
    first = ScriptedAgent(port, "alice", token=agent_token("alice", SECRET),
                          service=service.port, ssl_context=context)
    assert first.status == 101, first.body
    try:
        # CN=alice, no token: neither registers nor replaces the openly registered agent.
        impostor = ScriptedAgent(port, "alice", ssl_context=context)
        assert impostor.status == 401, impostor.body
        assert b"open registration needs a token" in impostor.body
        impostor.close()
        assert not first.closed.is_set()
    finally:
        first.close()


def test_a_service_resetting_before_any_answer_is_502_for_the_viewer(server):
    def reset_at_once(conn):
        conn.recv(65536)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    resetting = Service(reset_at_once)
    agent = scripted_agent(server, "refusing", resetting.port)
    try:
        status, _, body = request(server.port, "/t/refusing/")
        assert status == 502, body
    finally:
        agent.close()
        resetting.close()


def test_a_later_head_left_unfinished_is_closed_after_the_handshake_timeout(server, service):
    agent = scripted_agent(server, "web", service.port)
    try:
        sock = viewer(server.port)
        try:
            assert request(server.port, "/t/web/echo/1", sock=sock)[0] == 200
            sock.sendall(b"GET /t/web/echo/2 HTTP/1.1\r\nHost:")
            assert closed_by_peer(sock, seconds=8.0)
        finally:
            sock.close()
        server.proc.wait_log(r"agent web \(http\): viewer connection closed: a request head "
                             r"not completed within 2 s")
        assert wait_for(lambda: agent.resets, what="the stream reset")
    finally:
        agent.close()


def test_the_server_answers_a_window_only_to_an_agent_that_announces_one(server, service):
    from websockify.protocol.mux import LARGE_WINDOW
    older = scripted_agent(server, "web", service.port)
    try:
        assert "x-websockify-window" not in older.headers
    finally:
        older.close()
    newer = ScriptedAgent(server.port, "web", token=agent_token("web", SECRET),
                          service=service.port, window=LARGE_WINDOW,
                          extra=HTTP_AGENT + ("X-Websockify-Window: %d" % LARGE_WINDOW,))
    try:
        assert newer.headers["x-websockify-window"] == str(LARGE_WINDOW)
        # Both ends at 1 MiB windows: an answer of about a window arrives exactly.
        size = 1024 * 1024 - 200
        assert request(server.port, "/t/web/bytes/%d" % size)[::2] == (200, pattern(size))
    finally:
        newer.close()
