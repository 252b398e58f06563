"""websockify as a library: 0.13's names and semantics, in the shapes of real embedders.

The embedders are scripts in tests/e2e/embedders/ (Nova-style handler subclass,
Emscripten's run-once caller, a websockify_init() caller with monkeypatched
hooks, a threaded LibProxyServer, plugin objects, start_server() in a
thread), started as real processes; the clients are real WebSocket clients
on loopback.  What needs no server (keyword checks, lazy imports, the
WebSocket object, WebSockifyServer.socket) is checked in this process.
"""

import json
import os
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time

import pytest

from tests.helpers import (PYTHON, ROOT, RawWebSocket, children_of, free_port, port_open,
                           wait_for)
from tests.e2e.test_tokens import EchoServer
from websockify.demo.echo import echo_connection

EMBEDDERS = os.path.join(ROOT, "tests", "e2e", "embedders")


def embedder(name):
    return [PYTHON, os.path.join(EMBEDDERS, name)]


@pytest.fixture
def echo4():
    server = EchoServer()
    yield server
    server.close()


def start(processes, argv, port, name, **kwargs):
    proc = processes(argv, name=name, **kwargs)
    wait_for(lambda: port_open(port) or proc.proc.poll() is not None,
             what="%s on port %d" % (name, port))
    assert proc.proc.poll() is None, proc.log()
    return proc


def session(port, path="/", extra=()):
    ws = RawWebSocket(port, path=path, extra=extra)
    assert ws.status == 101, (ws.status, ws.buffer)
    return ws


def echoes(ws, payload=b"hello"):
    ws.send_binary(payload)
    return ws.recv_data(len(payload)) == payload


def close(ws, code=1000):
    ws.send(0x8, struct.pack("!H", code))
    return ws.expect_close()


class ConnectTarget:
    """A target with Nova's CONNECT pre-handshake; held paths answer when released."""

    def __init__(self):
        self.release = threading.Event()
        self.connects = []
        target = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                target.serve(self.request)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve(self, conn):
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(1024)
            if not chunk:
                return
            head += chunk
        line = head.split(b"\r\n")[0].decode()
        self.connects.append(line)
        if "/held" in line:
            self.release.wait(60)
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
        echo_connection(conn)

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def connect_target():
    target = ConnectTarget()
    yield target
    target.close()


def worker_of(ws) -> int:
    fin, opcode, payload = ws.recv_frame()
    assert payload.startswith(b"worker "), payload
    return int(payload.split()[1])


# -- in this process: what needs no server ----------------------------------------

def test_import_websockify_is_cheap_and_has_013s_names():
    code = ("import sys, websockify; assert 'gevent' not in sys.modules; "
            "assert 'websockify.websocketproxy' not in sys.modules; "
            "from websockify import WebSocketProxy, ProxyRequestHandler, LibProxyServer, "
            "websockify_init, websocketproxy, websockifyserver, websocket; "
            "assert websocketproxy.WebSocketProxy is WebSocketProxy; "
            "assert websocketproxy.select_ssl_version('tlsv1_2') & __import__('ssl').OP_NO_TLSv1_1; "
            "assert websockifyserver.WebSockifyServer.socket and websockifyserver.WebSockifyRequestHandler; "
            "assert websocket.WebSocket and websockify.WebSocket is websocket.WebSocket; "
            "assert 'gevent' not in sys.modules; print('ok')")
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert result.stdout.strip() == "ok", result.stderr


def test_unknown_keyword_is_a_type_error_naming_it():
    from websockify import WebSocketProxy
    with pytest.raises(TypeError, match="'bogus'"):
        WebSocketProxy(bogus=1)
    with pytest.raises(TypeError, match="'workers'"):
        WebSocketProxy(listen_port=6080, target_host="h", target_port=1, workers=2)


def test_subclass_pops_its_own_keywords_first():
    from websockify import WebSocketProxy

    class Mine(WebSocketProxy):
        def __init__(self, *args, **kwargs):
            self.extra = kwargs.pop("extra")
            super().__init__(*args, **kwargs)

    proxy = Mine(extra=42, listen_port="6080", target_host="localhost", target_port="5900")
    assert proxy.extra == 42
    assert (proxy.listen_port, proxy.target_port) == (6080, 5900)


def test_request_handler_class_must_be_a_proxy_request_handler():
    from http.server import SimpleHTTPRequestHandler
    from websockify import WebSocketProxy
    from websockify.websockifyserver import WebSockifyRequestHandler
    for bad in (SimpleHTTPRequestHandler, WebSockifyRequestHandler, object(), "Handler"):
        with pytest.raises(TypeError, match="ProxyRequestHandler"):
            WebSocketProxy(bad, listen_port=6080, target_host="h", target_port=1)


def test_what_embedders_pass_is_tolerated_and_nothing_is_bound():
    from websockify import WebSocketProxy
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        # webvirtcloud's arguments: web=False, record=False, key=None, target "ignore".
        proxy = WebSocketProxy(listen_host="127.0.0.1", listen_port=str(port), verbose=False,
                               cert="self.pem", key=None, ssl_only=False, daemon=False,
                               record=False, web=False, traffic=False, target_host="ignore",
                               target_port="ignore", wrap_mode="exit", wrap_cmd=None)
    finally:
        busy.close()
    assert proxy.target_port == "ignore" and proxy._config.target_port is None
    assert proxy.web == "" and proxy.record == "" and proxy.only_upgrade
    with pytest.raises(ValueError, match="listen_port"):
        WebSocketProxy(listen_port="http", target_host="h", target_port=1)


def test_attributes_set_after_init_are_what_starts():
    from websockify import library
    from websockify import WebSocketProxy
    proxy = WebSocketProxy(listen_port="6080", target_host="localhost", target_port=5900,
                           heartbeat=None, web=None, ssl_options=0, source_is_ipv6=True)
    config, _, _ = library.config_of(library.values_of(proxy))
    assert config == proxy._config
    proxy.target_port = "5901"
    proxy.heartbeat = 15
    config, _, _ = library.config_of(library.values_of(proxy))
    assert (config.target_port, config.heartbeat, config.prefer_ipv6) == (5901, 15.0, True)


def test_the_server_object_pickles_for_multiprocessing_spawn():
    import pickle
    from websockify import WebSocketProxy
    from websockify import library
    proxy = WebSocketProxy(listen_port=6080, target_host="localhost", target_port="5900",
                           token_plugin=None, heartbeat=5)
    copy = pickle.loads(pickle.dumps(proxy))
    assert (copy.listen_port, copy.target_port, copy.heartbeat) == (6080, 5900, 5.0)
    assert library.config_of(library.values_of(copy))[0] == proxy._config


def test_ssl_options_become_the_minimum_tls_version():
    import ssl
    from websockify import WebSocketProxy, select_ssl_version
    for version in ("default", "tlsv1_1", "tlsv1_2", "tlsv1_3"):
        proxy = WebSocketProxy(listen_port=6080, target_host="h", target_port=1,
                               ssl_options=select_ssl_version(version))
        assert proxy._config.ssl_version == version
    assert select_ssl_version("tlsv9") == select_ssl_version("tlsv1_3")
    assert select_ssl_version("tlsv1_3") & ssl.OP_NO_TLSv1_2


def test_plugins_given_as_objects_or_names():
    from websockify import WebSocketProxy
    from websockify.auth_plugins import BasicHTTPAuth

    class Plugin:
        def lookup(self, token):
            return None

    plugin = Plugin()
    proxy = WebSocketProxy(listen_port=6080, token_plugin=plugin, host_token=True,
                           auth_plugin=BasicHTTPAuth("a:b"))
    assert proxy.token_plugin is plugin and proxy._token_object is plugin
    assert proxy._config.token_plugin.endswith("Plugin")
    named = WebSocketProxy(listen_port=6080, token_plugin="TokenFile",
                           token_source="/nowhere", auth_plugin="BasicHTTPAuth",
                           auth_source="a:b")
    assert named._config.token_plugin == "TokenFile" and named._token_object is None


def test_overridden_hooks_see_subclasses_and_monkeypatches(monkeypatch):
    from websockify.websocketproxy import ProxyRequestHandler, overridden_hooks

    class Sub(ProxyRequestHandler):
        def do_proxy(self, target):
            pass

    assert overridden_hooks(ProxyRequestHandler) == []
    assert overridden_hooks(Sub) == ["do_proxy"]
    monkeypatch.setattr(ProxyRequestHandler, "get_target", lambda self, plugin: ("h", 1))
    assert overridden_hooks(ProxyRequestHandler) == ["get_target"]
    assert overridden_hooks(Sub) == ["get_target", "do_proxy"]


def test_eventlet_patched_process_gets_a_clear_error(monkeypatch):
    import types
    from websockify import WebSocketProxy
    fake = types.ModuleType("eventlet.patcher")
    fake.is_monkey_patched = lambda name: name == "socket"
    monkeypatch.setitem(sys.modules, "eventlet.patcher", fake)
    proxy = WebSocketProxy(listen_port=free_port(), target_host="127.0.0.1", target_port=1)
    with pytest.raises(RuntimeError, match="eventlet.*command line"):
        proxy.start_server()


def test_websocket_object_both_ways_over_a_socket_pair():
    from websockify.websocket import WebSocket, WebSocketWantReadError
    from tests.helpers import handshake_request
    server_sock, client_sock = socket.socketpair()
    with server_sock, client_sock:
        # The server side: accept() on headers, answered on the socket.
        client_sock.sendall(handshake_request())
        head = server_sock.recv(65536).decode("latin-1").split("\r\n")
        headers = {}
        for line in head[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip()] = value.strip()

        class Lookup(dict):
            def get(self, name, default=None):
                for key, value in self.items():
                    if key.lower() == name.lower():
                        return value
                return default

        server = WebSocket()
        server.accept(server_sock, Lookup(headers))
        answer = client_sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 101 ")
        # A client frame, masked, then a ping and a close.
        from tests.helpers import mask_frame
        client_sock.sendall(mask_frame(0x2, b"one") + mask_frame(0x9, b"p")
                            + mask_frame(0x2, b"two", fin=False) + mask_frame(0x0, b"!"))
        assert server.recvmsg() == b"one"
        assert server.pending()
        assert server.recvmsg() == b"two!"
        assert client_sock.recv(100) == b"\x8a\x01p"       # the ping was answered
        server.socket.setblocking(False)
        with pytest.raises(WebSocketWantReadError):
            server.recvmsg()
        server.sendmsg(b"down")
        assert client_sock.recv(100) == b"\x82\x04down"
        client_sock.sendall(mask_frame(0x8, struct.pack("!H", 1001) + b"bye"))
        server.socket.setblocking(True)
        assert server.recvmsg() is None
        assert (server.close_code, server.close_reason) == (1001, "bye")
        assert client_sock.recv(100) == b"\x88\x02\x03\xe9"


def test_websocket_object_connects_to_a_server(processes, echo4):
    from websockify.websocket import WebSocket
    port = free_port()
    start(processes, [PYTHON, "-m", "websockify", "--workers", "1", "127.0.0.1:%d" % port,
                      "127.0.0.1:%d" % echo4.port], port, "websockify")
    ws = WebSocket()
    ws.connect("ws://127.0.0.1:%d/" % port, protocols=["binary"])
    assert ws.protocol == "binary"
    ws.sendmsg(b"round trip")
    got = b""
    while len(got) < 10:
        got += ws.recvmsg()
    assert got == b"round trip"
    ws.shutdown(socket.SHUT_RDWR, 1000, "done")
    assert ws.recvmsg() is None and ws.close_code == 1000


def test_websockify_server_socket_connects_and_listens(tmp_path):
    from websockify.websockifyserver import WebSockifyServer
    listener = WebSockifyServer.socket("127.0.0.1", 0)
    with listener:
        port = listener.getsockname()[1]
        conn = WebSockifyServer.socket("127.0.0.1", str(port), connect=True)
        with conn:
            assert conn.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    path = str(tmp_path / "sock")
    unix = WebSockifyServer.socket(None, unix_socket=path, unix_socket_listen=True,
                                   unix_socket_mode=0o600)
    with unix:
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        with WebSockifyServer.socket(None, connect=True, unix_socket=path):
            pass
    with pytest.raises(ValueError):
        WebSockifyServer.socket("127.0.0.1", None, connect=True)


# -- embedders as real processes ---------------------------------------------------

def test_plain_proxy_with_string_ports_sigint_and_sigterm(processes, echo4):
    port = free_port()
    script = ("import sys, websockify; p = websockify.WebSocketProxy(listen_host='127.0.0.1', "
              "listen_port=sys.argv[1], target_host='127.0.0.1', target_port=sys.argv[2], "
              "web=False, record=None, key=None); "
              "print('start_server returned %r' % (p.start_server(),), flush=True)")
    for signum in (signal.SIGINT, signal.SIGTERM):
        proc = start(processes, [PYTHON, "-c", script, str(port), str(echo4.port)], port,
                     "plain")
        ws = session(port)
        assert echoes(ws, b"through the library")
        assert close(ws) == (1000, "")
        workers = children_of(proc.pid)
        assert workers, "start_server forks workers"
        proc.signal(signum)
        assert proc.wait(20) == 0
        assert "start_server returned 0" in proc.log()
        wait_for(lambda: not port_open(port), what="listener closed")


def test_nova_style_handler_blocking_prehandshake_and_do_proxy(processes, connect_target):
    targets = {"fast": ["127.0.0.1", connect_target.port, "/fast"],
               "held": ["127.0.0.1", connect_target.port, "/held"],
               "secure-1": ["127.0.0.1", connect_target.port, "/fast"]}
    port = free_port()
    proc = start(processes, embedder("nova_style.py") + [str(port), json.dumps(targets)],
                 port, "nova")
    # A session whose pre-handshake blocks in the hook until the test releases it.
    held = session(port, "/?token=held")
    held_worker = worker_of(held)
    wait_for(lambda: any("/held" in line for line in connect_target.connects),
             what="the held CONNECT")
    # Meanwhile sessions on the same worker go on (the hook waits cooperatively).
    same_worker = 0
    for _ in range(30):
        ws = session(port, "/?token=fast")
        worker = worker_of(ws)
        assert echoes(ws, b"while another session blocks")
        assert close(ws) == (1000, "")
        same_worker += worker == held_worker
        if same_worker >= 2:
            break
    assert same_worker >= 2, "no session reached the blocked worker"
    connect_target.release.set()
    assert echoes(held, b"released")
    assert close(held) == (1000, "")
    # The security proxy negotiates through send_frames/recv_frames first.
    secure = session(port, "/?token=secure-1")
    worker_of(secure)
    assert secure.recv_frame()[2] == b"SECURITY?"
    secure.send_binary(b"SECURE")
    assert echoes(secure, b"negotiated")
    assert close(secure) == (1000, "")
    # The token in a cookie (noVNC's convention), an unknown token, a bad Origin.
    ws = session(port, "/", extra=["Cookie: token=fast"])
    worker_of(ws)
    assert echoes(ws)
    close(ws)
    ws = session(port, "/?token=nope")
    worker_of(ws)
    assert ws.expect_close() == (1008, "invalid token")
    ws = session(port, "/?token=fast", extra=["Origin: http://evil.example"])
    worker_of(ws)
    assert ws.expect_close() == (1008, "origin mismatch")
    proc.wait_log(r"nova\.console\.websocketproxy .*connecting to: 127\.0\.0\.1")
    proc.signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert "start_server returned 0" in proc.log()


def test_hooks_that_raise_exit_or_break_end_their_session_only(processes, connect_target):
    targets = {"fast": ["127.0.0.1", connect_target.port, "/fast"]}
    port = free_port()
    proc = start(processes, embedder("nova_style.py") + [str(port), json.dumps(targets)],
                 port, "nova")
    bystander = session(port, "/?token=fast")
    worker_of(bystander)
    # A session is served: the master has forked its workers by now.
    workers = set(children_of(proc.pid))
    assert len(workers) == (os.cpu_count() or 1), workers      # --workers defaults to the CPUs
    for token in ("boom", "exit", "broken-target"):
        ws = session(port, "/?token=" + token)
        worker_of(ws)
        assert ws.expect_close() == (1011, "Internal error"), token
        ws.close()
        assert echoes(bystander, b"still here after " + token.encode())
    assert set(children_of(proc.pid)) == workers, "a hook took a worker down"
    log = proc.log()
    assert "ValueError: the hook failed on purpose" in log
    assert "SystemExit: 3" in log
    assert "RuntimeError: the target object broke on purpose" in log
    # Stopping now closes a session that is inside its hook with 1001.
    proc.signal(signal.SIGQUIT)
    assert bystander.expect_close() == (1001, "Server shutting down")
    assert proc.wait(20) == 0


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_run_once_caller_in_a_multiprocessing_process(processes, echo4, method):
    port = free_port()
    proc = start(processes, embedder("run_once.py") + [str(port), str(echo4.port), method],
                 port, "run-once")
    ws = session(port)
    assert echoes(ws, b"just once")
    assert close(ws) == (1000, "")
    assert proc.wait(20) == 0
    assert "websockify process exited with 0" in proc.log()
    assert not port_open(port)


def test_websockify_init_caller_with_monkeypatched_hooks(processes, echo4, tmp_path):
    port = free_port()
    record = str(tmp_path / "rec")
    proc = start(processes, embedder("init_caller.py") + [
        "--token-plugin", "TokenFile", "--token-source", os.devnull, "--heartbeat", "0.3",
        "--record", record, "127.0.0.1:%d" % port], port, "init")
    ws = session(port, "/?token=port-%d" % echo4.port)
    assert ws.recv_frame()[2] == b"patched /?token=port-%d" % echo4.port
    assert echoes(ws, b"via websockify_init")
    # --heartbeat reaches the default do_proxy: a ping comes.
    assert ws.recv_frame()[1] == 0x9
    assert close(ws) == (1000, "")
    recording = wait_for(lambda: [name for name in os.listdir(str(tmp_path))
                                  if name.startswith("rec.")], what="the recording")
    text = wait_for(lambda: (lambda t: t if "EOF" in t else None)(
        open(os.path.join(str(tmp_path), recording[0])).read()), what="the recording's end")
    assert "via websockify_init" in text and "patched" in text
    refused = RawWebSocket(port, path="/?token=other")
    assert refused.status == 403
    proc.wait_log(r"refused the connection: no such token 'other'")
    usage = subprocess.run(embedder("init_caller.py"), capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert usage.returncode == 2 and "Too few arguments" in usage.stderr


def test_plugin_objects_reach_the_workers(processes, echo4):
    targets = {"good": ["127.0.0.1", str(echo4.port)], "bad": ["127.0.0.1", "five"],
               "odd": ["127.0.0.1"]}
    port = free_port()
    start(processes, embedder("plugin_objects.py") + [str(port), json.dumps(targets)], port,
          "plugins")
    secret = ["X-Secret: sesame"]
    ws = session(port, "/?token=good", extra=secret)
    assert echoes(ws, b"object plugins")
    assert close(ws) == (1000, "")
    for token, status in (("bad", 502), ("odd", 502), ("missing", 404)):
        ws = RawWebSocket(port, path="/?token=" + token, extra=secret)
        assert ws.status == status, (token, ws.status, ws.buffer)
    ws = RawWebSocket(port, path="/?token=good")
    assert ws.status == 401 and ws.headers.get("www-authenticate") == "Secret"


def test_lib_proxy_server_in_a_thread(processes, echo4, tmp_path):
    other = EchoServer()
    (tmp_path / "index.html").write_text("<p>static</p>")
    try:
        port = free_port()
        proc = start(processes, embedder("lib_server.py") + [
            str(port), json.dumps({"one": ["127.0.0.1", echo4.port]}), str(tmp_path)],
            port, "libserver")
        ws = session(port, "/?token=one")
        assert echoes(ws, b"threaded")
        # Another session's target, written on its own copy of the server.
        ws2 = session(port, "/", extra=["X-Port: %d" % other.port])
        assert echoes(ws2, b"the other target")
        assert echoes(ws, b"still the first")
        assert close(ws) == (1000, "")
        assert close(ws2) == (1000, "")
        assert RawWebSocket(port, path="/?token=unknown").status == 404
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(b"GET /index.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = b""
            while True:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                reply += chunk
        assert reply.startswith(b"HTTP/1.0 200") or reply.startswith(b"HTTP/1.1 200")
        assert b"<p>static</p>" in reply
        proc.signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "stopped" in proc.log()
    finally:
        other.close()


def test_start_server_in_a_thread_twice_and_terminate(processes, echo4):
    port = free_port()
    proc = start(processes, embedder("in_thread.py") + [str(port), str(echo4.port)], port,
                 "thread", stdin=subprocess.PIPE)
    proc.wait_log(r"not in the main thread: signals are the caller's business")
    ws = session(port)
    assert echoes(ws, b"served from a thread")

    def command(text):
        proc.proc.stdin.write(text.encode() + b"\n")
        proc.proc.stdin.flush()

    command("again")
    proc.wait_log(r"second start_server refused: start_server\(\) is already running")
    assert echoes(ws, b"the first one still serves")
    assert close(ws) == (1000, "")      # else the stop gives it --graceful-timeout
    command("stop")
    proc.wait_log(r"thread alive after stop: False", timeout=20)
    assert "start_server returned 0" in proc.log()
    wait_for(lambda: not port_open(port), what="listener closed")
    command("restart")
    wait_for(lambda: port_open(port), what="the second start")
    ws = session(port)
    assert echoes(ws, b"second run")
    close(ws)
    command("stop")
    wait_for(lambda: proc.log().count("start_server returned 0") == 2, what="second stop")
    command("quit")
    assert proc.wait(10) == 0


def ticket(host, port):
    import base64
    return base64.urlsafe_b64encode(json.dumps({"host": host, "port": port}).encode()).decode()


def test_ovirt_style_validate_connection_targets_per_session(processes, echo4):
    other = EchoServer()
    try:
        port = free_port()
        proc = start(processes, embedder("ovirt_style.py") + [str(port)], port, "ovirt")
        first = session(port, "/" + ticket("127.0.0.1", str(echo4.port)))
        second = session(port, "/" + ticket("127.0.0.1", str(other.port)))
        assert echoes(first, b"first") and echoes(second, b"second")
        assert close(first) == (1000, "") and close(second) == (1000, "")
        for target in (echo4.port, other.port):
            proc.wait_log(r"-> 127\.0\.0\.1:%d: closed \(1000\)" % target)
        assert RawWebSocket(port, path="/" + ticket("127.0.0.1", "vnc")).status == 502
        assert RawWebSocket(port, path="/not-a-ticket").status == 500
        proc.wait_log(r"OvirtProxyRequestHandler before the upgrade failed")
    finally:
        other.close()


def test_hooked_session_over_tls(processes, connect_target, pki):
    from tests.e2e.test_tls import client_context
    targets = {"fast": ["127.0.0.1", connect_target.port, "/fast"]}
    port = free_port()
    start(processes, embedder("nova_style.py") + [
        str(port), json.dumps(targets), pki.server.cert, pki.server.key], port, "nova-tls")
    ws = RawWebSocket(port, path="/?token=fast", ssl_context=client_context(pki))
    assert ws.status == 101, (ws.status, ws.buffer)
    worker_of(ws)
    assert echoes(ws, b"over wss")
    assert echoes(ws, b"x" * 200000)
    assert close(ws) == (1000, "")
    plain = session(port, "/?token=fast")
    worker_of(plain)
    assert echoes(plain, b"and ws on the same port")
    close(plain)


# -- 0.13's keyword arguments, one by one, with the default and a hooked handler ---------

def keywords(processes, port, kwargs, hooked=False, name="keywords", **popen):
    argv = embedder("keywords.py") + [json.dumps(kwargs)] + (["hooked"] if hooked else [])
    return start(processes, argv, port, name, **popen)


def greeted(ws, hooked):
    """A hooked session starts with the handler's greeting frame."""
    if hooked:
        assert ws.recv_frame()[2].startswith(b"hooked "), "no greeting"


@pytest.mark.parametrize("hooked", [False, True], ids=["default", "hooked"])
def test_listen_fd_serves_on_the_descriptor_given(processes, echo4, hooked):
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        proc = keywords(processes, port, {"listen_fd": 0, "target_host": "127.0.0.1",
                                          "target_port": echo4.port}, hooked,
                        stdin=listener.fileno())
    finally:
        listener.close()
    ws = session(port)
    greeted(ws, hooked)
    assert echoes(ws, b"on an inherited listener")
    assert close(ws) == (1000, "")
    proc.signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert "start_server returned 0" in proc.log()


def master_listening_on(port):
    """The pid of the process that holds ``port``'s listening socket and forked workers."""
    from tests.helpers import LISTEN, socket_inodes, tcp_sockets
    inodes = {inode for inode, state, _ in tcp_sockets(port) if state == LISTEN}
    for name in os.listdir("/proc"):
        if name.isdigit() and socket_inodes(int(name)) & inodes and children_of(int(name)):
            with open("/proc/%s/stat" % name) as handle:
                parent = int(handle.read().split(") ", 1)[1].split()[1])
            if parent not in [int(n) for n in os.listdir("/proc") if n.isdigit()
                              and socket_inodes(int(n)) & inodes]:
                return int(name)
    return None


def test_daemon_true_detaches_and_serves_until_terminated(processes, echo4):
    from tests.helpers import pid_alive
    port = free_port()
    launcher = processes(embedder("keywords.py") + [json.dumps({
        "listen_host": "127.0.0.1", "listen_port": port, "target_host": "127.0.0.1",
        "target_port": echo4.port, "daemon": True})], name="daemon")
    assert launcher.wait(20) == 0, launcher.log()
    assert "start_server returned" not in launcher.log()   # the caller's process left
    wait_for(lambda: port_open(port), what="the daemon's listener")
    master = wait_for(lambda: master_listening_on(port), what="the daemon's master")
    assert master != launcher.pid
    assert os.getsid(master) != os.getsid(0)        # detached from the caller's session
    try:
        ws = session(port)
        assert echoes(ws, b"from the daemon")
        assert close(ws) == (1000, "")
    finally:
        os.kill(master, signal.SIGTERM)
    wait_for(lambda: not pid_alive(master), timeout=20, what="the daemon's exit")
    assert not port_open(port)


@pytest.mark.parametrize("hooked", [False, True], ids=["default", "hooked"])
def test_wrap_cmd_starts_the_program_and_reaches_it(processes, hooked, tmp_path):
    from tests.e2e.test_wrap import ECHO_SERVER, find_rebind_lib
    find_rebind_lib()
    program = tmp_path / "echo_server.py"
    program.write_text(ECHO_SERVER)
    port = free_port()
    proc = keywords(processes, port, {"listen_host": "127.0.0.1", "listen_port": port,
                                      "wrap_cmd": [PYTHON, str(program), str(port), "serve"],
                                      "wrap_mode": "ignore"}, hooked)
    proc.wait_log(r"pid (\d+) listening on 127\.0\.0\.1:\d+")
    ws = session(port)
    greeted(ws, hooked)
    assert echoes(ws, b"to the wrapped program")
    assert close(ws) == (1000, "")
    program_pid = int(proc.wait_log(r"wrapped program \S+ started \(pid (\d+)\)").group(1))
    proc.signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    from tests.helpers import pid_alive
    wait_for(lambda: not pid_alive(program_pid), what="the wrapped program stopped")


@pytest.mark.parametrize("hooked", [False, True], ids=["default", "hooked"])
def test_ssl_target_verifies_with_the_system_cas(processes, pki, hooked):
    from tests.e2e.test_tls import start_tls_target
    target_port, _ = start_tls_target(processes, pki)
    kwargs = {"listen_host": "127.0.0.1", "target_host": "localhost",
              "target_port": target_port, "ssl_target": True}
    # Trusted: the target's CA is the process's system CA file.
    port = free_port()
    keywords(processes, port, dict(kwargs, listen_port=port), hooked, name="trusting",
             env=dict(os.environ, SSL_CERT_FILE=pki.other_ca.cert))
    ws = session(port)
    greeted(ws, hooked)
    assert echoes(ws, b"through TLS to the target" * 100)
    assert close(ws) == (1000, "")
    # Not trusted: the target's certificate does not verify, a 502 before any 101.
    port = free_port()
    proc = keywords(processes, port, dict(kwargs, listen_port=port), hooked, name="strict")
    refused = RawWebSocket(port)
    if hooked:
        # 0.13's order: the hook runs after the 101, so the failure is a close.
        assert refused.status == 101
        greeted(refused, hooked)
        assert refused.expect_close() == (1011, "Failed to connect to downstream server")
    else:
        assert refused.status == 502, (refused.status, refused.buffer)
    proc.wait_log(r"certificate verify failed")


@pytest.mark.parametrize("hooked", [False, True], ids=["default", "hooked"])
def test_unix_target_reaches_the_unix_socket(processes, tmp_path, hooked):
    path = str(tmp_path / "target.sock")
    target = EchoServer(socket.AF_UNIX, path)
    try:
        port = free_port()
        keywords(processes, port, {"listen_host": "127.0.0.1", "listen_port": port,
                                   "unix_target": path}, hooked)
        ws = session(port)
        greeted(ws, hooked)
        assert echoes(ws, b"over a unix socket")
        assert close(ws) == (1000, "")
    finally:
        target.close()


def test_idle_timeout_ends_start_server(processes, echo4):
    port = free_port()
    proc = keywords(processes, port, {"listen_host": "127.0.0.1", "listen_port": port,
                                      "target_host": "127.0.0.1", "target_port": echo4.port,
                                      "idle_timeout": 1})
    ws = session(port)
    assert echoes(ws, b"before going idle")
    assert close(ws) == (1000, "")
    assert proc.wait(30) == 0
    assert "start_server returned 0" in proc.log()
    assert not port_open(port)


def test_legacy_clients_on_a_hooked_session(processes, echo4):
    import base64
    from tests.e2e.test_legacy import open_hixie76, open_hybi, recv_base64
    port = free_port()
    keywords(processes, port, {"listen_host": "127.0.0.1", "listen_port": port,
                               "target_host": "127.0.0.1", "target_port": echo4.port},
             hooked=True)
    # The base64 subprotocol: the greeting and the target's bytes as base64 text.
    ws = open_hybi(port, "base64")
    assert ws.headers.get("sec-websocket-protocol") == "base64"
    fin, opcode, payload = ws.recv_frame()
    assert (fin, opcode) == (True, 0x1)
    assert base64.b64decode(payload, validate=True).startswith(b"hooked ")
    message = b"base64 through a hook" * 50
    ws.send(0x1, base64.b64encode(message))
    assert recv_base64(ws, len(message)) == message
    assert close(ws) == (1000, "")
    # Hixie-76: 0x00 base64 0xFF frames both ways.
    hixie = open_hixie76(port)
    kind, greeting = hixie.recv_frame()
    assert kind == "text" and greeting.startswith(b"hooked ")
    hixie.send(b"hixie through a hook")
    assert hixie.recv_data(len(b"hixie through a hook")) == b"hixie through a hook"
    hixie.close()
