"""websockify-agent's viewer URL and open registration, against the real server.

The server is ``websockify --tunnel-config`` on loopback: one with an
agent entry with ``http = true`` and one without, one with ``[tunnels]
open = true`` and no entries at all.  The agents are real
``websockify-agent`` processes logging to a file (``--log-file``), so what
they print on standard output is their process output alone.  A
websocktunnel-style client (an upgrade to "/" with ``x-websocktunnel-id``)
is a raw socket here (tests/e2e/test_websocktunnel_clients.py runs the
real wst-client).
"""

import json
import re
import subprocess
import time

import pytest

from tests.e2e.test_agent_server import echo  # noqa: F401  (a fixture: a TCP echo service)
from tests.e2e.test_agent import peer  # noqa: F401  (a fixture: the server's half, scripted)
from tests.e2e.test_agent_server import AGENT, LIVENESS, start_agent
from tests.helpers import (PYTHON, RawWebSocket, SharedProcess, free_port, port_open,
                           tunnel_status, wait_for)
from tests.tunnel_agent import agent_token

SECRET = b"viewer URL tests' tunnel secret"
OTHER_SECRET = b"a secret this server does not have"


def write_config(directory, open_registration=False, http_path=None, agents=()):
    """A tunnel file: ``agents`` is (ID, lines of its table) pairs."""
    (directory / "tunnel.key").write_bytes(SECRET + b"\n")
    lines = ["[tunnels]", 'path = "/tunnel/"', 'secrets = ["tunnel.key"]',
             "open = %s" % ("true" if open_registration else "false")]
    if http_path:
        lines.append('http_path = "%s"' % http_path)
    for agent_id, table in agents:
        lines += ["[tunnels.agent.%s]" % agent_id] + list(table)
    path = directory / ("tunnels-%s.toml" % (http_path or "default").strip("/"))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


CLOSED_AGENTS = (("web", ["http = true"]), ("plain", ["token = true"]))


class Rendezvous:
    def __init__(self, proc, port, directory, config):
        self.proc = proc
        self.port = port
        self.directory = directory
        self.config = config

    def url(self, agent_id):
        return "ws://127.0.0.1:%d/tunnel/%s" % (self.port, agent_id)

    def viewer_url(self, agent_id, http_path="/t/"):
        return "http://127.0.0.1:%d%s%s/" % (self.port, http_path, agent_id)

    def token_file(self, agent_id, secret=SECRET, **claims):
        path = self.directory / ("%s-%d.token" % (agent_id.replace("*", "star"),
                                                   time.monotonic_ns()))
        path.write_text(agent_token(agent_id, secret, **claims) + "\n")
        return str(path)


def _rendezvous(module_websockify, directory, config, workers):
    proc, port = module_websockify("--tunnel-config", config, "--workers", str(workers),
                                   "{port}", env=LIVENESS)
    return Rendezvous(SharedProcess(proc), port, directory, config)


@pytest.fixture(scope="module")
def closed_rendezvous(module_websockify, tmp_path_factory):
    directory = tmp_path_factory.mktemp("closed")
    return _rendezvous(module_websockify, directory,
                       write_config(directory, agents=CLOSED_AGENTS), 1)


@pytest.fixture(scope="module")
def open_rendezvous(module_websockify, tmp_path_factory):
    # Two workers: an agent registered in one is in the status page the other serves.
    directory = tmp_path_factory.mktemp("open")
    return _rendezvous(module_websockify, directory,
                       write_config(directory, open_registration=True), 2)


@pytest.fixture
def closed(closed_rendezvous):
    closed_rendezvous.proc.mark()
    return closed_rendezvous


@pytest.fixture
def opened(open_rendezvous):
    open_rendezvous.proc.mark()
    return open_rendezvous


class Agent:
    """A websockify-agent whose log goes to a file: its process output is its stdout."""

    def __init__(self, processes, tmp_path, server_url, service_port, *args):
        self.log_path = tmp_path / ("agent-log-%d.txt" % len(processes.started))
        self.process = start_agent(processes, server_url, service_port,
                                   "--log-file", self.log_path, *args)

    def stdout(self) -> str:
        return self.process.log()

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern, timeout=10.0):
        regex = re.compile(pattern)
        return wait_for(lambda: regex.search(self.log()), timeout,
                        what="agent log line %r in:\n%s" % (pattern, self.log()))


# -- the viewer URL ---------------------------------------------------------------------

def test_an_http_agent_prints_its_url_once_and_writes_the_url_file(processes, tmp_path,
                                                                   closed, echo):
    url_file = tmp_path / "viewer.url"
    agent = Agent(processes, tmp_path, closed.url("web"), echo.port, "--http",
                  "--url-file", url_file, "--token-file", closed.token_file("web"))
    expected = closed.viewer_url("web")
    wait_for(lambda: url_file.exists(), what="the URL file")
    assert url_file.read_text() == expected + "\n"
    closed.proc.wait_log(r"agent web connected from 127\.0\.0\.1:\d+ \(worker 1\)")
    wait_for(lambda: agent.stdout(), what="the printed URL")
    assert agent.stdout() == expected + "\n"
    agent.wait_log(r"connected to %s: tunnel up" % re.escape(closed.url("web")))
    assert agent.log().count("viewer URL: %s" % expected) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("viewer")) == \
        ["viewer.url"]       # no temporary file left beside it


def test_an_agent_without_an_http_face_prints_nothing(processes, tmp_path, closed, echo):
    url_file = tmp_path / "viewer.url"
    # --http or not, the server gives a URL only to agents with an HTTP face.
    agent = Agent(processes, tmp_path, closed.url("plain"), echo.port, "--http",
                  "--url-file", url_file, "--token-file", closed.token_file("plain"))
    agent.wait_log(r"tunnel up")
    agent.wait_log(r"the server gave no viewer URL \(no HTTP face for this agent\): nothing "
                   r"written to %s" % re.escape(str(url_file)))
    assert agent.stdout() == ""
    assert not url_file.exists()
    assert "viewer URL:" not in agent.log()


def test_reconnecting_prints_again_only_a_different_url(processes, tmp_path, echo):
    """The same URL after a server restart: nothing new on stdout, the file untouched;
    the server restarted with another http_path: the new URL printed and written."""
    port = free_port()
    first_config = write_config(tmp_path, agents=CLOSED_AGENTS)

    def serve(config):
        server = processes([PYTHON, "-m", "websockify", "--tunnel-config", config,
                            "--workers", "1", str(port)], name="websockify", env=LIVENESS)
        wait_for(lambda: port_open(port), what="server up")
        return server

    server = serve(first_config)
    url_file = tmp_path / "viewer.url"
    rendezvous = Rendezvous(server, port, tmp_path, first_config)
    agent = Agent(processes, tmp_path, rendezvous.url("web"), echo.port, "--http",
                  "--url-file", url_file, "--token-file", rendezvous.token_file("web"))
    first = rendezvous.viewer_url("web")
    wait_for(lambda: agent.stdout() == first + "\n", what="the first URL printed")
    written = url_file.stat().st_mtime_ns
    for count, config in ((2, first_config),
                          (3, write_config(tmp_path, http_path="/view/",
                                           agents=CLOSED_AGENTS))):
        server.stop()
        agent.wait_log(r"tunnel closed: [^\n]+; reconnecting")
        server = serve(config)
        wait_for(lambda: agent.log().count("tunnel up") == count, timeout=20,
                 what="tunnel %d up" % count)
        if count == 2:
            assert agent.stdout() == first + "\n"
            assert url_file.read_text() == first + "\n"
            assert url_file.stat().st_mtime_ns == written
    second = rendezvous.viewer_url("web", "/view/")
    wait_for(lambda: agent.stdout() == first + "\n" + second + "\n",
             what="the second URL printed")
    assert url_file.read_text() == second + "\n"
    assert re.findall(r"viewer URL: (\S+)", agent.log()) == [first, second]


# -- against a scripted server half (tests/tunnel_peer.py): the request, what the 101 says

def token_file(directory):
    path = directory / "scripted.token"
    path.write_text("T.K.N\n")
    return path


def test_the_upgrade_says_http_only_with_the_flag(processes, tmp_path, peer, echo):
    for flag, expected in ((("--http",), "http"), ((), None)):
        agent = Agent(processes, tmp_path, "ws://127.0.0.1:%d/tunnel/a" % peer.port, echo.port,
                      "--token-file", token_file(tmp_path), *flag)
        conn = peer.accept()
        assert conn.headers.get("x-websockify-service") == expected
        assert conn.headers.get("authorization") == "Bearer T.K.N"
        conn.close()
        agent.process.stop()


@pytest.mark.parametrize("header", [
    "X-Websockify-Viewer-URL: javascript:alert(1)",
    "X-Websockify-Viewer-URL: http://h/t/\x1b[2J/",
    "X-Websockify-Viewer-URL: ftp://h/t/a/",
])
def test_a_garbage_viewer_url_is_a_warning_and_nothing_is_printed(processes, tmp_path, peer,
                                                                  echo, header):
    url_file = tmp_path / "viewer.url"
    agent = Agent(processes, tmp_path, "ws://127.0.0.1:%d/tunnel/a" % peer.port, echo.port,
                  "--http", "--url-file", url_file, "--token-file", token_file(tmp_path))
    conn = peer.accept()
    conn.upgrade(extra=(header,))
    value = header.split(": ", 1)[1]
    agent.wait_log(r"tunnel up")
    line = agent.wait_log(r"WARNING ignoring the server's viewer URL: ([^\n]*)")
    assert line.group(1) == ("not an http:// or https:// URL with a host and a path: %r"
                             % value)
    assert agent.stdout() == ""
    assert not url_file.exists()
    conn.close()


def test_a_missing_url_file_folder_exits_5(tmp_path):
    missing = tmp_path / "missing" / "viewer.url"
    done = subprocess.run(AGENT + ["--service", "127.0.0.1:1", "--server",
                                   "ws://127.0.0.1:1/tunnel/a", "--token-stdin",
                                   "--url-file", str(missing)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 5
    assert done.stdout == ""
    assert done.stderr.strip().endswith(
        "ERROR cannot write the viewer URL file %s: the folder %s is missing or not "
        "writable" % (missing, missing.parent)), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


# -- open registration: websockify-agent ---------------------------------------------------

def test_an_agent_registers_openly_and_is_told_its_url(processes, tmp_path, opened, echo):
    url_file = tmp_path / "viewer.url"
    agent = Agent(processes, tmp_path, opened.url("fleet-01"), echo.port, "--http",
                  "--url-file", url_file, "--token-file", opened.token_file("fleet-01"))
    opened.proc.wait_log(r"agent fleet-01: registered openly \(no entry in %s\)"
                         % re.escape(opened.config))
    opened.proc.wait_log(r"agent fleet-01 connected from 127\.0\.0\.1:\d+ \(worker [12]\)")
    expected = opened.viewer_url("fleet-01")
    wait_for(lambda: agent.stdout(), what="the printed URL")
    assert agent.stdout() == expected + "\n"
    wait_for(lambda: url_file.exists(), what="the URL file")
    assert url_file.read_text() == expected + "\n"
    # Whichever worker answers the status page, the agent is in it.
    for _ in range(4):
        rows = {row["id"]: row for row in tunnel_status(opened.port)["agents"]}
        assert rows["fleet-01"]["connected"] is True
        assert (rows["fleet-01"]["listen"], rows["fleet-01"]["bridge"]) == (None, False)


@pytest.mark.parametrize("agent_id", ["bad!id", "star*"])
def test_an_id_outside_the_id_rule_is_a_400_with_the_servers_reason(processes, tmp_path,
                                                                    opened, echo, agent_id):
    agent = Agent(processes, tmp_path, opened.url(agent_id), echo.port, "--http",
                  "--token-file", opened.token_file(agent_id))
    line = agent.wait_log(r"handshake with \S+ failed: 400 Bad Request: ([^\n]*); "
                          r"retrying in \d+\.\d s")
    reason = "agent ID %r is not a valid ID (1 to 128 of A-Z a-z 0-9 _ ~ . %% -)" % agent_id
    assert line.group(1) == reason
    opened.proc.wait_log(r"refused 'GET /tunnel/%s HTTP/1\.1': 400 %s"
                         % (re.escape(agent_id), re.escape(reason)))
    assert agent.stdout() == ""
    assert "registered openly" not in opened.proc.log()
    assert agent_id not in {row["id"] for row in tunnel_status(opened.port)["agents"]}


@pytest.mark.parametrize("case, reason", [
    ("neither secret", "bad token signature"),
    ("another ID", 'token is for agent "fleet-01", not "fleet-02"'),
    ("expired", "token expired"),
])
def test_a_bad_token_for_an_open_id_is_a_401(processes, tmp_path, opened, echo, case, reason):
    token = {
        "neither secret": lambda: opened.token_file("fleet-02", OTHER_SECRET),
        "another ID": lambda: opened.token_file("fleet-01"),
        "expired": lambda: opened.token_file("fleet-02", lifetime=-120),
    }[case]()
    agent = Agent(processes, tmp_path, opened.url("fleet-02"), echo.port, "--http",
                  "--token-file", token)
    line = agent.wait_log(r"the server refused the agent: 401 Unauthorized: ([^\n]*); "
                          r"retrying in 1\.0 s")
    assert line.group(1) == "agent fleet-02: %s" % reason
    opened.proc.wait_log(r"refused 'GET /tunnel/fleet-02 HTTP/1\.1': 401 agent fleet-02: %s"
                         % re.escape(reason))
    assert agent.stdout() == ""
    assert "agent fleet-02: registered openly" not in opened.proc.whole_log()
    assert "fleet-02" not in {row["id"] for row in tunnel_status(opened.port)["agents"]}


def test_without_open_registration_an_unknown_id_is_a_403(processes, tmp_path, closed, echo):
    agent = Agent(processes, tmp_path, closed.url("stranger"), echo.port, "--http",
                  "--token-file", closed.token_file("stranger"))
    line = agent.wait_log(r"the server refused the agent: 403 Forbidden: ([^\n]*); "
                          r"retrying in 1\.0 s")
    assert line.group(1) == "agent ID 'stranger' is not in the tunnel configuration"
    assert agent.stdout() == ""
    assert "registered openly" not in closed.proc.whole_log()


# -- open registration: a websocktunnel-style client (raw socket) -------------------------

def signed_token(config, agent_id):
    """A token from websockify-sign agent --config FILE ID, as an operator makes one."""
    result = subprocess.run([PYTHON, "-m", "websockify.sign", "agent", "--config", config,
                             agent_id], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def wst_register(rendezvous, agent_id, token):
    return RawWebSocket(rendezvous.port, path="/", protocols=None,
                        extra=("x-websocktunnel-id: %s" % agent_id,
                               "Authorization: Bearer %s" % token))


def test_a_websocktunnel_client_registers_openly(opened):
    ws = wst_register(opened, "wst-open", signed_token(opened.config, "wst-open"))
    try:
        assert ws.status == 101, ws.buffer
        # The URL's host is the request's Host (here without a port).
        assert ws.headers["x-websocktunnel-client-url"] == "http://127.0.0.1/t/wst-open/"
        opened.proc.wait_log(r"agent wst-open: registered openly")
        opened.proc.wait_log(r"agent wst-open connected from 127\.0\.0\.1:\d+ \(worker [12], "
                             r"websocktunnel client\)")
        rows = {row["id"]: row for row in tunnel_status(opened.port)["agents"]}
        assert rows["wst-open"]["connected"] is True
    finally:
        ws.close()


@pytest.mark.parametrize("agent_id, secret, status, reason", [
    ("wst!bad", SECRET, 400, "agent ID 'wst!bad' is not a valid ID"),
    ("wst*", SECRET, 400, "agent ID 'wst*' is not a valid ID"),
    ("wst-bad-token", OTHER_SECRET, 401, "agent wst-bad-token: bad token signature"),
])
def test_a_websocktunnel_client_refused_open_registration(opened, agent_id, secret, status,
                                                          reason):
    ws = wst_register(opened, agent_id, agent_token(agent_id, secret))
    try:
        assert ws.status == status, ws.buffer
    finally:
        ws.close()
    line = opened.proc.wait_log(r"refused 'GET / HTTP/1\.1': (\d+) ([^\n]*)")
    assert (int(line.group(1)), line.group(2).startswith(reason)) == (status, True), line.group(0)
    assert "registered openly" not in opened.proc.log()


def test_a_websocktunnel_client_without_open_registration_is_a_403(closed):
    ws = wst_register(closed, "wst-stranger", agent_token("wst-stranger", SECRET))
    try:
        assert ws.status == 403, ws.buffer
    finally:
        ws.close()
    closed.proc.wait_log(r"refused 'GET / HTTP/1\.1': 403 agent ID 'wst-stranger' is not in "
                         r"the tunnel configuration")


# -- the URL works: a viewer through the real agent -----------------------------------------

@pytest.mark.parametrize("flag", ["--http", None])
def test_the_printed_url_reaches_the_service_keep_alive_only_with_http(processes, tmp_path,
                                                                       closed, flag):
    """Two requests to the printed URL: with --http on one viewer connection, and
    the service gets both on one connection; without, the server passes each
    with Connection: close and ends the viewer's connection after it, so the
    viewer connects again."""
    import http.client
    from urllib.parse import urlsplit
    from tests.http_service import HttpService
    service = HttpService()
    try:
        agent = Agent(processes, tmp_path, closed.url("web"), service.port,
                      "--token-file", closed.token_file("web"), *([flag] if flag else []))
        url = wait_for(lambda: agent.stdout().strip(), what="the printed URL")
        assert url == closed.viewer_url("web")
        parts = urlsplit(url)
        viewer = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        try:
            for n in range(2):
                viewer.request("GET", parts.path + "echo/%d" % n)
                answer = viewer.getresponse()
                assert answer.status == 200
                assert json.loads(answer.read())["path"] == "/echo/%d" % n
                if not flag:
                    viewer.close()      # the server closes it after this one request
        finally:
            viewer.close()
        with service.lock:
            requests = list(service.requests)
        assert [r["path"] for r in requests] == ["/echo/0", "/echo/1"]
        closes = [r["headers"].get("Connection", "").lower() == "close" for r in requests]
        viewers = r"-> agent web \(http\): viewer connection closed after (\d+) request"
        if flag:
            assert closes == [False, False]
            assert len(service.connections) == 1
            closed.proc.wait_log(viewers)
            assert re.findall(viewers, closed.proc.log()) == ["2"]
        else:
            assert closes == [True, True]
            assert len(service.connections) == 2
            wait_for(lambda: re.findall(viewers, closed.proc.log()) == ["1", "1"],
                     what="two viewer connections of one request each")
    finally:
        service.close()
