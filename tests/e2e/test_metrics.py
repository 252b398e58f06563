"""--metrics end to end: the master's /metrics and /healthz, scraped while real sessions run.

Every test starts a real server (and, where named, Debian's promtool and
prometheus) on loopback; the exposition is read back with prometheus_client's
parser, the format's reference implementation.
"""

import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from tests.e2e.test_master import worker_pids
from tests.helpers import (RawWebSocket, free_port, handshake_request, port_open,
                           read_http_response, require_module, require_program, wait_for,
                           websockify_argv)


def scrape(port: int, path: str = "/metrics") -> dict:
    """{(name, ((label, value), ...)): value} of one scrape."""
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = reply.read().decode("utf-8")
    parser = require_module("prometheus_client.parser", "the test extra: prometheus_client")
    samples = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def http_status(port: int, request: bytes) -> tuple:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        status, headers, body = read_http_response(sock)
        return status, headers, body


def start(websockify, *args, workers=2):
    metrics_port = free_port()
    proc, port = websockify("--metrics", str(metrics_port), "--workers", str(workers), *args)
    wait_for(lambda: port_open(metrics_port), what="metrics port")
    wait_for(lambda: scrape(metrics_port)[("websockify_workers", ())] == workers,
             what="%d workers serving" % workers)
    return proc, port, metrics_port


def session(port: int, payload: bytes, path: str = "/") -> None:
    """One echo session sending ``payload`` and closing with 1000."""
    ws = RawWebSocket(port, path=path)
    try:
        assert ws.status == 101, (ws.status, ws.buffer)
        ws.send_binary(payload)
        assert ws.recv_data(len(payload)) == payload
        ws.send(0x8, struct.pack("!H", 1000))
        assert ws.expect_close()[0] == 1000
        assert ws.at_eof()
    finally:
        ws.close()


def wait_counted(metrics_port: int, sessions: int) -> None:
    """Until ``sessions`` normal closes are counted: the server counts a session once it
    has closed it, just after its client sees the end."""
    wait_for(lambda: value(scrape(metrics_port), "websockify_sessions_total",
                           outcome="normal") == sessions, what="%d sessions counted" % sessions)


def test_sessions_bytes_refusals_and_handshakes_are_counted_exactly(websockify):
    proc, port, metrics_port = start(websockify, "--echo", "{port}")
    # The start-up check's probe is the one connection so far.
    wait_for(lambda: value(scrape(metrics_port), "websockify_connections_total") == 1,
             what="the probe's connection counted")
    for index in range(6):
        session(port, b"x" * (100 + index))
    # Two refusals: a plain GET without --web (405), an unknown WebSocket version (400).
    assert http_status(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 405
    assert http_status(port, handshake_request("/", version="99"))[0] == 400
    # One session held open while the others are counted: the gauge sees it.
    held = RawWebSocket(port)
    assert held.status == 101
    wait_for(lambda: value(scrape(metrics_port), "websockify_sessions_open") == 1,
             what="one session open")
    samples = scrape(metrics_port)
    sent = sum(100 + index for index in range(6))
    assert value(samples, "websockify_sessions_total", outcome="normal") == 6
    assert value(samples, "websockify_sessions_total", outcome="abnormal") == 0
    assert value(samples, "websockify_bytes_total", direction="from_client") == sent
    assert value(samples, "websockify_bytes_total", direction="to_client") == sent
    assert value(samples, "websockify_refusals_total", status="405") == 1
    assert value(samples, "websockify_refusals_total", status="400") == 1
    assert value(samples, "websockify_connections_total") == 1 + 9
    assert value(samples, "websockify_handshake_duration_seconds_count") == 7
    assert value(samples, "websockify_handshake_duration_seconds_bucket", le="+Inf") == 7
    assert value(samples, "websockify_session_duration_seconds_count") == 6
    assert value(samples, "websockify_session_duration_seconds_bucket", le="10.0") == 6
    assert value(samples, "websockify_workers") == 2
    held.send(0x8, struct.pack("!H", 1001))
    assert held.expect_close()[0] == 1001
    held.close()
    wait_for(lambda: value(scrape(metrics_port), "websockify_sessions_total",
                           outcome="going_away") == 1, what="the held session counted")
    assert value(scrape(metrics_port), "websockify_sessions_open") == 0


def test_token_lookups_by_plugin_and_result(websockify, echo_target, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("good: 127.0.0.1:%d\nrefusing: 127.0.0.1:%d\n" % (echo_target, free_port()))
    proc, port, metrics_port = start(websockify, "--token-plugin", "TokenFile",
                                     "--token-source", str(tokens), "{port}")
    session(port, b"through a token", path="/?token=good")
    session(port, b"again", path="/?token=good")
    for path, status in (("/?token=nobody", 404), ("/", 400), ("/?token=refusing", 502)):
        assert http_status(port, handshake_request(path))[0] == status
    wait_counted(metrics_port, 2)
    samples = scrape(metrics_port)
    found = {result: value(samples, "websockify_token_lookups_total", plugin="TokenFile",
                           result=result)
             for result in ("found", "not_found", "missing", "failed")}
    # The refusing target's token was found: its connect failed afterwards (502).
    assert found == {"found": 3, "not_found": 1, "missing": 1, "failed": 0}
    assert value(samples, "websockify_refusals_total", status="502") == 1
    assert value(samples, "websockify_refusals_total", status="404") == 1


def test_tls_handshakes_and_failures(websockify, pki):
    proc, port, metrics_port = start(websockify, "--cert", pki.server.pem, "--echo", "{port}",
                                     workers=1)
    context = ssl.create_default_context(cafile=pki.ca.cert)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(handshake_request("/"))
            assert read_http_response(tls)[0] == 101
    # A client that does not trust the certificate aborts the handshake.
    distrust = ssl.create_default_context(cafile=pki.other_ca.cert)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            distrust.wrap_socket(raw, server_hostname="localhost")
    # A garbage "hello" after a TLS record type byte.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"\x16\x03\x01\x00\x05hello")
        raw.settimeout(10)
        while raw.recv(4096):
            pass
    wait_for(lambda: value(scrape(metrics_port), "websockify_tls_handshakes_total") == 3,
             what="three TLS handshakes counted")
    assert value(scrape(metrics_port), "websockify_tls_handshake_failures_total") == 2


def test_counters_never_go_backwards_while_a_worker_is_replaced(websockify):
    proc, port, metrics_port = start(websockify, "--echo", "{port}")
    for _ in range(8):
        session(port, b"before the kill")
    wait_counted(metrics_port, 8)
    before = scrape(metrics_port)
    victims = worker_pids(proc.pid)
    assert len(victims) == 2
    os.kill(victims[0], signal.SIGKILL)
    # Scrape as fast as possible while the worker dies and is replaced.
    scrapes = [before]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        scrapes.append(scrape(metrics_port))
        latest = scrapes[-1]
        if (value(latest, "websockify_worker_restarts_total") == 1
                and value(latest, "websockify_workers") == 2):
            break
    else:
        pytest.fail("the killed worker was not replaced: %s" % proc.log())
    for _ in range(3):
        session(port, b"after the kill")
    wait_counted(metrics_port, 11)
    scrapes.append(scrape(metrics_port))
    counters = [key for key in before if key[0].endswith(("_total", "_count", "_bucket", "_sum"))]
    for key in counters:
        series = [sample[key] for sample in scrapes]
        assert series == sorted(series), (key, series)
    final = scrapes[-1]
    assert value(final, "websockify_sessions_total", outcome="normal") == 11
    assert value(final, "websockify_bytes_total", direction="to_client") == \
        8 * len(b"before the kill") + 3 * len(b"after the kill")


def test_a_reload_is_counted_and_counters_survive_it(websockify):
    proc, port, metrics_port = start(websockify, "--echo", "{port}")
    for _ in range(4):
        session(port, b"before the reload")
    old = set(worker_pids(proc.pid))
    proc.signal(signal.SIGHUP)
    wait_for(lambda: value(scrape(metrics_port), "websockify_reloads_total") == 1,
             what="the reload counted")
    wait_for(lambda: not (set(worker_pids(proc.pid)) & old) and
             len(worker_pids(proc.pid)) == 2, what="the old workers gone")
    session(port, b"after")
    wait_counted(metrics_port, 5)
    samples = scrape(metrics_port)
    assert value(samples, "websockify_worker_restarts_total") == 0
    assert value(samples, "websockify_workers") == 2


def test_healthz_is_503_once_no_worker_serves(websockify):
    proc, port, metrics_port = start(websockify, "--echo", "--graceful-timeout", "30",
                                     "{port}", workers=1)
    status, headers, body = http_status(metrics_port, b"GET /healthz HTTP/1.1\r\nHost: m\r\n\r\n")
    assert (status, body) == (200, b"ok\n")
    held = RawWebSocket(port)       # keeps the master draining after SIGTERM
    assert held.status == 101
    proc.signal(signal.SIGTERM)

    def unhealthy():
        return http_status(metrics_port, b"GET /healthz HTTP/1.1\r\nHost: m\r\n\r\n")[0] == 503
    wait_for(unhealthy, what="/healthz 503 while the last worker drains")
    status, _, body = http_status(metrics_port, b"GET /healthz HTTP/1.1\r\nHost: m\r\n\r\n")
    assert (status, body) == (503, b"no worker is serving\n")
    held.close()
    assert proc.wait(30) == 0


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET / HTTP/1.1\r\nHost: m\r\n\r\n", 404),
    (b"GET /metrics/x HTTP/1.1\r\nHost: m\r\n\r\n", 404),
    (b"GET /metrics HTTP/1.1\r\nHost: m\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", 404),
    (b"POST /metrics HTTP/1.1\r\nHost: m\r\nContent-Length: 0\r\n\r\n", 405),
    (b"garbage\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\n" + b"X-Long: " + b"a" * 9000 + b"\r\n\r\n", 431),
])
def test_other_paths_upgrades_and_bad_requests_on_the_metrics_port(websockify, request_bytes,
                                                                   status):
    proc, port, metrics_port = start(websockify, "--echo", "{port}", workers=1)
    assert http_status(metrics_port, request_bytes)[0] == status
    # One log line names it; the server goes on serving.
    wait_for(lambda: "metrics 127.0.0.1:" in proc.log() and (" %d" % status) in proc.log(),
             what="the refusal's log line")
    session(port, b"still serving")
    assert value(scrape(metrics_port), "websockify_workers") == 1


def test_a_client_that_never_finishes_its_request_does_not_stop_the_scrapes(websockify):
    proc, port, metrics_port = start(websockify, "--echo", "{port}", workers=1)
    with socket.create_connection(("127.0.0.1", metrics_port)) as slow:
        slow.sendall(b"GET /metr")
        for _ in range(3):
            assert value(scrape(metrics_port), "websockify_workers") == 1


def test_metrics_on_a_port_in_use_exits_4_with_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        result = subprocess.run(
            websockify_argv("--metrics", "127.0.0.1:%d" % busy, "--echo", str(free_port())),
            capture_output=True, text=True, timeout=30)
    assert result.returncode == 4
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "--metrics: cannot listen on 127.0.0.1 port %d: Address already in use" % busy \
        in lines[0]


def test_bad_metrics_addresses_are_usage_errors():
    for bad in ("x", "127.0.0.1:99999", "[::1"):
        result = subprocess.run(websockify_argv("--metrics", bad, "--echo", "6080"),
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 2, (bad, result.stderr)
        assert "--metrics" in result.stderr


def test_promtool_accepts_a_loaded_servers_exposition(websockify, tmp_path):
    promtool = require_program("promtool", "prometheus")
    proc, port, metrics_port = start(websockify, "--echo", "{port}")
    for _ in range(5):
        session(port, b"load")
    wait_counted(metrics_port, 5)
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % metrics_port) as reply:
        text = reply.read()
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == b""


def test_a_real_prometheus_scrapes_and_answers_a_query(websockify, processes, tmp_path):
    prometheus = require_program("prometheus", "prometheus")
    proc, port, metrics_port = start(websockify, "--echo", "{port}")
    for _ in range(7):
        session(port, b"counted by prometheus")
    wait_counted(metrics_port, 7)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: websockify\n    static_configs:\n"
        "      - targets: ['127.0.0.1:%d']\n" % metrics_port)
    api_port = free_port()
    processes([prometheus, "--config.file=%s" % config,
               "--storage.tsdb.path=%s" % (tmp_path / "tsdb"),
               "--web.listen-address=127.0.0.1:%d" % api_port], name="prometheus")
    query = urllib.parse.urlencode(
        {"query": 'websockify_sessions_total{job="websockify",outcome="normal"}'})

    def answered():
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/api/v1/query?%s"
                                        % (api_port, query), timeout=5) as reply:
                document = json.load(reply)
        except OSError:
            return None
        result = document["data"]["result"]
        return result[0]["value"][1] if result else None
    assert wait_for(answered, timeout=60, what="prometheus's answer") == "7"
    with urllib.request.urlopen("http://127.0.0.1:%d/api/v1/targets" % api_port) as reply:
        targets = json.load(reply)["data"]["activeTargets"]
    assert [t["health"] for t in targets] == ["up"]


def test_tunnel_agents_and_streams_are_reported(websockify, processes, tmp_path):
    from tests.e2e.test_agent_server import AGENT, SECRET, write_config
    from tests.tunnel_agent import Service, agent_token
    face = free_port()
    config = write_config(tmp_path, {"metered": face})
    proc, port, metrics_port = start(websockify, "--tunnel-config", config, "{port}")
    samples = scrape(metrics_port)
    assert value(samples, "websockify_tunnel_agents_connected") == 0
    assert value(samples, "websockify_tunnel_streams_open") == 0
    echo = Service()
    try:
        token = tmp_path / "metered.token"
        token.write_text(agent_token("metered", SECRET, 3600.0) + "\n")
        processes(AGENT + ["--service", "127.0.0.1:%d" % echo.port,
                           "--server", "ws://127.0.0.1:%d/tunnel/metered" % port,
                           "--token-file", str(token)], name="agent")
        wait_for(lambda: value(scrape(metrics_port), "websockify_tunnel_agents_connected") == 1,
                 what="the agent counted")
        users = [socket.create_connection(("127.0.0.1", face), timeout=10) for _ in range(3)]
        for user in users:
            user.sendall(b"ping")
            assert user.recv(4) == b"ping"
        wait_for(lambda: value(scrape(metrics_port), "websockify_tunnel_streams_open") == 3,
                 what="three streams open")
        for user in users:
            user.close()
        wait_for(lambda: value(scrape(metrics_port), "websockify_tunnel_streams_open") == 0,
                 what="the streams closed")
    finally:
        echo.close()
