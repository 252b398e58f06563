"""websockify-agent as a process: its handshake, TLS, tokens, streams, reconnects.

The server side is a real listener in the test speaking the rendezvous'
half with the pure protocol pieces (tests/tunnel_peer.py); the service is
a real TCP listener in the test.
"""

import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest

from tests.helpers import PYTHON, free_port, ipv6_available, wait_for
from tests.tunnel_peer import PeerListener
from websockify.protocol import mux
from websockify.protocol.frames import OP_CLOSE, close_payload, encode_frame

AGENT = [PYTHON, "-m", "websockify.agent"]


@pytest.fixture
def peer():
    listener = PeerListener()
    yield listener
    listener.close()


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "agent.token"
    path.write_text("token-one\n")
    return str(path)


def start_agent(processes, server, *args, service=None, **kwargs):
    argv = AGENT + ["--service", service or "127.0.0.1:%d" % free_port(),
                    "--server", server, "--max-retry-delay", "1"] + [str(a) for a in args]
    return processes(argv, name="agent", **kwargs)


class Service:
    """A TCP service in a thread: each connection gets ``greeting``, then
    what it sends is echoed until it half-closes; the service then closes."""

    def __init__(self, greeting=b""):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.greeting = greeting
        self.received = []          # per connection, all bytes it sent
        self.ended = 0              # connections closed
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn):
        got = bytearray()
        self.received.append(got)
        with conn:
            if self.greeting:
                conn.sendall(self.greeting)
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                got.extend(data)
                try:
                    conn.sendall(data)
                except OSError:
                    break
        self.ended += 1

    def close(self):
        self.sock.close()


@pytest.fixture
def service():
    svc = Service(greeting=b"hello from the service\n")
    yield svc
    svc.close()


def url(peer, agent_id="bus-02", scheme="ws"):
    return "%s://127.0.0.1:%d/tunnel/%s" % (scheme, peer.port, agent_id)


# -- the handshake ------------------------------------------------------------

def test_the_upgrade_carries_the_token_and_the_subprotocol(processes, peer, token_file):
    agent = start_agent(processes, url(peer), "--token-file", token_file)
    conn = peer.accept()
    assert (conn.method, conn.path, conn.version) == ("GET", "/tunnel/bus-02", "HTTP/1.1")
    assert conn.headers.get("authorization") == "Bearer token-one"
    assert conn.headers.get("sec-websocket-protocol") == "websockify-tunnel.v1"
    assert conn.headers.get("host") == "127.0.0.1:%d" % peer.port
    assert conn.headers.get("sec-websocket-version") == "13"
    conn.upgrade()
    agent.wait_log(r"connected to ws://127\.0\.0\.1:%d/tunnel/bus-02: tunnel up" % peer.port)
    log = agent.log()
    assert log.count("the server URL is ws://: the tunnel is not encrypted") == 1
    conn.close()


def test_a_401_is_logged_with_its_reason_and_retried(processes, peer, token_file):
    agent = start_agent(processes, url(peer), "--token-file", token_file)
    peer.accept().refuse(401, "token expired")
    agent.wait_log(r"the server refused the agent: 401 Unauthorized: token expired; "
                   r"retrying in 1\.0 s")
    started = time.monotonic()
    second = peer.accept()
    # A refusal waits the cap (1 s here), without jitter.
    assert time.monotonic() - started >= 0.8
    assert second.headers.get("authorization") == "Bearer token-one"
    second.refuse(403, "agent bus-02 is not in the tunnel configuration")
    agent.wait_log(r"the server refused the agent: 403 Forbidden: agent bus-02 is not in "
                   r"the tunnel configuration; retrying in 1\.0 s")


def test_the_token_file_is_read_at_each_connection(processes, peer, token_file):
    agent = start_agent(processes, url(peer), "--token-file", token_file)
    first = peer.accept()
    assert first.headers.get("authorization") == "Bearer token-one"
    with open(token_file, "w") as handle:
        handle.write("  token-two \n")
    first.refuse(401, "expired")
    second = peer.accept()
    assert second.headers.get("authorization") == "Bearer token-two"
    second.close()
    assert agent.proc.poll() is None


def test_a_subprotocol_missing_in_the_answer_is_a_failed_handshake(processes, peer, token_file):
    agent = start_agent(processes, url(peer), "--token-file", token_file)
    peer.accept().upgrade(subprotocol=None)
    agent.wait_log(r"handshake with ws://127\.0\.0\.1:%d/tunnel/bus-02 failed: 101 Switching "
                   r"Protocols: .*; retrying in \d" % peer.port)
    peer.accept().close()


# -- TLS -----------------------------------------------------------------------

def server_context(pki):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server.cert, pki.server.key)
    return context


def test_wss_verifies_the_server_with_the_ca_cert(processes, pki, token_file):
    listener = PeerListener(server_context(pki))
    try:
        agent = start_agent(processes, url(listener, scheme="wss"),
                            "--token-file", token_file, "--ca-cert", pki.ca.cert)
        conn = listener.accept()
        assert conn.headers.get("authorization") == "Bearer token-one"
        conn.upgrade()
        agent.wait_log(r"connected to wss://127\.0\.0\.1:%d/tunnel/bus-02: tunnel up"
                       % listener.port)
        assert "not encrypted" not in agent.log()
        conn.close()
    finally:
        listener.close()


def test_a_stream_over_wss(processes, pki, token_file, service):
    listener = PeerListener(server_context(pki))
    try:
        start_agent(processes, url(listener, scheme="wss"), "--token-file", token_file,
                    "--ca-cert", pki.ca.cert, "-v", service="127.0.0.1:%d" % service.port)
        conn = listener.accept()
        conn.upgrade()
        stream = conn.open_stream()
        conn.event(mux.StreamAccepted, stream, timeout=3)
        greeting = b"hello from the service\n"
        assert conn.received(stream, len(greeting), timeout=3) == greeting
        payload = os.urandom(100000)
        conn.send(stream, payload)
        assert conn.received(stream, len(payload)) == payload
        conn.close()
    finally:
        listener.close()


def test_wss_presents_the_client_certificate(processes, pki):
    context = server_context(pki)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(pki.ca.cert)
    listener = PeerListener(context)
    try:
        agent = start_agent(processes, url(listener, agent_id="alice", scheme="wss"),
                            "--ca-cert", pki.ca.cert, "--client-cert", pki.alice.cert,
                            "--client-key", pki.alice.key)
        conn = listener.accept()
        subject = dict(item[0] for item in conn.sock.getpeercert()["subject"])
        assert subject["commonName"] == "alice"
        assert conn.headers.get("authorization") is None
        conn.upgrade()
        agent.wait_log(r"tunnel up")
        conn.close()
    finally:
        listener.close()


def test_a_server_signed_by_another_ca_is_refused(processes, pki, token_file):
    listener = PeerListener(server_context(pki))
    try:
        agent = start_agent(processes, url(listener, scheme="wss"),
                            "--token-file", token_file, "--ca-cert", pki.other_ca.cert)
        for _ in range(2):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                listener.accept()
        pattern = (r"cannot connect to wss://127\.0\.0\.1:%d/tunnel/bus-02: TLS: certificate "
                   r"verify failed: [^\n]+; retrying in \d+\.\d s\n" % listener.port)
        wait_for(lambda: len(re.findall(pattern, agent.log())) >= 2, what="two refusals")
        # One line per attempt, nothing else.
        lines = [line for line in agent.log().splitlines() if "ERROR" in line]
        assert len(lines) == len(re.findall(pattern, agent.log())), agent.log()
        assert "tunnel up" not in agent.log()
    finally:
        listener.close()


def test_the_host_name_is_verified(processes, pki, token_file):
    # The certificate names 127.0.0.1, ::1 and localhost, not this name.
    listener = PeerListener(server_context(pki))
    try:
        agent = start_agent(processes,
                            "wss://127.0.0.1.nip.invalid:%d/tunnel/x" % listener.port,
                            "--token-file", token_file, "--ca-cert", pki.ca.cert)
        agent.wait_log(r"cannot connect to wss://127\.0\.0\.1\.nip\.invalid:%d/tunnel/x: "
                       % listener.port)
    finally:
        listener.close()


# -- tokens on stdin -------------------------------------------------------------

def test_a_token_line_on_stdin_replaces_the_token_for_the_next_connection(
        processes, peer, service):
    agent = start_agent(processes, url(peer), "--token-stdin",
                        service="127.0.0.1:%d" % service.port, stdin=subprocess.PIPE)
    agent.wait_log(r"waiting for a token on stdin")
    agent.proc.stdin.write(b"first-token\n")
    agent.proc.stdin.flush()
    conn = peer.accept()
    assert conn.headers.get("authorization") == "Bearer first-token"
    conn.upgrade()
    stream = conn.open_stream()
    conn.event(mux.StreamAccepted, stream)
    greeting = b"hello from the service\n"
    assert conn.received(stream, len(greeting)) == greeting
    agent.proc.stdin.write(b"\nsecond-token\n")
    agent.proc.stdin.flush()
    agent.wait_log(r"new token read from stdin: used from the next connection")
    # The open stream carries on untouched.
    conn.send(stream, b"still here")
    assert conn.received(stream, 10) == b"still here"
    conn.close()
    second = peer.accept()
    assert second.headers.get("authorization") == "Bearer second-token"
    second.close()


def test_stdin_closed_before_any_token_stops_the_agent(processes, peer):
    agent = start_agent(processes, url(peer), "--token-stdin")   # stdin is /dev/null
    assert agent.wait(10) == 5
    assert "stdin closed before a token was read" in agent.log()


# -- streams -----------------------------------------------------------------------

def test_a_stream_reaches_the_service_with_exact_bytes_both_ways(
        processes, peer, service, token_file):
    agent = start_agent(processes, url(peer), "--token-file", token_file,
                        service="127.0.0.1:%d" % service.port)
    conn = peer.accept()
    conn.upgrade()
    stream = conn.open_stream(peer="203.0.113.7:4242")
    conn.event(mux.StreamAccepted, stream)
    greeting = b"hello from the service\n"
    assert conn.received(stream, len(greeting)) == greeting
    # More than a window each way: credit has to flow for this to finish.
    payload = os.urandom(1024 * 1024 + 17)
    echoed = bytearray()

    def collect():
        for event in [e for e in conn.events if isinstance(e, mux.DataReceived)]:
            conn.events.remove(event)
            echoed.extend(event.data)
            conn.conn.consumed(stream, len(event.data))
        return len(echoed) >= len(payload)
    # One thread drives the socket: send as credit allows, collecting the echo.
    view = memoryview(payload)
    deadline = time.monotonic() + 30
    while view or not collect():
        assert time.monotonic() < deadline, "transfer timed out"
        if view:
            view = view[conn.conn.send_data(stream, view):]
        conn.flush()
        conn.read_once(0.05)
        collect()
    assert bytes(echoed) == payload
    assert bytes(service.received[0]) == payload
    # Half-close: the server's FIN reaches the service as EOF; it closes; its
    # EOF comes back as FIN.
    conn.end(stream)
    conn.event(mux.StreamEnded, stream)
    conn.event(mux.StreamClosed, stream)
    assert conn.conn.open_streams == 0
    agent.wait_log(r"connected to .* tunnel up")
    conn.close()


def test_a_refusing_service_is_reset_refused(processes, peer, token_file):
    closed_port = free_port()
    start_agent(processes, url(peer), "--token-file", token_file,
                service="127.0.0.1:%d" % closed_port)
    conn = peer.accept()
    conn.upgrade()
    stream = conn.open_stream()
    reset = conn.event(mux.StreamReset, stream)
    assert reset.code == mux.ResetCode.REFUSED
    assert reset.reason == "service: Connection refused"
    # The tunnel stays up for the next user.
    second = conn.open_stream()
    assert conn.event(mux.StreamReset, second).code == mux.ResetCode.REFUSED
    conn.close()


def test_a_user_gone_resets_the_service_connection(processes, peer, service, token_file):
    start_agent(processes, url(peer), "--token-file", token_file,
                service="127.0.0.1:%d" % service.port)
    conn = peer.accept()
    conn.upgrade()
    stream = conn.open_stream()
    conn.event(mux.StreamAccepted, stream)
    conn.received(stream, 23)
    conn.conn.reset_stream(stream, mux.ResetCode.CANCEL, "user gone")
    conn.flush()
    # The service sees its connection closed.
    wait_for(lambda: service.ended == 1, what="service connection closed")
    again = conn.open_stream()
    conn.event(mux.StreamAccepted, again)
    conn.close()


# -- reconnecting --------------------------------------------------------------------

def test_a_dropped_tunnel_is_redialed_with_back_off(processes, peer, token_file):
    agent = start_agent(processes, url(peer), "--token-file", token_file)
    delays = []
    for _ in range(3):
        conn = peer.accept()
        conn.upgrade()
        conn.close()
        line = agent.wait_log(r"tunnel closed: (the server closed the connection|connection "
                              r"lost: [^;]+); reconnecting in (\d+\.\d) s\n"
                              r"(?![\s\S]*tunnel closed)")
        delays.append(float(line.group(2)))
    # Full jitter under ceilings of 0.5, then 1.0 (the cap here), then 1.0.
    assert delays[0] <= 0.5 and delays[1] <= 1.0 and delays[2] <= 1.0, delays
    peer.accept().close()
    assert agent.log().count("tunnel up") == 3


def test_a_silent_server_is_dead_and_redialed(processes, peer, token_file, service):
    agent = start_agent(processes, url(peer), "--token-file", token_file,
                        "--ping-interval", "0.2", "--dead-after", "1",
                        service="127.0.0.1:%d" % service.port)
    conn = peer.accept()
    conn.upgrade()
    stream = conn.open_stream()
    conn.event(mux.StreamAccepted, stream)
    conn.received(stream, 23)
    # The server reads (and counts the agent's pings) but never answers them.
    conn.conn.ping = None
    deadline = time.monotonic() + 5
    while not conn.closed and time.monotonic() < deadline:
        conn.sock.settimeout(0.1)
        try:
            data = conn.sock.recv(65536)
        except socket.timeout:
            continue
        if not data:
            conn.closed = True
            break
        # Parse for counting; the answers (pongs) are never sent.
        conn.parser.feed(data)
        conn.conn.data_to_send()
    assert conn.closed
    assert conn.mux_pings >= 3
    assert conn.close_code == 1011
    agent.wait_log(r"the server has been silent for 1 s: it is dead")
    agent.wait_log(r"tunnel closed: peer silent for 1 s; reconnecting in")
    # Its stream's service connection is closed with it.
    wait_for(lambda: service.ended == 1, what="the service connection closed")
    assert "1 stream(s) closed with the tunnel" in agent.log()
    peer.accept().close()


def test_sigterm_closes_the_tunnel_with_1001_and_exits_0(processes, peer, token_file):
    agent = start_agent(processes, url(peer), "--token-file", token_file)
    conn = peer.accept()
    conn.upgrade()
    agent.wait_log(r"tunnel up")
    agent.signal(signal.SIGTERM)
    conn.pump_until(lambda: conn.close_code is not None or conn.closed, what="close frame")
    assert conn.close_code == 1001
    assert agent.wait(10) == 0


# -- the command line ------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--service", "127.0.0.1:1", "--server", "http://x/tunnel/a", "--token-stdin"],
     "--server must be a ws:// or wss:// URL"),
    (["--service", "127.0.0.1:1", "--server", "ws://x:99999/tunnel/a", "--token-stdin"],
     "out of range"),
    (["--service", "127.0.0.1:1", "--server", "ws://x", "--token-stdin"], "has no path"),
    (["--service", "127.0.0.1", "--server", "ws://x/tunnel/a", "--token-stdin"],
     "--service '127.0.0.1'"),
    (["--service", "127.0.0.1:1", "--server", "ws://x/tunnel/a"], "needs credentials"),
    (["--service", "127.0.0.1:1", "--server", "ws://x/tunnel/a", "--token-stdin",
      "--token-file", "f"], "not allowed with argument"),
    (["--service", "127.0.0.1:1", "--server", "ws://x/tunnel/a", "--client-cert", "c"],
     "need a wss:// --server"),
    (["--service", "127.0.0.1:1", "--server", "ws://x/tunnel/a", "--token-stdin",
      "--connect-timeout", "0"], "must be a positive number of seconds"),
])
def test_bad_command_lines_exit_2(args, message):
    done = subprocess.run(AGENT + args, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done
    assert message in done.stderr, done.stderr


def test_unusable_files_exit_5(tmp_path):
    base = AGENT + ["--service", "127.0.0.1:1", "--server", "wss://127.0.0.1:1/tunnel/a"]
    missing = str(tmp_path / "missing")
    done = subprocess.run(base + ["--token-file", missing], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 5
    assert "cannot read the token file %s: No such file or directory" % missing in done.stderr
    token = tmp_path / "token"
    token.write_text("t\n")
    done = subprocess.run(base + ["--token-file", str(token), "--ca-cert", missing],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 5
    assert "cannot load the CA certificates %s" % missing in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_help_and_version():
    done = subprocess.run(AGENT + ["--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    assert "--token-stdin" in done.stdout
    done = subprocess.run(AGENT + ["--version"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    assert done.stdout.startswith("websockify-agent ")


def test_sigterm_between_attempts_exits_0(processes, peer, token_file):
    agent = start_agent(processes, url(peer), "--token-file", token_file)
    peer.accept().refuse(401, "no")
    agent.wait_log(r"retrying in 1\.0 s")
    agent.signal(signal.SIGTERM)
    assert agent.wait(10) == 0


def test_sigterm_while_waiting_for_a_token_exits_0(processes, peer):
    agent = start_agent(processes, url(peer), "--token-stdin", stdin=subprocess.PIPE)
    agent.wait_log(r"waiting for a token on stdin")
    agent.signal(signal.SIGTERM)
    assert agent.wait(10) == 0
    assert peer.accepted == 0


def test_replaced_or_removed_waits_the_cap_a_restart_does_not(processes, peer, token_file):
    agent = start_agent(processes, url(peer), "--token-file", token_file)
    for code, reason in ((1000, "replaced by a new connection"),
                         (1008, "agent removed from the configuration")):
        conn = peer.accept()
        conn.upgrade()
        conn.sock.sendall(encode_frame(OP_CLOSE, close_payload(code, reason)))
        agent.wait_log(r"tunnel closed: the server closed the tunnel \(%d: %s\); reconnecting "
                       r"in 1\.0 s" % (code, reason))
        # The agent answers the close with the same code.
        conn.pump_until(lambda: conn.close_code is not None, what="the close answer")
        assert conn.close_code == code
        conn.close()
    conn = peer.accept()
    conn.upgrade()
    conn.sock.sendall(encode_frame(OP_CLOSE, close_payload(1001, "server restarting")))
    line = agent.wait_log(r"tunnel closed: the server closed the tunnel \(1001: server "
                          r"restarting\); reconnecting in (\d\.\d) s")
    # Jittered under the ceiling of the third failure in a row (the cap, 1 s here).
    assert float(line.group(1)) <= 1.0
    conn.close()
    peer.accept().close()


def test_a_service_that_does_not_answer_is_reset_timeout(processes, peer, token_file):
    # A listener whose backlog is full: the kernel drops further SYNs.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(silent.getsockname())
            fillers.append(filler)
        start_agent(processes, url(peer), "--token-file", token_file, "--connect-timeout",
                    "0.5", service="127.0.0.1:%d" % silent.getsockname()[1])
        conn = peer.accept()
        conn.upgrade()
        stream = conn.open_stream()
        started = time.monotonic()
        reset = conn.event(mux.StreamReset, stream)
        assert (reset.code, reset.reason) == (mux.ResetCode.TIMEOUT,
                                              "service did not answer within 0.5 s")
        assert 0.4 < time.monotonic() - started < 3.0
        conn.close()
    finally:
        for filler in fillers:
            filler.close()
        silent.close()


def test_messages_split_across_reads_and_fragments_arrive_whole(processes, peer, service,
                                                                token_file):
    start_agent(processes, url(peer), "--token-file", token_file,
                service="127.0.0.1:%d" % service.port)
    conn = peer.accept()
    conn.upgrade()
    stream = conn.open_stream()
    conn.event(mux.StreamAccepted, stream)
    conn.received(stream, 23)
    first, second = os.urandom(16384), os.urandom(16384)
    message = (mux.HEADER.pack(mux.FrameType.DATA, stream, len(first)) + first
               + mux.HEADER.pack(mux.FrameType.DATA, stream, len(second)) + second)
    # One message, its frame's bytes in two writes with a pause between.
    wire = encode_frame(0x2, message)
    conn.sock.sendall(wire[:5000])
    time.sleep(0.2)
    conn.sock.sendall(wire[5000:])
    assert conn.received(stream, len(message) - 14) == first + second
    # One message in three WebSocket fragments, the second alone in its read.
    third = os.urandom(3000)
    message = mux.HEADER.pack(mux.FrameType.DATA, stream, len(third)) + third
    conn.sock.sendall(bytes((0x02, 126)) + (1000).to_bytes(2, "big") + message[:1000])
    time.sleep(0.2)
    conn.sock.sendall(bytes((0x00, 126)) + (1000).to_bytes(2, "big") + message[1000:2000])
    time.sleep(0.2)
    rest = message[2000:]
    conn.sock.sendall(bytes((0x80, 126)) + len(rest).to_bytes(2, "big") + rest)
    assert conn.received(stream, len(third)) == third
    assert bytes(service.received[0]) == first + second + third
    conn.close()


def test_log_file_and_its_reopening(processes, peer, token_file, tmp_path):
    log_path = tmp_path / "agent.log"
    agent = start_agent(processes, url(peer), "--token-file", token_file,
                        "--log-file", log_path)
    conn = peer.accept()
    conn.upgrade()
    wait_for(lambda: log_path.exists() and "tunnel up" in log_path.read_text(),
             what="the log file")
    assert "tunnel up" not in agent.log()        # not on stderr
    os.rename(log_path, str(log_path) + ".1")
    agent.signal(signal.SIGUSR1)
    wait_for(log_path.exists, what="the log file reopened")
    conn.close()
    wait_for(lambda: log_path.exists() and "tunnel closed" in log_path.read_text(),
             what="the reopened log file")
    assert "tunnel closed" not in open(str(log_path) + ".1").read()
    peer.accept().close()


def test_an_ipv6_service(processes, peer, token_file):
    if not ipv6_available():
        pytest.skip("no IPv6 loopback here")
    listener = socket.socket(socket.AF_INET6)
    listener.bind(("::1", 0))
    listener.listen(1)
    try:
        start_agent(processes, url(peer), "--token-file", token_file,
                    service="[::1]:%d" % listener.getsockname()[1])
        conn = peer.accept()
        conn.upgrade()
        stream = conn.open_stream()
        conn.event(mux.StreamAccepted, stream)
        listener.settimeout(5)
        accepted, _ = listener.accept()
        accepted.sendall(b"over ::1")
        assert conn.received(stream, 8) == b"over ::1"
        accepted.close()
        conn.close()
    finally:
        listener.close()
