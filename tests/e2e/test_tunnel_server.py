"""The rendezvous in the server: agents' upgrades, the TCP and bridge faces, status, HUP.

Real ``websockify --tunnel-config`` processes on loopback; the agents are
tests/tunnel_agent.py's ScriptedAgent (a real client over a real socket
that can be told to refuse, time out, fall silent or send garbage), the
services are TCP servers in this process.  The liveness timers are
shortened through WEBSOCKIFY_TUNNEL_PING / WEBSOCKIFY_TUNNEL_DEAD (seconds;
for tests only) so that a dead agent is found in about a second.
"""

import json
import os
import platform
import re
import signal
import socket
import struct
import time

import pytest

from tests.helpers import (RawWebSocket, SharedProcess, bridge_echoes, children_of, free_port,
                           mask_frame, pattern, read_http_response, rss_kib, wait_for)
from tests.tunnel_agent import ScriptedAgent, Service, agent_process, agent_token, hs256_token

SECRET = b"tunnel secret for the tests"
OTHER_SECRET = b"another secret"
DEAD_AFTER = 1.0
LIVENESS = {"WEBSOCKIFY_TUNNEL_PING": "0.3", "WEBSOCKIFY_TUNNEL_DEAD": str(DEAD_AFTER)}

def write_config(directory, agents, on_duplicate="replace", status_allow=None, name="tunnels"):
    """A tunnel config file; ``agents``: {id: {"listen": port, "token": bool, "nickname": s}}."""
    (directory / "tunnel.key").write_bytes(SECRET + b"\n")
    lines = ["[tunnels]", 'path = "/tunnel/"', 'secrets = ["tunnel.key"]',
             'on_duplicate = "%s"' % on_duplicate]
    if status_allow is not None:
        lines.append("status_allow = [%s]" % ", ".join('"%s"' % n for n in status_allow))
    for agent_id, entry in agents.items():
        lines.append("[tunnels.agent.%s]" % agent_id)
        if entry.get("nickname"):
            lines.append('nickname = "%s"' % entry["nickname"])
        if entry.get("listen"):
            lines.append('listen = "127.0.0.1:%d"' % entry["listen"])
        if entry.get("token"):
            lines.append("token = true")
    path = directory / ("%s.toml" % name)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def connect_agent(server, agent_id, **kwargs):
    agent = ScriptedAgent(server.port, agent_id, token=agent_token(agent_id, SECRET), **kwargs)
    assert agent.status == 101, (agent.status, agent.body)
    wait_for(lambda: re.search(r"agent %s connected from" % re.escape(agent_id),
                               server.proc.log()), what="agent %s connected" % agent_id)
    return agent


def tcp_user(port, timeout=10.0):
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def send_and_read_to_eof(user, payload: bytes) -> bytes:
    """Send ``payload``, half-close, and return everything until the peer's EOF."""
    user.sendall(payload)
    user.shutdown(socket.SHUT_WR)
    received = b""
    while True:
        chunk = user.recv(65536)
        if not chunk:
            return received
        received += chunk


def recv_exactly(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "closed after %d of %d bytes" % (len(data), n)
        data += chunk
    return data


def echo_check(port, payload):
    with tcp_user(port) as user:
        assert send_and_read_to_eof(user, payload) == payload


def accept_queue(port: int) -> int:
    """Connections waiting in the kernel's accept queue of the listener on ``port``."""
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
                return int(fields[4].split(":")[1], 16)
    raise AssertionError("no listener on port %d" % port)


def eof_within(sock, seconds) -> float:
    """Seconds until the peer closed ``sock`` (fails after ``seconds``)."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - start


class Server:
    def __init__(self, proc, port, faces, config_path):
        self.proc = proc
        self.port = port
        self.faces = faces
        self.config_path = config_path


AGENTS = ("auth", "dup", "tcp", "gone", "bridge", "refusing", "ignoring", "timing", "absent",
          "bad", "good", "bulk", "limit", "burst", "status", "drain", "heap", "large",
          "wheap", "tail", "many", "reuse")


@pytest.fixture(scope="module")
def tunnel_server(module_websockify, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tunnels")
    faces = {agent_id: free_port() for agent_id in AGENTS}
    agents = {agent_id: {"listen": faces[agent_id], "token": True} for agent_id in AGENTS}
    agents["status"]["nickname"] = "Bus02"
    path = write_config(directory, agents)
    proc, port = module_websockify("--tunnel-config", path, "--workers", "1",
                                   "--connect-timeout", "1", "{port}", env=LIVENESS)
    return Server(SharedProcess(proc), port, faces, path)


@pytest.fixture
def server(tunnel_server):
    tunnel_server.proc.mark()
    return tunnel_server


@pytest.fixture
def echo_service():
    service = Service()
    yield service
    service.close()


# -- agents' upgrades ---------------------------------------------------------------

@pytest.mark.parametrize("case", ["wrong secret", "expired", "not yet valid", "over 31 days",
                                  "other ID", "no token", "not bearer", "bad alg"])
def test_agent_token_errors_are_401(server, case):
    now = int(time.time())
    token = {
        "wrong secret": agent_token("auth", OTHER_SECRET),
        "expired": hs256_token({"tid": "auth", "nbf": now - 7200, "exp": now - 3600}, SECRET),
        "not yet valid": hs256_token({"tid": "auth", "nbf": now + 3600, "exp": now + 7200},
                                     SECRET),
        "over 31 days": hs256_token({"tid": "auth", "nbf": now - 10,
                                     "exp": now - 10 + 31 * 86400 + 60}, SECRET),
        "other ID": agent_token("tcp", SECRET),
        "no token": None,
        "not bearer": None,
        "bad alg": hs256_token({"tid": "auth", "nbf": now - 10, "exp": now + 60}, SECRET,
                               alg="none"),
    }[case]
    extra = ("Authorization: Basic dXNlcjpwYXNz",) if case == "not bearer" else ()
    agent = ScriptedAgent(server.port, "auth", token=token, extra=extra)
    try:
        assert agent.status == 401, (agent.status, agent.body)
    finally:
        agent.close()
    server.proc.wait_log(r"refused .*/tunnel/auth.*: 401 agent auth: ")
    assert len(re.findall(r"refused .*/tunnel/auth", server.proc.log())) == 1


def test_unknown_agent_id_is_403(server):
    agent = ScriptedAgent(server.port, "nobody", token=agent_token("nobody", SECRET))
    assert agent.status == 403, (agent.status, agent.body)
    agent.close()
    server.proc.wait_log(r"refused .*/tunnel/nobody.*: 403 agent ID 'nobody' is not in")


def test_agent_without_the_subprotocol_is_400(server):
    from tests.tunnel_agent import upgrade
    sock, status, _, body = upgrade(server.port, "/tunnel/auth", agent_token("auth", SECRET),
                                    protocol="binary")
    sock.close()
    assert status == 400, body
    assert b"websockify-tunnel.v1" in body


def test_duplicate_agent_replaces_the_first(server, echo_service):
    first = connect_agent(server, "dup", service=echo_service.port)
    server.proc.mark()
    second = ScriptedAgent(server.port, "dup", token=agent_token("dup", SECRET),
                           service=echo_service.port)
    try:
        assert second.status == 101
        assert first.closed.wait(5)
        assert first.close_code == 1000, first.close_code
        line = server.proc.wait_log(r"agent dup: new connection from (\S+) replaces the one "
                                    r"from (\S+)")
        assert line.group(1) == "127.0.0.1:%d" % second.sock.getsockname()[1]
        assert line.group(2) == "127.0.0.1:%d" % first.sock.getsockname()[1]
        echo_check(server.faces["dup"], b"through the second link")
        assert second.opened and not first.opened
    finally:
        first.close()
        second.close()


# -- the TCP face ---------------------------------------------------------------------

def test_tcp_face_carries_bytes_both_ways(server, echo_service):
    agent = connect_agent(server, "tcp", service=echo_service.port)
    try:
        payload = pattern(3 * 1024 * 1024 + 17)
        echo_check(server.faces["tcp"], payload)
        echo_check(server.faces["tcp"], b"x")
        stream_id, meta = agent.opened[0]
        assert stream_id == 1
        assert meta["face"] == "tcp" and re.fullmatch(r"127\.0\.0\.1:\d+", meta["peer"])
    finally:
        agent.close()


def test_bytes_queued_for_a_slow_user_outlive_both_fins(server):
    """The user half-closes, the agent answers and ends, and both FINs are in
    while most of the answer still waits for the slow user: every byte arrives
    before the user's EOF (the mux forgetting the stream once both FINs are
    in must not drop what it already delivered)."""
    answer = pattern(240 * 1024 + 5)   # within the stream's first window (256 KiB)

    def answer_after_eof(conn):
        with conn:
            while conn.recv(65536):
                pass
            conn.sendall(answer)

    service = Service(answer_after_eof)
    agent = connect_agent(server, "drain", service=service.port)
    try:
        user = socket.socket()
        # A small receive buffer and small segments (the kernel sizes the server's
        # send buffer by them): most of the answer stays queued in the server.
        user.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        user.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        user.settimeout(10)
        user.connect(("127.0.0.1", server.faces["drain"]))
        with user:
            user.sendall(b"request")
            user.shutdown(socket.SHUT_WR)
            wait_for(lambda: agent.opened, what="the stream opened")
            stream_id = agent.opened[0][0]
            # The agent forgets the stream once it has sent its FIN after the server's.
            wait_for(lambda: not agent.conn.is_open(stream_id), what="the agent's FIN")
            agent.ping(b"all in!?")
            wait_for(lambda: b"all in!?" in agent.pongs, what="the server's PONG")
            received = bytearray()
            while True:
                chunk = user.recv(65536)
                if not chunk:
                    break
                received += chunk
        assert len(received) == len(answer)
        assert bytes(received) == answer
        server.proc.wait_log(r"-> agent drain: closed after 7 bytes to the agent, 245765 "
                             r"from it")
    finally:
        agent.close()
        service.close()


def test_tcp_user_while_agent_absent_is_closed_at_once(server):
    with tcp_user(server.faces["absent"]) as user:
        assert eof_within(user, 2.0) < 1.0
    server.proc.wait_log(r"agent absent is not connected; TCP user closed")


def test_agent_vanishing_mid_stream_closes_its_users(server, echo_service):
    agent = connect_agent(server, "gone", service=echo_service.port)
    try:
        with tcp_user(server.faces["gone"]) as user:
            user.sendall(b"ping")
            assert user.recv(4) == b"ping"
            agent.respond = False          # silent from now on: no pongs, no data
            assert eof_within(user, DEAD_AFTER + 3.0) < DEAD_AFTER + 2.0
        server.proc.wait_log(r"agent gone \(127\.0\.0\.1:\d+\): no message for 1 s: the agent "
                             r"is dead")
    finally:
        agent.close()


def test_malformed_mux_frame_closes_that_agent_with_1002(server, echo_service):
    good = connect_agent(server, "good", service=echo_service.port)
    bad = connect_agent(server, "bad", service=echo_service.port)
    try:
        server.proc.mark()
        bad.send_message(struct.pack("!BIH", 0x42, 0, 0))
        assert bad.closed.wait(5)
        assert bad.close_code == 1002
        server.proc.wait_log(r"agent bad \(127\.0\.0\.1:\d+\): protocol error: .*closing 1002")
        assert len(re.findall("protocol error", server.proc.log())) == 1
        echo_check(server.faces["good"], b"still here")
        assert not good.closed.is_set()
    finally:
        good.close()
        bad.close()


def test_stalled_user_beside_a_bulk_transfer(server):
    size = 32 * 1024 * 1024

    def source(conn):
        with conn:
            try:
                conn.sendall(pattern(size))
            except OSError:
                pass

    service = Service(source)
    agent = connect_agent(server, "bulk", service=service.port)
    try:
        stalled = tcp_user(server.faces["bulk"])
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        wait_for(lambda: len(agent.opened) == 1, what="the stalled stream opened")
        worker = children_of(server.proc.pid)[0]
        before = rss_kib(worker)
        with tcp_user(server.faces["bulk"], timeout=30) as bulk:
            received = bytearray()
            start = time.monotonic()
            while True:
                chunk = bulk.recv(1 << 20)
                if not chunk:
                    break
                received += chunk
            elapsed = time.monotonic() - start
        assert len(received) == size and bytes(received) == pattern(size)
        assert elapsed < 20, elapsed
        # The stalled stream holds at most its window: the worker did not
        # keep the 32 MiB the service offered it.
        grown = rss_kib(worker) - before
        assert grown < 12 * 1024, grown
        # The stalled user is still connected and gets its bytes once it reads.
        stalled.settimeout(10)
        assert stalled.recv(1000) == pattern(1000)
        stalled.close()
    finally:
        agent.close()
        service.close()


def test_a_thousand_opens_at_once_against_the_stream_limit(server, echo_service):
    agent = connect_agent(server, "limit", service=echo_service.port)
    users = []
    try:
        for _ in range(1000):
            users.append(tcp_user(server.faces["limit"], timeout=20))
        served = closed = 0
        for index, user in enumerate(users):
            try:
                data = send_and_read_to_eof(user, b"%d" % index)
            except OSError:         # refused past the limit: closed, maybe reset
                data = b""
            if data:
                assert data == b"%d" % index
                served += 1
            else:
                closed += 1
        assert served + closed == 1000
        # At most max_streams at once; past max_pending_opens a burst is refused.
        assert 64 <= served <= 256, served
        # The agent is untouched and serves the next user.
        assert not agent.closed.is_set()
        echo_check(server.faces["limit"], b"after the storm")
    finally:
        for user in users:
            user.close()
        agent.close()


def test_a_burst_past_the_unanswered_opens_limit_waits_and_is_served(server, echo_service):
    """200 users at once while the agent answers nothing: 64 OPENs go out (the
    limit of unanswered opens), the other users wait, none is refused; once the
    agent answers, every one of them is served, in arrival order."""
    agent = connect_agent(server, "burst", service=echo_service.port, on_open="hold")
    users = []
    try:
        for _ in range(200):
            users.append(tcp_user(server.faces["burst"], timeout=20))
        wait_for(lambda: len(agent.opened) >= 64, what="64 opens at the agent")
        # Every user has been accepted from the face's listener by now ...
        wait_for(lambda: accept_queue(server.faces["burst"]) == 0, what="all users accepted")
        # ... and still no 65th OPEN: the others wait for an answer.
        with agent.lock:
            assert len(agent.opened) == 64
            agent.release()
        for index, user in enumerate(users):
            assert send_and_read_to_eof(user, b"user %d" % index) == b"user %d" % index
        ids = [stream_id for stream_id, _ in agent.opened]
        assert len(ids) == 200 and ids == sorted(ids)
        assert "stream refused" not in server.proc.log()
    finally:
        for user in users:
            user.close()
        agent.close()


# -- the bridge face --------------------------------------------------------------------

def test_bridge_face_agent_absent_is_503(server):
    ws = RawWebSocket(server.port, path="/?token=absent")
    assert ws.status == 503, ws.buffer
    ws.close()


@pytest.mark.parametrize("agent_id,on_open,status", [("refusing", "refuse", 502),
                                                      ("timing", "timeout", 504),
                                                      ("ignoring", "ignore", 504)])
def test_bridge_face_refusals(server, agent_id, on_open, status):
    agent = connect_agent(server, agent_id, on_open=on_open)
    try:
        start = time.monotonic()
        ws = RawWebSocket(server.port, path="/?token=%s" % agent_id)
        assert ws.status == status, ws.buffer
        ws.close()
        if on_open == "ignore":
            assert 0.9 < time.monotonic() - start < 3.0
    finally:
        agent.close()


def test_bridge_face_session_end_to_end(server, echo_service):
    agent = connect_agent(server, "bridge", service=echo_service.port)
    try:
        ws = RawWebSocket(server.port, path="/websockify?token=bridge")
        assert ws.status == 101, ws.buffer
        assert ws.headers.get("sec-websocket-protocol") == "binary"
        payload = pattern(200000)
        ws.send_binary(payload)
        assert ws.recv_data(len(payload)) == payload
        ws.send(0x8, struct.pack("!H", 1000))
        assert ws.expect_close()[0] == 1000
        ws.close()
        assert agent.opened[0][1]["face"] == "bridge"
    finally:
        agent.close()


# -- status -------------------------------------------------------------------------------

def _get(port, path, accept=None):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        lines = ["GET %s HTTP/1.1" % path, "Host: 127.0.0.1"]
        if accept:
            lines.append("Accept: %s" % accept)
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return read_http_response(sock)


def test_status_json_exact_fields(server, echo_service):
    agent = connect_agent(server, "status", service=echo_service.port)
    try:
        echo_check(server.faces["status"], b"12345")
        def published():
            document = json.loads(_get(server.port, "/tunnel/", "application/json")[2])
            row = [a for a in document["agents"] if a["id"] == "status"][0]
            return row["bytes_to_agent"] == 5 and row["open_streams"] == 0

        wait_for(published, what="the figures published")
        status, headers, body = _get(server.port, "/tunnel/", "application/json")
        assert status == 200 and headers["content-type"] == "application/json"
        document = json.loads(body)
        assert sorted(document) == ["agents", "http_path", "now", "path", "version"]
        assert [a["id"] for a in document["agents"]] == sorted(AGENTS)
        row = [a for a in document["agents"] if a["id"] == "status"][0]
        assert sorted(row) == sorted(["id", "nickname", "connected", "peer", "connected_since",
                                      "reconnects", "open_streams", "bytes_to_agent",
                                      "bytes_from_agent", "token_expires", "worker", "listen",
                                      "bridge", "open", "faces", "viewers", "requests"])
        assert row["nickname"] == "Bus02" and row["connected"] is True
        assert row["peer"] == "127.0.0.1:%d" % agent.sock.getsockname()[1]
        assert row["open_streams"] == 0 and row["reconnects"] == 0, row
        assert (row["bytes_to_agent"], row["bytes_from_agent"]) == (5, 5)
        assert abs(row["token_expires"] - (time.time() + 3600)) < 30
        assert abs(row["connected_since"] - time.time()) < 30
        assert row["listen"] == "127.0.0.1:%d" % server.faces["status"] and row["bridge"]
        assert row["faces"] == {"tcp": row["listen"], "bridge": "?token=status", "http": None}
        assert (row["open"], row["viewers"], row["requests"]) == (False, 0, 0)
        absent = [a for a in document["agents"] if a["id"] == "absent"][0]
        assert absent["connected"] is False and absent["peer"] is None
        status, headers, body = _get(server.port, "/tunnel/")
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert b"<td>status</td><td>Bus02</td><td>-</td><td>tcp 127.0.0.1:" in body
    finally:
        agent.close()


# -- servers of their own ------------------------------------------------------------------

def test_duplicate_refused_with_409_across_workers(websockify, tmp_path, echo_service):
    path = write_config(tmp_path, {"one": {"listen": free_port()}}, on_duplicate="refuse",
                        status_allow=["10.0.0.0/8"])
    proc, port = websockify("--tunnel-config", path, "--workers", "2", "{port}", env=LIVENESS)
    server = Server(proc, port, {}, path)
    first = connect_agent(server, "one", service=echo_service.port)
    try:
        for _ in range(6):      # whichever worker each lands on
            again = ScriptedAgent(port, "one", token=agent_token("one", SECRET))
            assert again.status == 409, (again.status, again.body)
            again.close()
        assert not first.closed.is_set()
        assert _get(port, "/tunnel/")[0] == 403
    finally:
        first.close()


def test_user_on_the_other_worker_is_handed_over(websockify, tmp_path, echo_service):
    face = free_port()
    path = write_config(tmp_path, {"far": {"listen": face, "token": True}})
    proc, port = websockify("-v", "--tunnel-config", path, "--workers", "2", "{port}",
                            env=LIVENESS)
    server = Server(proc, port, {"far": face}, path)
    agent = connect_agent(server, "far", service=echo_service.port)
    try:
        for index in range(40):
            echo_check(face, b"user %d" % index)
        for index in range(20):
            ws = RawWebSocket(port, path="/?token=far")
            assert ws.status == 101, ws.buffer
            ws.send_binary(b"bridge %d" % index)
            assert ws.recv_data(len(b"bridge %d" % index)) == b"bridge %d" % index
            ws.close()
        log = proc.log()
        holder = re.search(r"agent far connected from \S+ \(worker (\d)\)", log).group(1)
        assert re.search(r"agent far: user handed to worker pid \d+", log), log
        assert re.search(r"agent far: request handed to worker pid \d+", log), log
        assert len(agent.opened) == 60
        assert holder in ("1", "2")
    finally:
        agent.close()


def test_hup_removes_a_connected_agent_and_keeps_the_others(websockify, tmp_path,
                                                             echo_service):
    faces = {"kept": free_port(), "removed": free_port()}
    agents = {agent_id: {"listen": port} for agent_id, port in faces.items()}
    path = write_config(tmp_path, agents)
    proc, port = websockify("--tunnel-config", path, "--workers", "1",
                            "--graceful-timeout", "20", "{port}", env=LIVENESS)
    server = Server(proc, port, faces, path)
    kept = connect_agent(server, "kept", service=echo_service.port)
    removed = connect_agent(server, "removed", service=echo_service.port)
    added_face = free_port()
    try:
        with tcp_user(faces["kept"]) as user:
            user.sendall(b"before")
            assert user.recv(6) == b"before"
            write_config(tmp_path, {"kept": {"listen": faces["kept"]},
                                    "added": {"listen": added_face}})
            proc.signal(signal.SIGHUP)
            assert removed.closed.wait(10)
            assert removed.close_code == 1008
            proc.wait_log(r"agent removed: removed from the configuration; closing its tunnel")
            proc.wait_log(r"reload done")
            wait_for(lambda: _refused(faces["removed"]), what="the removed face closed")
            # The kept agent's open stream carries on in the draining worker.
            user.sendall(b"after")
            assert user.recv(5) == b"after"
            assert not kept.closed.is_set()
        # Its last stream over, the kept agent is sent to the new workers.
        assert kept.closed.wait(10)
        assert kept.close_code == 1001
        kept_again = connect_agent(server, "kept", service=echo_service.port)
        echo_check(faces["kept"], b"on a new worker")
        kept_again.close()
        added = connect_agent(server, "added", service=echo_service.port)
        echo_check(added_face, b"new face")
        added.close()
    finally:
        kept.close()
        removed.close()


def _refused(port) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_listen_port_in_use_stops_the_start(websockify, tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        path = write_config(tmp_path, {"x": {"listen": busy.getsockname()[1]}})
        proc, _ = websockify("--tunnel-config", path, "{port}", wait=False)
        assert proc.wait(15) == 5
        lines = [line for line in proc.log().splitlines() if "tunnels.toml" in line]
        assert len(lines) == 1 and re.search(r"agent x: cannot listen on 127\.0\.0\.1 port "
                                             r"\d+: Address already in use", lines[0]), \
            proc.log()
    finally:
        busy.close()


def test_tls_agent_by_client_certificate_and_tls_hand_off(websockify, tmp_path, pki,
                                                         echo_service):
    import ssl
    path = write_config(tmp_path, {"alice": {"token": True}})
    proc, port = websockify("-v", "--cert", pki.server.pem, "--verify-client", "--cafile",
                            pki.ca.cert, "--tunnel-config", path, "--workers", "2", "{port}",
                            env=LIVENESS)
    server = Server(proc, port, {}, path)

    def context(cert):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(pki.ca.cert)
        ctx.load_cert_chain(cert.cert, cert.key)
        return ctx

    impostor = ScriptedAgent(port, "alice", ssl_context=context(pki.bob))
    assert impostor.status == 401, impostor.body
    assert b"client certificate CN 'bob' is not the agent ID" in impostor.body
    impostor.close()
    agent = ScriptedAgent(port, "alice", service=echo_service.port,
                          ssl_context=context(pki.alice))
    assert agent.status == 101, agent.body
    try:
        proc.wait_log(r"agent alice connected from")
        for index in range(16):
            ws = RawWebSocket(port, path="/?token=alice", ssl_context=context(pki.bob))
            assert ws.status == 101, ws.buffer
            payload = pattern(70000 + index)
            ws.send_binary(payload)
            assert ws.recv_data(len(payload)) == payload
            ws.send(0x8, struct.pack("!H", 1000))
            assert ws.expect_close()[0] == 1000
            ws.close()
        assert re.search(r"agent alice: TLS request handed to worker pid \d+ through a "
                         r"socketpair", proc.log()), proc.log()
        assert len(agent.opened) == 16
    finally:
        agent.close()


# -- the real websockify-agent ---------------------------------------------------------------

def start_real_agent(processes, tmp_path, server, agent_id, service_port, *extra):
    server.proc.mark()
    proc = agent_process(processes, tmp_path, server.port, agent_id, service_port, SECRET,
                         *extra)
    server.proc.wait_log(r"agent %s connected from" % re.escape(agent_id))
    return proc


def test_real_agent_tcp_face_and_bridge_session(tunnel_server, processes, tmp_path,
                                                echo_service):
    server = tunnel_server
    start_real_agent(processes, tmp_path, server, "tcp", echo_service.port)
    payload = pattern(2 * 1024 * 1024 + 3)
    echo_check(server.faces["tcp"], payload)
    start_real_agent(processes, tmp_path, server, "bridge", echo_service.port)
    # A noVNC-style session: binary subprotocol, ?token=<ID>, messages both ways.
    bridge_echoes(server.port, "bridge")


def minor_faults(pid: int) -> int:
    with open("/proc/%d/stat" % pid) as handle:
        return int(handle.read().rpartition(")")[2].split()[7])


def faults_over_a_download(processes, tmp_path, server, agent_id, pid_of) -> int:
    """Minor page faults of process ``pid_of(agent)`` while a user downloads 64 MiB
    from an endless service through a real agent (after 16 MiB of warm-up)."""
    block = pattern(1024 * 1024)

    def source(conn):
        with conn:
            try:
                while True:
                    conn.sendall(block)
            except OSError:
                pass                    # the user went away

    service = Service(source)
    try:
        agent = start_real_agent(processes, tmp_path, server, agent_id, service.port)
        pid = pid_of(agent)
        with tcp_user(server.faces[agent_id]) as user:
            def read(size):
                left = size
                while left:
                    chunk = user.recv(min(left, 1 << 20))
                    assert chunk, "the download ended early"
                    left -= len(chunk)

            read(16 << 20)              # the heap has grown to its working size
            before = minor_faults(pid)
            read(64 << 20)
            return minor_faults(pid) - before
    finally:
        service.close()


def test_real_agent_carries_more_bulk_streams_than_in_place_buffers(tunnel_server, processes,
                                                                   tmp_path):
    """Four users download 12 MiB each at once through one real agent, which has two
    in-place buffers (agent/transport.py IN_PLACE_BUFFERS): the streams that find
    none free read through the mux's queue, and every user gets exactly its own
    bytes, in order; an echo user beside them is answered too."""
    import hashlib
    import threading
    from websockify.agent.transport import IN_PLACE_BUFFERS
    users = IN_PLACE_BUFFERS + 2
    block = pattern(1024 * 1024)
    size = 12 * len(block)

    def body(k):
        turned = block[k * 4099:] + block[:k * 4099]
        return turned * (size // len(turned))

    def source(conn):
        # The first byte names the body; an "e" asks for an echo of 5 bytes instead.
        with conn:
            first = conn.recv(1)
            if first == b"e":
                conn.sendall(recv_exactly(conn, 5))
                return
            conn.sendall(body(first[0]))

    service = Service(source)
    try:
        start_real_agent(processes, tmp_path, tunnel_server, "many", service.port)
        digests = {}

        def download(k):
            with tcp_user(tunnel_server.faces["many"], timeout=60) as user:
                user.sendall(bytes([k]))
                digest, got = hashlib.sha256(), 0
                while True:
                    chunk = user.recv(1 << 20)
                    if not chunk:
                        break
                    digest.update(chunk)
                    got += len(chunk)
                digests[k] = (got, digest.hexdigest())

        threads = [threading.Thread(target=download, args=(k,)) for k in range(users)]
        for thread in threads:
            thread.start()
        with tcp_user(tunnel_server.faces["many"]) as echo:
            echo.sendall(b"ehello")
            assert recv_exactly(echo, 5) == b"hello"
        for thread in threads:
            thread.join(90)
        assert digests == {k: (size, hashlib.sha256(body(k)).hexdigest())
                           for k in range(users)}
    finally:
        service.close()


def test_a_stalled_user_keeps_its_bytes_while_the_read_buffer_is_reused(tunnel_server,
                                                                        processes, tmp_path):
    """The worker writes DATA to users straight from its one read buffer
    (tunnel/link.py, Link.keep): what a stalled user's socket does not take is
    copied before the next read.  One user stops reading while another
    downloads 24 MiB through the same real agent (many reads of that buffer);
    then the first reads on, and both get exactly their own bytes."""
    import hashlib
    import threading
    block = pattern(1024 * 1024)
    sizes = {0: 2 * len(block), 1: 24 * len(block)}

    def body(k):
        turned = block[k * 4099:] + block[:k * 4099]
        return turned * (sizes[k] // len(turned))

    def source(conn):
        with conn:
            k = conn.recv(1)[0]
            try:
                conn.sendall(body(k))
            except OSError:
                pass

    def read_all(user):
        digest, got = hashlib.sha256(), 0
        while True:
            chunk = user.recv(1 << 20)
            if not chunk:
                return got, digest.hexdigest()
            digest.update(chunk)
            got += len(chunk)

    service = Service(source)
    try:
        start_real_agent(processes, tmp_path, tunnel_server, "reuse", service.port)
        stalled = tcp_user(tunnel_server.faces["reuse"], timeout=60)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        with stalled:
            stalled.sendall(b"\x00")
            first = recv_exactly(stalled, 1000)      # its stream is flowing, then it stalls
            results = {}

            def bulk():
                with tcp_user(tunnel_server.faces["reuse"], timeout=60) as user:
                    user.sendall(b"\x01")
                    results[1] = read_all(user)

            thread = threading.Thread(target=bulk)
            thread.start()
            thread.join(90)
            assert results.get(1) == (sizes[1], hashlib.sha256(body(1)).hexdigest())
            assert first == body(0)[:1000]
            # Read on with a receive buffer that no longer slows the rest.
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            assert read_all(stalled) == (sizes[0] - 1000,
                                         hashlib.sha256(body(0)[1000:]).hexdigest())
    finally:
        service.close()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                    reason="the agent's allocator settings are glibc's (mallopt)")
def test_real_agent_reads_its_service_without_page_faults(tunnel_server, processes, tmp_path):
    """The agent's 1 MiB service reads stay on the heap (websockify/allocator.py):
    with glibc's defaults each read could map fresh pages (30 to 180 minor faults
    per MiB measured); now a download costs the agent under 32 per MiB."""
    faults = faults_over_a_download(processes, tmp_path, tunnel_server, "heap",
                                    lambda agent: agent.proc.pid)
    assert faults < 32 * 64, "%d minor faults for 64 MiB" % faults


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                    reason="the tunnel worker's allocator settings are glibc's (mallopt)")
def test_tunnel_worker_carries_a_download_without_page_faults(tunnel_server, processes,
                                                               tmp_path):
    """What one read of an agent brings a user is written in one system call, so
    the worker holds up to a read's worth of messages at once: with glibc's
    defaults freeing them trimmed the heap under the next read (about 200 minor
    faults per MiB measured); with the allocator settings tunnel workers take
    (websockify/allocator.py) a download costs the worker under 16 per MiB."""
    faults = faults_over_a_download(processes, tmp_path, tunnel_server, "wheap",
                                    lambda agent: children_of(tunnel_server.proc.pid)[0])
    assert faults < 16 * 64, "%d minor faults for 64 MiB" % faults


def test_real_agent_service_refusing_is_502(tunnel_server, processes, tmp_path):
    closed = free_port()        # nothing listens there
    start_real_agent(processes, tmp_path, tunnel_server, "refusing", closed)
    ws = RawWebSocket(tunnel_server.port, path="/?token=refusing")
    assert ws.status == 502, ws.buffer
    ws.close()


def test_real_agent_frozen_mid_stream_closes_its_users(tunnel_server, processes, tmp_path,
                                                       echo_service):
    server = tunnel_server
    agent = start_real_agent(processes, tmp_path, server, "gone", echo_service.port)
    with tcp_user(server.faces["gone"]) as user:
        user.sendall(b"hello")
        assert user.recv(5) == b"hello"
        agent.signal(signal.SIGSTOP)       # vanished: no FIN, no pong, nothing
        try:
            assert eof_within(user, DEAD_AFTER + 3.0) < DEAD_AFTER + 2.0
        finally:
            agent.signal(signal.SIGCONT)


@pytest.mark.parametrize("what,message", [
    ("unknown type", struct.pack("!BIH", 0x42, 0, 0)),
    ("oversized DATA", struct.pack("!BIH", 3, 1, 16385) + b"x" * 16385),
    ("stream never opened", struct.pack("!BIH", 3, 99, 1) + b"x"),
    ("OPEN from the agent", struct.pack("!BIH", 1, 2, 2) + b"{}"),
    ("truncated header", b"\x03\x00\x00"),
    ("text message", None),
])
def test_malformed_mux_input_variants(server, what, message):
    bad = connect_agent(server, "bad")
    try:
        server.proc.mark()
        if message is None:
            bad.send_raw(mask_frame(0x1, b"hello"))
        else:
            bad.send_message(message)
        assert bad.closed.wait(5), what
        assert bad.close_code == 1002, (what, bad.close_code, bad.close_reason)
        server.proc.wait_log(r"agent bad \(127\.0\.0\.1:\d+\): protocol error: .*closing 1002")
    finally:
        bad.close()


def accept_held(agent) -> int:
    """A "hold" agent's next open: accepted, OPEN_OK sent; its stream id."""
    wait_for(lambda: agent.held, what="the open")
    with agent.lock:
        stream_id = agent.held.pop()
        agent.conn.accept_stream(stream_id)
        agent._flush()
    return stream_id


def test_the_server_takes_the_messages_its_101_announces(server):
    """The 101 says X-Websockify-Max-Message: 262256 (sixteen full DATA frames): a
    message that size is carried; one byte more is 1009 for that agent only."""
    agent = connect_agent(server, "large", on_open="hold", max_message=262256)
    bystander = connect_agent(server, "good")
    try:
        assert agent.headers.get("x-websockify-max-message") == "262256"
        payload = bytes(range(256)) * 1024          # the 256 KiB default window
        with tcp_user(server.faces["large"]) as user:
            stream_id = accept_held(agent)
            with agent.lock:
                assert agent.conn.send_data(stream_id, payload) == len(payload)
                messages = agent.conn.data_to_send()
                # The whole window in one message of the announced size.
                assert [len(m) for m in messages] == [262256]
                agent.sock.sendall(mask_frame(0x2, messages[0]))
            got = bytearray()
            while len(got) < len(payload):
                chunk = user.recv(65536)
                assert chunk, "the user's stream ended early"
                got += chunk
            assert bytes(got) == payload
        agent.send_message(b"\x09" * 262257)         # a GOAWAY-typed byte string, too long
        assert agent.closed.wait(5)
        assert agent.close_code == 1009, (agent.close_code, agent.close_reason)
        server.proc.wait_log(r"agent large \(127\.0\.0\.1:\d+\): protocol error: .*closing 1009")
        assert not bystander.closed.is_set()
    finally:
        agent.close()
        bystander.close()


def test_data_before_a_reset_in_one_message_reaches_the_user(server):
    """DATA then RESET in one message: the user gets the bytes, then the end (the
    server writes a read's data at the read's end, and a reset flushes it first)."""
    agent = connect_agent(server, "tail", on_open="hold")
    try:
        with tcp_user(server.faces["tail"]) as user:
            stream_id = accept_held(agent)
            body = b"last words before the reset\n" * 100
            agent.send_message(struct.pack("!BIH", 3, stream_id, len(body)) + body
                               + struct.pack("!BIHH", 6, stream_id, 2, 1))
            got = bytearray()
            while True:
                try:
                    chunk = user.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                got += chunk
            assert bytes(got) == body
    finally:
        agent.close()


def test_bridge_token_found_as_novnc_sends_it(server, echo_service):
    agent = connect_agent(server, "bridge", service=echo_service.port)
    try:
        for path, extra in (("/?path=websockify?token=bridge", ()),
                            ("/websockify", ("Cookie: token=bridge",))):
            ws = RawWebSocket(server.port, path=path, extra=extra)
            assert ws.status == 101, (path, ws.buffer)
            ws.send_binary(b"novnc")
            assert ws.recv_data(5) == b"novnc"
            ws.close()
    finally:
        agent.close()


def test_token_plugin_and_bridge_face_side_by_side(websockify, tmp_path, echo_service):
    other = Service()
    tokens = tmp_path / "tokens.cfg"
    tokens.write_text("plug: 127.0.0.1:%d\nboth: 127.0.0.1:%d\n" % (other.port, other.port))
    path = write_config(tmp_path, {"tun": {"token": True}, "both": {"token": True}})
    proc, port = websockify("--tunnel-config", path, "--token-plugin", "TokenFile",
                            "--token-source", str(tokens), "--workers", "1", "{port}",
                            env=LIVENESS)
    server = Server(proc, port, {}, path)
    tun = connect_agent(server, "tun", service=echo_service.port)
    both = connect_agent(server, "both", service=echo_service.port)
    try:
        for token in ("tun", "plug", "both"):
            ws = RawWebSocket(port, path="/?token=%s" % token)
            assert ws.status == 101, (token, ws.buffer)
            ws.send_binary(token.encode())
            assert ws.recv_data(len(token)) == token.encode()
            ws.close()
        # The plugin knows "both": it wins, the agent saw no stream.
        assert len(tun.opened) == 1 and both.opened == []
        wait_for(lambda: other.accepted == 2, what="two plugin sessions")
    finally:
        tun.close()
        both.close()
        other.close()


def test_reverse_websockify_config_with_client_certificates(websockify, tmp_path, pki,
                                                             echo_service):
    import ssl
    face = free_port()
    path = tmp_path / "config.toml"
    path.write_text('http_server_endpoint = "127.0.0.1:39000"\n'
                    '[remote_service.alice]\nnickname = "Bus02"\n'
                    'local_listen_endpoint = "127.0.0.1:%d"\n' % face)
    proc, port = websockify("--cert", pki.server.pem, "--verify-client", "--cafile",
                            pki.ca.cert, "--tunnel-config", str(path), "--workers", "1",
                            "{port}", env=LIVENESS)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca.cert)
    ctx.load_cert_chain(pki.alice.cert, pki.alice.key)
    agent = ScriptedAgent(port, "alice", path="/forward_to_me/", service=echo_service.port,
                          ssl_context=ctx)
    try:
        assert agent.status == 101, agent.body
        proc.wait_log(r"agent alice connected from")
        echo_check(face, pattern(100000))
    finally:
        agent.close()


def test_worker_death_frees_its_agents(websockify, tmp_path, echo_service):
    face = free_port()
    path = write_config(tmp_path, {"w": {"listen": face}})
    proc, port = websockify("--tunnel-config", path, "--workers", "2", "{port}", env=LIVENESS)
    server = Server(proc, port, {"w": face}, path)
    agent = connect_agent(server, "w", service=echo_service.port)
    holder = int(re.search(r"\[(\d+)\] INFO agent w connected from", proc.log()).group(1))
    os.kill(holder, signal.SIGKILL)
    proc.wait_log(r"agent w: its worker \(pid %d\) exited; the agent must reconnect" % holder)
    assert agent.closed.wait(5)
    document = json.loads(_get(port, "/tunnel/", "application/json")[2])
    assert document["agents"][0]["connected"] is False
    with tcp_user(face) as user:
        assert eof_within(user, 3.0) < 2.0
    again = connect_agent(server, "w", service=echo_service.port)
    try:
        wait_for(lambda: _echoes(face), what="the TCP face served again")
    finally:
        again.close()


def _echoes(port) -> bool:
    try:
        echo_check(port, b"again")
        return True
    except AssertionError:
        return False


def test_replace_across_workers(websockify, tmp_path, echo_service):
    face = free_port()
    path = write_config(tmp_path, {"r": {"listen": face}})
    proc, port = websockify("--tunnel-config", path, "--workers", "2", "{port}", env=LIVENESS)
    server = Server(proc, port, {"r": face}, path)
    agents = [connect_agent(server, "r", service=echo_service.port)]
    try:
        for _ in range(30):
            if len(set(re.findall(r"\[(\d+)\] INFO agent r connected from", proc.log()))) == 2 \
                    and len(agents) >= 4:
                break
            agents.append(ScriptedAgent(port, "r", token=agent_token("r", SECRET),
                                        service=echo_service.port))
            assert agents[-1].status == 101
            assert agents[-2].closed.wait(5)
            assert agents[-2].close_code == 1000
            wait_for(lambda: _echoes(face), what="the TCP face through the newest link")
            assert not agents[-1].closed.is_set()
        pids = set(re.findall(r"\[(\d+)\] INFO agent r connected from", proc.log()))
        assert len(pids) == 2, "all %d links landed on one worker" % len(agents)
    finally:
        for agent in agents:
            agent.close()


def test_auth_plugin_judges_bridge_face_sessions(websockify, tmp_path, echo_service):
    path = write_config(tmp_path, {"o": {"token": True}})
    proc, port = websockify("--tunnel-config", path, "--auth-plugin", "ExpectOrigin",
                            "--auth-source", "https://good.example", "--workers", "1",
                            "{port}", env=LIVENESS)
    server = Server(proc, port, {}, path)
    agent = connect_agent(server, "o", service=echo_service.port)    # agents: their token
    try:
        ws = RawWebSocket(port, path="/?token=o", extra=("Origin: https://evil.example",))
        assert ws.status == 403, ws.buffer
        ws.close()
        ws = RawWebSocket(port, path="/?token=o", extra=("Origin: https://good.example",))
        assert ws.status == 101, ws.buffer
        ws.send_binary(b"ok")
        assert ws.recv_data(2) == b"ok"
        ws.close()
        assert len(agent.opened) == 1
    finally:
        agent.close()


def test_tcp_user_whose_open_goes_unanswered_is_closed(server):
    agent = connect_agent(server, "ignoring", on_open="ignore")
    try:
        with tcp_user(server.faces["ignoring"]) as user:
            took = eof_within(user, 5.0)
        assert 0.9 < took < 3.0, took         # --connect-timeout 1
        wait_for(lambda: agent.resets and agent.resets[-1][1] == 3, what="RESET TIMEOUT")
    finally:
        agent.close()


def test_agent_closing_its_tunnel_closes_its_users(server, echo_service):
    agent = connect_agent(server, "gone", service=echo_service.port)
    with tcp_user(server.faces["gone"]) as user:
        user.sendall(b"x")
        assert user.recv(1) == b"x"
        agent.send_raw(mask_frame(0x8, struct.pack("!H", 1001) + b"agent stopping"))
        assert eof_within(user, 3.0) < 1.0
    server.proc.wait_log(r"agent gone \(127\.0\.0\.1:\d+\): agent closed the tunnel "
                         r"\(1001 agent stopping\)")
    agent.close()


def test_agents_and_browsers_under_the_root_path(websockify, tmp_path, echo_service):
    path = write_config(tmp_path, {"a": {"token": True}})
    text = open(path).read().replace('path = "/tunnel/"', 'path = "/"')
    open(path, "w").write(text)
    proc, port = websockify("--tunnel-config", path, "--workers", "1", "{port}", env=LIVENESS)
    server = Server(proc, port, {}, path)
    agent = ScriptedAgent(port, "a", token=agent_token("a", SECRET), path="/",
                          service=echo_service.port)
    try:
        assert agent.status == 101, agent.body
        ws = RawWebSocket(port, path="/websockify?token=a")
        assert ws.status == 101, ws.buffer
        ws.send_binary(b"root")
        assert ws.recv_data(4) == b"root"
        ws.close()
        assert _get(port, "/", "application/json")[0] == 200
    finally:
        agent.close()


def test_real_agent_over_wss_with_its_client_certificate(websockify, processes, tmp_path,
                                                         pki, echo_service):
    """reverse_websockify's deployment (config.toml, mTLS) with both ends ours."""
    from tests.helpers import PYTHON
    face = free_port()
    path = tmp_path / "config.toml"
    path.write_text('[remote_service.alice]\nnickname = "Bus02"\n'
                    'local_listen_endpoint = "127.0.0.1:%d"\n' % face)
    proc, port = websockify("--cert", pki.server.pem, "--verify-client", "--cafile",
                            pki.ca.cert, "--tunnel-config", str(path), "--workers", "1",
                            "{port}", env=LIVENESS)
    processes([PYTHON, "-m", "websockify.agent", "--service", "127.0.0.1:%d" % echo_service.port,
               "--server", "wss://127.0.0.1:%d/forward_to_me/alice" % port,
               "--client-cert", pki.alice.cert, "--client-key", pki.alice.key,
               "--ca-cert", pki.ca.cert], name="agent-alice")
    proc.wait_log(r"agent alice connected from")
    echo_check(face, pattern(1024 * 1024 + 1))
