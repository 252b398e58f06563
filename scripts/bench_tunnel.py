"""Tunnel phases of scripts/bench: our reverse tunnel against the direct bridge and
reverse_websockify, side by side on 127.0.0.1.

Sides (each phase on freshly started processes):
  ours     websockify --workers 2 --tunnel-config F + websockify-agent; users
           reach the agent's service through the agent's TCP `listen` port
  bridge   websockify --workers 2 LISTEN TARGET, the direct bridge (no tunnel),
           measured with a WebSocket client as scripts/bench does
  rw       reverse_websockify_server + its agent, built from the tarballs in
           ../shared/peers with their build.sh (needs golang-go; skipped with
           the reason when it cannot be built)

Phases:
  one stream   download and upload through one stream
  100 streams  100 users download at once through one agent: aggregate MB/s
               and the slowest stream's share of the mean
  stalled      a user who never reads beside a bulk download on the same
               agent: the bulk stream's MB/s against its solo run, and the
               server's memory before and after
  idle agents  1,000 agents held by one server (lightweight agents run by this
               script over the same protocol, websockify.protocol.mux): PSS per
               agent, and every one of them answering through the bridge face
  idle wst-client agents  N websocktunnel clients (wst-client, built by
               build.sh) held by one server: ours (--tunnel-config naming the N
               IDs) against websocktunnel's own server; PSS per agent, and each
               client answering (a tiny HTTP service behind all of them: ours
               through the bridge face, websocktunnel through its viewer URLs)
  two instances  two servers sharing one redis-server ([tunnels] registry), the
               agent held by the first: the same download through the TCP face
               of the instance that does not hold the agent (carried over the
               internal link) against the holding instance's (skipped with the
               reason without redis-server or redis-py; the HTTP face's
               download is the HTTP phase's)
  HTTP         viewers through the HTTP face (scripts/bench_http.py): one
               --http-size download and 100 keep-alive viewers' small requests,
               ours against websocktunnel and the direct service, and the
               download at two instances

  ceiling      the same one-stream downloads (TCP: beside the bridge; HTTP:
               beside the direct service) through scripts/bench_bare_relay.py,
               the least work a two-hop tunnel does: "masked" (each hop reads,
               XORs and writes, as a WebSocket client and its server must) and
               "splice" (a link that is not WebSocket: no byte enters either
               process): how close ours is to what this machine allows

--tunnel-phases cluster runs the two-instance phase alone, --tunnel-phases wst the
idle wst-client one (N = --wst-agents), --tunnel-phases http the HTTP one,
--tunnel-phases ceiling the ceiling one.

The script is loaded by scripts/bench (--tunnel); it uses its helpers (B).
"""

import importlib.util
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import time

PEERS_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "..", "shared", "peers")
AGENT_ID = "bench"
SECRET = b"tunnel bench secret, not for production"


def _token(agent_id):
    from websockify.tunnel.agent_token import make_agent_token
    return make_agent_token(agent_id, SECRET, 3600, time.time())


def _write(path, text):
    with open(path, "w") as handle:
        handle.write(text)
    return path


def _http_get(port, path, timeout=5):
    """The body of a 200 answer to GET ``path``, or None."""
    with socket.create_connection((B.HOST, port), timeout=timeout) as conn:
        conn.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\n"
                      "Connection: close\r\n\r\n" % path).encode())
        data = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return body if b" 200 " in head.split(b"\r\n")[0] else None


def _http_json(port, path):
    body = _http_get(port, path)
    return None if body is None else json.loads(body.decode())


def _wait(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (OSError, ValueError):
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise B.BenchError("timed out waiting for %s" % what)


# -- the sides ----------------------------------------------------------------------------

class OursTunnel:
    label = "ours (tunnel)"
    key = "ours"

    def __init__(self, workdir, python, env):
        self.workdir = workdir
        self.python = python
        self.env = env

    def config(self, agents, listen=None, token=False):
        secret = _write(os.path.join(self.workdir, "tunnel.key"), SECRET.decode())
        lines = ['[tunnels]', 'path = "/tunnel/"', 'secrets = [%s]' % json.dumps(secret), ""]
        for agent_id in agents:
            lines.append("[tunnels.agent.%s]" % agent_id)
            if listen:
                lines.append('listen = "127.0.0.1:%d"' % listen)
            if token:
                lines.append("token = true")
        return _write(os.path.join(self.workdir, "tunnels.toml"), "\n".join(lines) + "\n")

    def start_server(self, config, name, workers=2):
        port = B.free_port()
        srv = B.Proc([self.python, "-m", "websockify", "--workers", str(workers),
                      "--tunnel-config", config, "127.0.0.1:%d" % port], name, env=self.env)
        _wait(lambda: B.is_listening(port) or not srv.alive(), 60, "the tunnel server")
        if not srv.alive():
            raise B.BenchError("tunnel server exited:\n%s" % srv.log_tail())
        return srv, port

    def connected(self, port, count):
        doc = _http_json(port, "/tunnel/")
        return doc is not None and sum(a["connected"] for a in doc["agents"]) >= count

    def start(self, tport, name):
        """Server + one agent for the service at tport; the user port."""
        listen = B.free_port()
        srv, port = self.start_server(self.config([AGENT_ID], listen=listen), name + "-server")
        token = _write(os.path.join(self.workdir, "agent.token"), _token(AGENT_ID))
        agent = B.Proc([self.python, "-m", "websockify.agent", "--service",
                        "127.0.0.1:%d" % tport, "--server",
                        "ws://127.0.0.1:%d/tunnel/%s" % (port, AGENT_ID),
                        "--token-file", token], name + "-agent", env=self.env)
        _wait(lambda: self.connected(port, 1) or not agent.alive(), 60, "the agent")
        if not agent.alive():
            raise B.BenchError("agent exited:\n%s" % agent.log_tail())
        return [agent, srv], listen, srv.pid


class ReverseWebsockify:
    label = "reverse_websockify"
    key = "rw"

    def __init__(self, workdir, bindir):
        self.workdir = workdir
        self.bindir = bindir

    def start(self, tport, name):
        port, listen = B.free_port(), B.free_port()
        config = _write(os.path.join(self.workdir, "rw.toml"),
                        'http_server_endpoint = "127.0.0.1:%d"\n\n[remote_service.%s]\n'
                        'nickname = "bench"\nlocal_listen_endpoint = "127.0.0.1:%d"\n'
                        % (port, AGENT_ID, listen))
        srv = B.Proc([os.path.join(self.bindir, "reverse_websockify_server"), config],
                     name + "-server", cwd=self.workdir)
        _wait(lambda: B.is_listening(port) or not srv.alive(), 30, "reverse_websockify_server")
        agent = B.Proc([os.path.join(self.bindir, "reverse_websockify_agent_service_side"),
                        "--service", "127.0.0.1:%d" % tport, "--reverse-websockify",
                        "ws://127.0.0.1:%d/forward_to_me/%s" % (port, AGENT_ID)],
                       name + "-agent", cwd=self.workdir)

        def connected():
            doc = _http_json(port, "/")
            return doc and doc[AGENT_ID]["service_connection_info"]
        _wait(lambda: connected() or not agent.alive(), 30, "the reverse_websockify agent")
        if not agent.alive():
            raise B.BenchError("reverse_websockify agent exited:\n%s" % agent.log_tail())
        return [agent, srv], listen, srv.pid


class ClusterPair:
    """Two of our instances and one redis-server; the agent connects to the first."""

    label = "ours (two instances)"
    key = "cluster"

    def __init__(self, workdir, python, env):
        self.workdir = workdir
        self.python = python
        self.env = env
        self.ours = OursTunnel(workdir, python, env)

    def unavailable(self):
        """Why the phase cannot run here, or None."""
        if shutil.which("redis-server") is None:
            return "redis-server not found (apt-get install redis-server)"
        if subprocess.call([self.python, "-c", "import redis"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL) != 0:
            return "redis-py missing (pip install 'websockify[redis]')"
        return None

    def _holder(self, rport):
        import redis
        value = redis.Redis(port=rport).get("websockify:tunnel:" + AGENT_ID)
        return value.decode().split(" ")[0] if value else None

    def start(self, tport, name, http_path=None):
        """(processes, the holder's user port, the other's user port); self.ports: the
        instances' own ports.  With http_path, the agent (--http) also has the HTTP face there."""
        rport = B.free_port()
        procs = [B.Proc(["redis-server", "--port", str(rport), "--bind", B.HOST, "--save", "",
                         "--appendonly", "no", "--dir", self.workdir], name + "-redis")]
        _wait(lambda: B.is_listening(rport), 30, "redis-server")
        _write(os.path.join(self.workdir, "tunnel.key"), SECRET.decode())
        _write(os.path.join(self.workdir, "cluster.key"), "bench cluster secret\n")
        faces, nodes = [], []
        http = ['http_path = "%s"' % http_path] if http_path else []
        for index in range(2):
            face, node = B.free_port(), B.free_port()
            config = _write(os.path.join(self.workdir, "cluster-%d.toml" % index), "\n".join([
                "[tunnels]", 'secrets = ["tunnel.key"]',
                'registry = "redis://%s:%d/0"' % (B.HOST, rport),
                'node = "%s:%d"' % (B.HOST, node), 'cluster_secret = "cluster.key"'] + http + [
                "[tunnels.agent.%s]" % AGENT_ID, 'listen = "%s:%d"' % (B.HOST, face)]
                + (["http = true"] if http_path else [])) + "\n")
            srv, port = self.ours.start_server(config, "%s-server%d" % (name, index))
            procs.append(srv)
            faces.append(face)
            nodes.append((port, "%s:%d" % (B.HOST, node)))
        self.ports = [port for port, _ in nodes]
        token = _write(os.path.join(self.workdir, "agent.token"), _token(AGENT_ID))
        procs.insert(0, B.Proc([self.python, "-m", "websockify.agent"]
                               + (["--http"] if http_path else []) + ["--service",
                                "127.0.0.1:%d" % tport, "--server",
                                "ws://127.0.0.1:%d/tunnel/%s" % (nodes[0][0], AGENT_ID),
                                "--token-file", token], name + "-agent", env=self.env))
        agent = procs[0]
        _wait(lambda: self._holder(rport) == nodes[0][1] or not agent.alive(), 60,
              "the agent registered")
        if not agent.alive():
            raise B.BenchError("the agent exited (%s): %s" % (
                os.path.relpath(agent.log_path, B.ROOT), agent.log_tail(1).strip()))
        return procs, faces[0], faces[1]


def build_peers(bench_dir):
    """The directory of reverse_websockify's binaries, or (None, why not)."""
    out = os.path.join(bench_dir, "peers")
    wanted = ("reverse_websockify_server", "reverse_websockify_agent_service_side",
              "websocktunnel", "wst-client")
    if all(os.path.exists(os.path.join(out, name)) for name in wanted):
        return out, None
    script = os.path.join(PEERS_SRC, "build.sh")
    if not os.path.exists(script):
        return None, "no ../shared/peers/build.sh beside the repository"
    if shutil.which("go") is None:
        return None, "go not found (apt-get install golang-go)"
    B.note("building reverse_websockify and websocktunnel from ../shared/peers")
    done = subprocess.run(["bash", script, out], capture_output=True, text=True)
    if done.returncode != 0 or not all(os.path.exists(os.path.join(out, n)) for n in wanted):
        return None, "build.sh failed: %s" % (done.stderr.strip().splitlines() or ["?"])[-1]
    return out, None


# -- the measurements ---------------------------------------------------------------------

def drain(sock, count, view):
    """Read ``count`` bytes (fewer if the peer closes) into ``view``, over and over;
    (bytes read, the length of the last read, whose bytes are at the start of view)."""
    got = last = 0
    recv_into = sock.recv_into
    size = len(view)
    while got < count:
        last = recv_into(view, min(size, count - got))
        if not last:
            break
        got += last
    return got, last


def tcp_download(port, total, timeout=120):
    """MB/s of reading ``total`` bytes from a TCP user port."""
    sock = socket.create_connection((B.HOST, port), timeout=timeout)
    try:
        t0 = time.perf_counter()
        got, _ = drain(sock, total, memoryview(bytearray(1 << 20)))
        elapsed = time.perf_counter() - t0
    finally:
        sock.close()
    if got < total:
        raise B.BenchError("download: got %d of %d bytes" % (got, total))
    return total / elapsed / 1e6


def tcp_upload(port, total, timeout=120):
    """MB/s of sending ``total`` bytes to a sink service (it answers b"D" at the end)."""
    sock = socket.create_connection((B.HOST, port), timeout=timeout)
    block = os.urandom(1 << 20)
    try:
        t0 = time.perf_counter()
        left = total
        while left > 0:
            sent = sock.send(block[:min(left, len(block))])
            left -= sent
        if sock.recv(1) != b"D":
            raise B.BenchError("upload: the service never confirmed")
        elapsed = time.perf_counter() - t0
    finally:
        sock.close()
    return total / elapsed / 1e6


def many_downloads(port, streams, each, timeout=120):
    """(aggregate MB/s, slowest stream's MB/s / mean stream MB/s) for ``streams`` at once."""
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(streams):
        sock = socket.create_connection((B.HOST, port), timeout=30)
        sock.setblocking(False)
        socks.append(sock)
    got = {sock: 0 for sock in socks}
    start = time.perf_counter()
    finished = {}
    for sock in socks:
        sel.register(sock, selectors.EVENT_READ)
    buf = bytearray(1 << 18)
    deadline = time.monotonic() + timeout
    try:
        while len(finished) < streams:
            if time.monotonic() > deadline:
                raise B.BenchError("100 streams: %d of %d finished" % (len(finished), streams))
            for key, _ in sel.select(1.0):
                sock = key.fileobj
                try:
                    n = sock.recv_into(buf)
                except BlockingIOError:
                    continue
                got[sock] += n
                if not n or got[sock] >= each:
                    if got[sock] < each:
                        raise B.BenchError("a stream ended after %d of %d bytes"
                                           % (got[sock], each))
                    finished[sock] = time.perf_counter()
                    sel.unregister(sock)
    finally:
        for sock in socks:
            sock.close()
    elapsed = max(finished.values()) - start
    rates = [each / (finished[sock] - start) for sock in socks]
    mean = sum(rates) / len(rates)
    return streams * each / elapsed / 1e6, min(rates) / mean


def stalled_beside_bulk(port, server_pid, total, timeout=60):
    """(solo MB/s, bulk MB/s beside a stalled user, PSS KiB before, after)."""
    solo = tcp_download(port, total)
    pss_before = B.tree_pss_kib(server_pid)
    stalled = socket.create_connection((B.HOST, port), timeout=30)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        time.sleep(1.0)     # the stalled stream fills every buffer it is allowed
        try:
            bulk = tcp_download(port, total, timeout=timeout)
        except (socket.timeout, B.BenchError) as exc:
            B.note("  bulk beside a stalled user did not finish: %s" % exc)
            bulk = 0.0
        pss_after = B.tree_pss_kib(server_pid)
    finally:
        stalled.close()
    return solo, bulk, pss_before, pss_after


class IdleAgents:
    """Many lightweight agents in this process, over the tunnel protocol (pure parts)."""

    def __init__(self, port, ids):
        from websockify.protocol import frames, handshake, mux
        self.frames, self.handshake, self.mux = frames, handshake, mux
        self.port = port
        self.ids = ids
        self.sel = selectors.DefaultSelector()
        self.agents = {}

    def connect_all(self, window=64):
        pending = list(self.ids)
        opening = {}
        while pending or opening:
            while pending and len(opening) < window:
                agent_id = pending.pop()
                sock = socket.create_connection((B.HOST, self.port), timeout=30)
                key = self.handshake.client_key(os.urandom(16))
                sock.sendall(self.handshake.client_request(
                    "127.0.0.1:%d" % self.port, "/tunnel/" + agent_id, key,
                    self.mux.SUBPROTOCOL, [("Authorization", "Bearer " + _token(agent_id))]))
                opening[sock] = (agent_id, key, b"")
            for sock in list(opening):
                agent_id, key, head = opening.pop(sock)
                while b"\r\n\r\n" not in head:
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise B.BenchError("agent %s: connection closed in the handshake"
                                           % agent_id)
                    head += chunk
                head, _, rest = head.partition(b"\r\n\r\n")
                self.handshake.check_client_response(head + b"\r\n\r\n", key,
                                                     self.mux.SUBPROTOCOL)
                self._add(agent_id, sock, rest)

    def _add(self, agent_id, sock, rest):
        conn = self.mux.Connection("agent")
        state = {"id": agent_id, "sock": sock, "conn": conn, "message": bytearray()}

        def on_data(chunk, opcode):
            state["message"] += chunk

        def on_control(opcode, payload):
            if opcode == self.frames.OP_PING:
                sock.sendall(self.frames.encode_client_frame(self.frames.OP_PONG, payload,
                                                             os.urandom(4)))

        def on_end(opcode):
            message, state["message"] = bytes(state["message"]), bytearray()
            for event in conn.receive_message(message):
                if isinstance(event, self.mux.StreamOpened):
                    conn.accept_stream(event.stream_id)
                elif isinstance(event, self.mux.DataReceived):
                    conn.send_data(event.stream_id, event.data)      # an echo service
                    conn.consumed(event.stream_id, len(event.data))
            for payload in conn.data_to_send():
                sock.sendall(self.frames.encode_client_frame(self.frames.OP_BINARY, payload,
                                                             os.urandom(4)))

        state["parser"] = self.frames.FrameParser(on_data, on_control, on_message_end=on_end,
                                                  expect_masked=False)
        sock.setblocking(False)
        self.sel.register(sock, selectors.EVENT_READ, state)
        self.agents[agent_id] = state
        if rest:
            state["parser"].feed(rest)

    def pump(self, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for key, _ in self.sel.select(0.05):
                try:
                    data = key.fileobj.recv(65536)
                except BlockingIOError:
                    continue
                if not data:
                    self.sel.unregister(key.fileobj)
                    continue
                key.fileobj.setblocking(True)
                key.data["parser"].feed(data)
                key.fileobj.setblocking(False)

    def close(self):
        for state in self.agents.values():
            state["sock"].close()


def bridge_echo(port, agent_id, agents, payload=b"are you there?"):
    """A WebSocket user through the bridge face (?token=ID), echoed by that agent."""
    sock = socket.create_connection((B.HOST, port), timeout=10)
    try:
        sock.sendall(B.handshake_request(port).replace(
            b"GET / ", ("GET /?token=%s " % agent_id).encode(), 1))
        head = b""
        sock.setblocking(False)
        deadline = time.monotonic() + 10
        while b"\r\n\r\n" not in head:
            agents.pump(0.01)
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                chunk = None
            if chunk == b"":
                return False
            head += chunk or b""
            if time.monotonic() > deadline:
                return False
        head, _, rest = head.partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n")[0]:
            return False
        sock.setblocking(True)
        sock.sendall(B.client_frame(payload))
        sock.setblocking(False)
        data = rest
        while payload not in data:
            agents.pump(0.01)
            try:
                data += sock.recv(65536)
            except BlockingIOError:
                pass
            if time.monotonic() > deadline:
                return False
        return True
    finally:
        sock.close()


def idle_agents(side, count):
    """(KiB of PSS per agent, answering agents) for ``count`` agents on one server."""
    ids = ["a%04d" % number for number in range(count)]
    srv, port = side.start_server(side.config(ids, token=True), "tunnel-idle-server")
    agents = None
    try:
        time.sleep(1.0)
        idle = B.tree_pss_kib(srv.pid)
        agents = IdleAgents(port, ids)
        agents.connect_all()
        _wait(lambda: (agents.pump(0.1), side.connected(port, count))[1], 120,
              "%d agents connected" % count)
        agents.pump(1.0)
        loaded = B.tree_pss_kib(srv.pid)
        answering = sum(bridge_echo(port, agent_id, agents) for agent_id in ids)
        return (loaded - idle) / count, answering
    finally:
        if agents is not None:
            agents.close()
        srv.stop()


class HelloService:
    """A tiny HTTP service behind every wst-client: ``GET`` answers 200 "hello"."""

    def __init__(self):
        import http.server
        import threading

        class Hello(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", "5")
                self.end_headers()
                self.wfile.write(b"hello")

            def log_message(self, *args):
                pass
        self.httpd = http.server.ThreadingHTTPServer((B.HOST, 0), Hello)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def ours_wst_server(workdir, python, env, ids):
    """Our server naming ``ids`` as websocktunnel clients; (proc, port, answers(id))."""
    secret = _write(os.path.join(workdir, "wst.key"), SECRET.decode())
    lines = ["[tunnels]", "secrets = [%s]" % json.dumps(secret), 'http_path = "/view/"']
    for agent_id in ids:
        lines += ["[tunnels.agent.%s]" % agent_id, "token = true"]
    config = _write(os.path.join(workdir, "wst-tunnels.toml"), "\n".join(lines) + "\n")
    srv, port = OursTunnel(workdir, python, env).start_server(config, "tunnel-wst-ours")
    return srv, port, lambda agent_id: bridge_http_get(port, agent_id)


def websocktunnel_server(bindir):
    """websocktunnel's server (configured by environment only); (proc, port, answers(id))."""
    port = B.free_port()
    env = dict(os.environ, URL_PREFIX="http://%s:%d" % (B.HOST, port), PORT=str(port),
               TASKCLUSTER_PROXY_SECRET_A=SECRET.decode(),
               TASKCLUSTER_PROXY_SECRET_B=SECRET.decode())
    srv = B.Proc([os.path.join(bindir, "websocktunnel")], "tunnel-wst-websocktunnel", env=env)
    # it listens on every address (":PORT", dual-stack): probe by connecting
    _wait(lambda: socket.create_connection((B.HOST, port), timeout=1).close() or True
          if srv.alive() else True, 30, "websocktunnel")
    if not srv.alive():
        raise B.BenchError("websocktunnel exited:\n%s" % srv.log_tail())
    return srv, port, lambda agent_id: viewer_get(port, "/%s/" % agent_id)


def viewer_get(port, path):
    """True when an HTTP GET of ``path`` answers 200 "hello"."""
    return _http_get(port, path, timeout=10) == b"hello"


def bridge_http_get(port, agent_id):
    """True when a GET sent through the bridge face (?token=ID) comes back 200 "hello"."""
    sock = socket.create_connection((B.HOST, port), timeout=10)
    try:
        sock.sendall(B.handshake_request(port).replace(
            b"GET / ", ("GET /?token=%s " % agent_id).encode(), 1))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return False
            data += chunk
        if b" 101 " not in data.split(b"\r\n")[0]:
            return False
        sock.sendall(B.client_frame(b"GET / HTTP/1.0\r\nHost: hello\r\n\r\n"))
        # the server's frames are unmasked: the answer's bytes appear as they are
        while not (b" 200 " in data and b"hello" in data.split(b" 200 ", 1)[1]):
            chunk = sock.recv(65536)
            if not chunk:
                return False
            data += chunk
        return True
    except socket.timeout:
        return False
    finally:
        sock.close()


def idle_wst_clients(start_server, bindir, workdir, count, label):
    """(KiB of PSS per client, answering clients) for ``count`` wst-clients on one server."""
    ids = ["w%04d" % number for number in range(count)]
    service = HelloService()
    srv, port, answers = start_server(ids)
    clients = []
    urls = os.path.join(workdir, "wst-urls-" + label)
    shutil.rmtree(urls, ignore_errors=True)
    os.makedirs(urls)
    try:
        time.sleep(3.0)     # let the server settle before the baseline
        idle = B.tree_pss_kib(srv.pid)
        started = time.monotonic()
        for agent_id in ids:
            clients.append(subprocess.Popen(
                [os.path.join(bindir, "wst-client"), "ws://%s:%d" % (B.HOST, port), agent_id,
                 str(service.port), "--token", _token(agent_id),
                 "--out-file", os.path.join(urls, agent_id)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True))
        # wst-client writes its URL file once the server has answered its upgrade
        _wait(lambda: len(os.listdir(urls)) >= count, 300,
              "%d wst-clients registered with %s" % (count, label))
        B.note("  %s: %d wst-clients registered in %.1f s" % (
            label, count, time.monotonic() - started))
        time.sleep(2.0)
        loaded = B.tree_pss_kib(srv.pid)
        answering = sum(bool(answers(agent_id)) for agent_id in ids)
        return (loaded - idle) / count, answering
    finally:
        for client in clients:
            client.kill()
        for client in clients:
            client.wait()
        srv.stop()
        service.close()


def wst_phase(python, env, workdir, bindir, why, opts, results, errors):
    """The idle wst-client phase: ours against websocktunnel's own server."""
    results["wst"] = {"n": opts.wst_agents}
    if bindir is None:
        results["wst"]["why"] = why
        B.note("idle wst-client phase skipped: %s" % why)
        return
    sides = (("ours", lambda ids: ours_wst_server(workdir, python, env, ids)),
             ("websocktunnel", lambda ids: websocktunnel_server(bindir)))
    for label, start_server in sides:
        try:
            results["wst"][label] = idle_wst_clients(start_server, bindir, workdir,
                                                     opts.wst_agents, label)
            B.note("  idle wst-clients, %s: %.1f KiB each, %d of %d answering" % (
                label, results["wst"][label][0], results["wst"][label][1], opts.wst_agents))
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            B.note("ERROR idle wst-clients / %s: %s" % (label, exc))
            errors.append("idle wst-clients / %s: %s" % (label, exc))


def report_wst(wst):
    n = wst["n"]
    ours, theirs = wst.get("ours"), wst.get("websocktunnel")

    def kib(side):
        return "%.1f" % side[0] if side else "-"

    def answering(side):
        return ("yes" if side[1] == n else "no (%d of %d)" % (side[1], n)) if side else "-"
    lines = ["| %d idle wst-client agents, one server | ours | websocktunnel | "
             "ours / websocktunnel |" % n, "|---|---:|---:|---:|",
             "| server PSS KiB per agent | %s | %s | %s |" % (
                 kib(ours), kib(theirs), "%.2f" % (ours[0] / theirs[0])
                 if ours and theirs and theirs[0] > 0 else "-"),
             "| all answering | %s | %s | |" % (answering(ours), answering(theirs)), "",
             "Idle wst-clients: websocktunnel's own client (build.sh), one process per agent, "
             "all with one HTTP service behind them; PSS summed over the server's processes "
             "(ours: --workers 2), after minus before, over N; answering = a GET through our "
             "bridge face, or websocktunnel's viewer URL, came back 200.%s" % (
                 " Skipped: %s." % wst["why"] if wst.get("why") else "")]
    return "\n".join(lines) + "\n"


# -- the run -------------------------------------------------------------------------------

def run(bench, opts, cfg):
    """Run the tunnel phases; the Markdown report and the list of errors."""
    global B
    B = bench
    workdir = os.path.join(B.BENCH_DIR, "tunnel")
    os.makedirs(workdir, exist_ok=True)
    # Every byte an agent sends is masked by it and unmasked by the server
    # (RFC 6455 makes the agent, a WebSocket client, mask): the tunnel and
    # the bridge it is compared with run on the interpreter running this
    # script, with numpy when it has it (make bench's virtualenv does: the
    # numpy extra), and the report says which.
    python = sys.executable
    env = dict(os.environ, PYTHONPATH=B.ROOT)
    has_numpy = subprocess.call([python, "-c", "import numpy"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL) == 0
    opts.tunnel_numpy = has_numpy
    ours = OursTunnel(workdir, python, env)
    bindir, why = build_peers(B.BENCH_DIR)
    rw = ReverseWebsockify(workdir, bindir) if bindir else None
    if rw is None:
        B.note("reverse_websockify column skipped: %s" % why)
    volume = cfg["volume"]
    results = {"ours": {}, "rw": {}, "bridge": {}}
    errors = []

    def with_side(side, mode, total, name, fn):
        target = procs = None
        try:
            target, tport = B.start_target(python, mode, total, "tunnel")
            procs, port, server_pid = side.start(tport, "tunnel-%s-%s" % (side.key, name))
            fn(port, server_pid)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            msg = "%s / %s: %s" % (side.label, name, exc)
            B.note("ERROR " + msg)
            errors.append(msg)
        finally:
            for proc in procs or ():
                proc.stop()
            if target:
                target.stop()

    def direct(mode, total, fn):
        target = srv = None
        try:
            target, tport = B.start_target(python, mode, total, "tunnel")
            srv, port = start_bridge(python, env, tport, "tunnel-bridge")
            fn(port)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            B.note("ERROR bridge: %s" % exc)
            errors.append("bridge: %s" % exc)
        finally:
            if srv:
                srv.stop()
            if target:
                target.stop()

    if getattr(opts, "tunnel_phases", "all") == "cluster":
        results["cluster"] = {}
        cluster_phase(python, env, workdir, volume, opts, results, errors)
        return report_cluster(results["cluster"], volume, opts), results, errors
    if getattr(opts, "tunnel_phases", "all") == "wst":
        wst_phase(python, env, workdir, bindir, why, opts, results, errors)
        return report_wst(results["wst"]), results, errors
    if getattr(opts, "tunnel_phases", "all") == "ceiling":
        ceiling_phase(python, env, workdir, volume, cfg, opts, results, errors)
        return report_ceiling(results["ceiling"]), results, errors
    if getattr(opts, "tunnel_phases", "all") == "http":
        http = load_http_phase()
        http.http_phase(sys.modules[__name__], python, env, workdir, bindir, why, opts, cfg,
                        results, errors)
        return http.report(results["http"], opts), results, errors

    sides = [ours] + ([rw] if rw else [])
    rounds = {"ours": {"down": [], "up": []}, "rw": {"down": [], "up": []},
              "bridge": {"down": [], "up": []}}
    for number in range(opts.rounds):
        B.note("tunnel round %d of %d" % (number + 1, opts.rounds))
        for side in sides:
            rv = volume if side.key == "ours" else min(volume, 64 << 20)
            with_side(side, "source", rv, "down", lambda port, pid, s=side, v=rv:
                      rounds[s.key]["down"].append(tcp_download(port, v)))
            with_side(side, "sink", rv, "up", lambda port, pid, s=side, v=rv:
                      rounds[s.key]["up"].append(tcp_upload(port, v)))
        direct("source", volume, lambda port: rounds["bridge"]["down"].append(
            B.measure_downstream(port, volume)))
        direct("sink", (volume // 65536) * 65536, lambda port: rounds["bridge"]["up"].append(
            B.measure_upstream(port, (volume // 65536) * 65536)))
    for key in rounds:
        for phase, values in rounds[key].items():
            if values:
                results[key][phase] = sorted(values)[len(values) // 2]
                B.note("  %s %s: %s MB/s (median %.1f)" % (
                    key, phase, ", ".join("%.1f" % v for v in values), results[key][phase]))

    each = max(1 << 20, volume // 64)
    for side in sides:
        with_side(side, "source", each, "streams", lambda port, pid, s=side: results[s.key]
                  .update(zip(("agg", "fair"), many_downloads(port, 100, each))))
        with_side(side, "source", volume if side.key == "ours" else min(volume, 64 << 20),
                  "stalled", lambda port, pid, s=side, v=volume: results[s.key].update(
                      zip(("solo", "bulk", "pss0", "pss1"), stalled_beside_bulk(
                          port, pid, v if s.key == "ours" else min(v, 64 << 20),
                          timeout=30 if s.key == "rw" else 120))))
    try:
        results["ours"]["idle_kib"], results["ours"]["answering"] = idle_agents(
            ours, opts.tunnel_agents)
    except Exception as exc:
        B.note("ERROR idle agents: %s" % exc)
        errors.append("idle agents: %s" % exc)
    wst_phase(python, env, workdir, bindir, why, opts, results, errors)
    results["cluster"] = {}
    cluster_phase(python, env, workdir, volume, opts, results, errors)
    http = load_http_phase()
    http.http_phase(sys.modules[__name__], python, env, workdir, bindir, why, opts, cfg,
                    results, errors)
    ceiling_phase(python, env, workdir, volume, cfg, opts, results, errors)
    return (report(results, rw is not None, why, volume, each, opts)
            + "\n" + report_wst(results["wst"])
            + "\n" + report_cluster(results["cluster"], volume, opts)
            + "\n" + http.report(results["http"], opts)
            + "\n" + report_ceiling(results["ceiling"])), results, errors


CEILING_LABELS = {"reference": "direct (bridge / service)", "ours": "ours (tunnel)",
                  "masked": "bare relay, masked", "splice": "bare relay, splice"}


def start_bridge(python, env, target_port, name):
    """The direct bridge, ``websockify --workers 2`` to target_port; (proc, its port)."""
    port = B.free_port()
    srv = B.Proc([python, "-m", "websockify", "--workers", "2", "127.0.0.1:%d" % port,
                  "127.0.0.1:%d" % target_port], name, env=env)
    try:
        _wait(lambda: B.is_listening(port), 30, "the bridge")
    except B.BenchError:
        srv.stop()
        raise
    return srv, port


def start_bare_relay(python, mode, service_port, name):
    """scripts/bench_bare_relay.py in ``mode`` before the service; (procs, the user port)."""
    script = os.path.join(B.HERE, "bench_bare_relay.py")
    link, user = B.free_port(), B.free_port()
    server = B.Proc([python, script, mode, "server", str(link), str(user)], name + "-server",
                    want_stdout=True)
    if server.read_line(20) != "READY":
        server.stop()
        raise B.BenchError("the bare relay did not start:\n%s" % server.log_tail())
    agent = B.Proc([python, script, mode, "agent", str(service_port), str(link)],
                   name + "-agent")
    if server.read_line(20) != "LINKED":
        agent.stop()
        server.stop()
        raise B.BenchError("the bare relay's agent did not connect:\n%s" % agent.log_tail())
    return [agent, server], user


def ceiling_phase(python, env, workdir, volume, cfg, opts, results, errors):
    """One-stream downloads: the bridge (TCP) and the direct service (HTTP) against
    ours and the two bare relays, each path on fresh processes, sides rotating."""
    http = load_http_phase()
    http.B, http.T = B, sys.modules[__name__]
    ours = OursTunnel(workdir, python, env)
    res = results["ceiling"] = {"tcp": {}, "http": {}, "volume": volume,
                                "http_size": cfg["http_size"], "rounds": opts.rounds}
    tcp = {key: [] for key in CEILING_LABELS}
    web = {key: [] for key in CEILING_LABELS}

    def tcp_path(key):
        procs = []
        target, tport = B.start_target(python, "source", volume, "ceiling")
        procs.append(target)
        try:
            if key == "reference":
                srv, port = start_bridge(python, env, tport, "ceiling-bridge")
                procs.append(srv)
                return B.measure_downstream(port, volume)
            if key == "ours":
                started, port, _ = ours.start(tport, "ceiling-ours")
            else:
                started, port = start_bare_relay(python, key, tport, "ceiling-" + key)
            procs.extend(started)
            return tcp_download(port, volume)
        finally:
            for proc in reversed(procs):
                proc.stop()

    def http_path(key, service_port, service, tail):
        size = cfg["http_size"]
        http.warm(body)
        if key == "reference":
            return http.download(service_port, "/big", size, tail)
        procs = []
        try:
            if key == "ours":
                paths = http.start_paths(python, env, workdir, None, service, service_port,
                                         procs, errors)
                if "ours" not in paths:
                    raise B.BenchError("our HTTP face did not start")
                port, prefix, _ = paths["ours"]
                return http.download(port, prefix + "big", size, tail)
            started, port = start_bare_relay(python, key, service_port, "ceiling-http-" + key)
            procs.extend(started)
            return http.download(port, "/big", size, tail)
        finally:
            for proc in reversed(procs):
                proc.stop()

    order = list(CEILING_LABELS)
    service = None
    try:
        body, _, tail = http.big_file(workdir, cfg["http_size"])
        service, service_port = http.start_service(python, body)
        for number in range(opts.rounds):
            B.note("ceiling round %d of %d" % (number + 1, opts.rounds))
            for key in order[number % len(order):] + order[:number % len(order)]:
                for face, into, run in (
                        ("TCP", tcp, lambda: tcp_path(key)),
                        ("HTTP", web, lambda: http_path(key, service_port, service, tail))):
                    try:
                        into[key].append(run())
                        B.note("  %s %s: %.1f MB/s" % (face, key, into[key][-1]))
                    except (OSError, B.BenchError) as exc:
                        B.note("ERROR ceiling / %s: %s" % (key, exc))
                        errors.append("ceiling / %s: %s" % (key, exc))
    except (OSError, B.BenchError) as exc:
        B.note("ERROR ceiling phase: %s" % exc)
        errors.append("ceiling phase: %s" % exc)
    finally:
        if service is not None:
            service.stop()
    for key in order:
        for into, values in ((res["tcp"], tcp[key]), (res["http"], web[key])):
            if values:
                into[key] = http._median(values)


def report_ceiling(ceiling):
    """The ceiling table: each path's median and its ratio to the reference path."""
    out = ["| one-stream download, MB/s | TCP | / direct bridge | HTTP (%d MiB) | / direct "
           "service |" % (ceiling["http_size"] >> 20), "|---|---:|---:|---:|---:|"]
    tcp, web = ceiling["tcp"], ceiling["http"]
    for key, label in CEILING_LABELS.items():
        cells = []
        for values in (tcp, web):
            value, base = values.get(key), values.get("reference")
            cells.append("%.1f" % value if value else "")
            cells.append("%.2f" % (value / base) if value and base and key != "reference"
                         else "")
        out.append("| %s | %s |" % (label, " | ".join(cells)))
    out.append("")
    out.append("Median of %d rounds, each path on fresh processes, %d MiB over TCP.  The bare "
               "relays (scripts/bench_bare_relay.py) carry bytes with no framing, "
               "multiplexing or flow control: \"masked\" is the least a WebSocket link's two "
               "hops do, \"splice\" what a link that is not WebSocket could do on plain TCP."
               % (ceiling["rounds"], ceiling["volume"] >> 20))
    return "\n".join(out) + "\n"


def load_http_phase():
    """scripts/bench_http.py, beside this script."""
    spec = importlib.util.spec_from_file_location(
        "bench_http", os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_http.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cluster_phase(python, env, workdir, volume, opts, results, errors):
    """The same TCP-face download at the holding instance and at the other one, in rounds."""
    pair = ClusterPair(workdir, python, env)

    def start(name):
        target, tport = B.start_target(python, "source", volume, "tunnel")
        try:
            procs, holding_face, other_face = pair.start(tport, name)
        except BaseException:
            target.stop()
            raise
        return procs + [target], holding_face, other_face
    two_instance_rounds(pair, start, lambda face: tcp_download(face, volume), opts.rounds,
                        "two instances", results["cluster"], errors)


def two_instance_rounds(pair, start, measure, rounds, label, into, errors):
    """``into``'s holder and other: the medians of measure(address) at each instance.

    Each round start(name) gives fresh processes and the two addresses (the
    holding instance's first); which is measured first alternates, the
    machine being shared and noisy.  ``into["why"]`` says why it was skipped.
    """
    why = pair.unavailable()
    if why:
        B.note("%s skipped: %s" % (label, why))
        into["why"] = why
        return
    holder, other = [], []
    for number in range(rounds):
        B.note("%s, round %d of %d" % (label, number + 1, rounds))
        procs = None
        try:
            procs, holding, elsewhere = start("tunnel-cluster")
            order = [(holder, holding), (other, elsewhere)]
            for values, address in (order if number % 2 == 0 else order[::-1]):
                values.append(measure(address))
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            B.note("ERROR %s: %s" % (label, exc))
            errors.append("%s: %s" % (label, exc))
        finally:
            for proc in procs or ():
                proc.stop()
    for key, values in (("holder", holder), ("other", other)):
        if values:
            into[key] = sorted(values)[len(values) // 2]
            B.note("  %s, %s: %s MB/s" % (label, key, ", ".join("%.1f" % v for v in values)))


def report_cluster(cluster, volume, opts):
    def num(value):
        return "%.1f" % value if value is not None else "-"
    holder, other = cluster.get("holder"), cluster.get("other")
    lines = ["| two instances, one Redis | at the holding instance | at the other instance | "
             "other / holding |", "|---|---:|---:|---:|",
             "| one TCP-face download MB/s | %s | %s | %s |" % (
                 num(holder), num(other), "%.2f" % (other / holder) if holder and other
                 else "-"), "",
             "Two instances: %d MiB through the agent's TCP face, median of %d rounds; the "
             "other instance carries the user over the internal link to the holder (one more "
             "hop and copy each way); the HTTP face's figure is in the HTTP table.%s" % (
                 volume >> 20, opts.rounds,
                 " Skipped: %s." % cluster["why"] if cluster.get("why") else "")]
    return "\n".join(lines) + "\n"


def report(results, have_rw, why, volume, each, opts):
    ours, rw, bridge = results["ours"], results["rw"], results["bridge"]

    def num(value, fmt="%.1f"):
        return fmt % value if value is not None else "-"

    def ratio(a, b):
        return "%.2f" % (a / b) if a and b else "-"

    lines = ["| tunnel metric | ours (tunnel) | direct bridge | reverse_websockify | "
             "ours / bridge | ours / reverse_websockify |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, name in (("down", "one stream download MB/s"), ("up", "one stream upload MB/s")):
        lines.append("| %s | %s | %s | %s | %s | %s |" % (
            name, num(ours.get(key)), num(bridge.get(key)), num(rw.get(key)),
            ratio(ours.get(key), bridge.get(key)), ratio(ours.get(key), rw.get(key))))
    lines.append("| 100 streams aggregate MB/s | %s | | %s | | %s |" % (
        num(ours.get("agg")), num(rw.get("agg")), ratio(ours.get("agg"), rw.get("agg"))))
    lines.append("| 100 streams: slowest / mean | %s | | %s | | |" % (
        num(ours.get("fair"), "%.2f"), num(rw.get("fair"), "%.2f")))
    for side in (ours, rw):
        if side.get("solo"):
            side["keep"] = side["bulk"] / side["solo"]
    lines.append("| bulk beside a stalled user / solo | %s | | %s | | |" % (
        num(ours.get("keep"), "%.2f"), num(rw.get("keep"), "%.2f")))
    lines.append("| server PSS KiB before / after the stalled test | %s / %s | | %s / %s | | |"
                 % (num(ours.get("pss0"), "%d"), num(ours.get("pss1"), "%d"),
                    num(rw.get("pss0"), "%d"), num(rw.get("pss1"), "%d")))
    lines.append("| %d idle agents: PSS KiB per agent | %s | | | | |" % (
        opts.tunnel_agents, num(ours.get("idle_kib"))))
    lines.append("| %d idle agents: answering through the bridge face | %s | | | | |" % (
        opts.tunnel_agents, num(ours.get("answering"), "%d")))
    lines.append("")
    lines.append("Tunnel: one stream = %d MiB (reverse_websockify: %d MiB), median of %d rounds; "
                 "100 streams x %d MiB; the tunnel's server has --workers 2, the agent is "
                 "websockify-agent (python) or reverse_websockify's Go agent; the users are TCP "
                 "clients of the agent's listen port; %s." % (
                     volume >> 20, min(volume, 64 << 20) >> 20, opts.rounds, each >> 20,
                     "unmasking with numpy (the numpy extra)" if opts.tunnel_numpy else
                     "pure-Python unmasking (no numpy)"))
    if not have_rw:
        lines.append("reverse_websockify column skipped: %s." % why)
    targets = [
        ("one stream >= 10x reverse_websockify", ours.get("down") and rw.get("down") and
         ours["down"] >= 10 * rw["down"]),
        ("one stream >= 0.5x the direct bridge", ours.get("down") and bridge.get("down") and
         ours["down"] >= 0.5 * bridge["down"]),
        ("100 streams: no stream below half the mean", ours.get("fair") is not None and
         ours["fair"] >= 0.5),
        ("bulk beside a stalled user keeps >= 80 %", ours.get("keep") is not None and
         ours["keep"] >= 0.8),
        ("idle agents <= 32 KiB each, all answering", ours.get("idle_kib") is not None and
         ours["idle_kib"] <= 32 and ours.get("answering") == opts.tunnel_agents),
    ]
    lines.append("")
    lines.append("### Tunnel targets")
    lines.append("")
    for name, ok in targets:
        lines.append("- %s: %s" % (name, "PASS" if ok else "FAIL"))
    return "\n".join(lines) + "\n"
