"""An embedder shaped like OpenStack Nova's console proxy (nova/console/websocketproxy.py).

A ProxyRequestHandler subclass whose new_websocket_client finds the target
of the token (an RPC in Nova), checks the Origin, connects with
self.socket(), does a blocking CONNECT pre-handshake with the target,
optionally a "security proxy" negotiation with the client through
send_frames/recv_frames, then do_proxy(tsock); a WebSocketProxy subclass
that pops its own keyword arguments and has its own logger.

argv: listen_port targets_json (token -> [host, port, internal_access_path])
      [certificate key]
"""

import json
import logging
import os
import socket
import sys
import urllib.parse

import websockify
from websockify import websockifyserver

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
LOG = logging.getLogger("nova.console.websocketproxy")
TARGETS = json.loads(sys.argv[2])


class TenantSock:
    """Nova's view of the client as a socket for the security proxy."""

    def __init__(self, reqhandler):
        self.reqhandler = reqhandler
        self.queue = []

    def recv(self, cnt=None):
        while True:
            frames, closed = self.reqhandler.recv_frames()
            self.queue.extend(frames)
            if closed or self.queue:
                break
        data = b"".join(self.queue)
        self.queue = []
        return data

    def sendall(self, data):
        self.reqhandler.send_frames([data])

    def finish_up(self):
        self.reqhandler.send_frames([b"".join(self.queue)])

    def close(self):
        self.finish_up()
        self.reqhandler.send_close()


class Greeter:
    """A security proxy: greets the tenant and wants its answer before proxying."""

    def connect(self, tenant_sock, compute_sock):
        tenant_sock.sendall(b"SECURITY?")
        if tenant_sock.recv() != b"SECURE":
            raise ValueError("tenant failed the security negotiation")
        return compute_sock


class BrokenTarget:
    """A do_proxy target whose recv raises (its descriptor is readable at once)."""

    def __init__(self):
        self.mine, self.other = socket.socketpair()
        self.other.send(b"x")

    def fileno(self):
        return self.mine.fileno()

    def recv(self, size):
        raise RuntimeError("the target object broke on purpose")

    def send(self, data):
        return len(data)


class NovaProxyRequestHandler(websockify.ProxyRequestHandler):
    def __init__(self, *args, **kwargs):
        self._compute_rpcapi = None
        websockify.ProxyRequestHandler.__init__(self, *args, **kwargs)

    def new_websocket_client(self):
        query = urllib.parse.urlparse(self.path).query
        token = urllib.parse.parse_qs(query).get("token", [""]).pop()
        if not token:
            for item in (self.headers.get("cookie") or "").split(";"):
                name, _, value = item.strip().partition("=")
                if name == "token":
                    token = value
        # Which worker serves us: the test uses it to put sessions side by side.
        self.send_frames([b"worker %d" % os.getpid()])
        if token == "boom":
            raise ValueError("the hook failed on purpose")
        if token == "exit":
            sys.exit(3)
        if token == "broken-target":
            self.do_proxy(BrokenTarget())
            return
        if token not in TARGETS:
            raise self.CClose(1008, "invalid token")
        origin = self.headers.get("Origin")
        expected = (self.headers.get("Host") or "").partition(":")[0]
        if origin is not None and urllib.parse.urlparse(origin).hostname != expected:
            raise self.CClose(1008, "origin mismatch")
        host, port, path = TARGETS[token]
        self.msg("connecting to: %s:%s" % (host, port))
        tsock = self.socket(host, port, connect=True)
        if path:
            tsock.send(("CONNECT %s HTTP/1.1\r\n\r\n" % path).encode())
            while True:
                data = tsock.recv(4096, socket.MSG_PEEK)
                token_loc = data.find(b"\r\n\r\n")
                if token_loc != -1:
                    if data.split(b"\r\n")[0].find(b"200") == -1:
                        raise ValueError("invalid connection info")
                    tsock.recv(token_loc + 4)
                    break
                if not data:
                    raise ValueError("target closed during the CONNECT")
        if self.server.security_proxy is not None and token.startswith("secure"):
            tenant_sock = TenantSock(self)
            tsock = self.server.security_proxy.connect(tenant_sock, tsock)
            tenant_sock.finish_up()
        try:
            self.do_proxy(tsock)
        except Exception:
            tsock.shutdown(socket.SHUT_RDWR)
            tsock.close()
            self.vmsg("%s:%s: Websocket client or target closed" % (host, port))
            raise

    def socket(self, *args, **kwargs):
        return websockifyserver.WebSockifyServer.socket(*args, **kwargs)


class NovaWebSocketProxy(websockify.WebSocketProxy):
    def __init__(self, *args, **kwargs):
        self.security_proxy = kwargs.pop("security_proxy", None)
        ssl_min_version = kwargs.pop("ssl_minimum_version", None)
        if ssl_min_version and ssl_min_version != "default":
            kwargs["ssl_options"] = websockify.websocketproxy.select_ssl_version(ssl_min_version)
        super().__init__(*args, **kwargs)

    @staticmethod
    def get_logger():
        return LOG


if __name__ == "__main__":
    status = NovaWebSocketProxy(
        listen_host="127.0.0.1", listen_port=int(sys.argv[1]), source_is_ipv6=False,
        cert=sys.argv[3] if len(sys.argv) > 3 else "self.pem",
        key=sys.argv[4] if len(sys.argv) > 4 else None, ssl_only=False, ssl_ciphers=None,
        ssl_minimum_version="tlsv1_2", daemon=False, record=None, traffic=False,
        web=None, file_only=True, RequestHandlerClass=NovaProxyRequestHandler,
        security_proxy=Greeter()).start_server()
    print("start_server returned %r" % (status,), flush=True)
