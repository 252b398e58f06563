"""An embedder running 0.13's LibProxyServer in a thread of its own, serve_forever().

argv: listen_port targets_json web_dir
A plugin object picks the target; a handler subclass checks a header in
validate_connection and writes the target on its (per-session) server.
"""

import json
import logging
import signal
import sys
import threading

import websockify
from plugin_objects import Directory

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


class Handler(websockify.ProxyRequestHandler):
    def validate_connection(self):
        if self.headers.get("X-Port"):
            self.server.target_host = "127.0.0.1"
            self.server.target_port = int(self.headers["X-Port"])
            return
        super().validate_connection()


if __name__ == "__main__":
    # SIGTERM is waited for below (the server's threads inherit the mask).
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    server = websockify.LibProxyServer(
        RequestHandlerClass=Handler, listen_host="127.0.0.1", listen_port=int(sys.argv[1]),
        token_plugin=Directory(json.loads(sys.argv[2])), web=sys.argv[3], file_only=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    print("serving", flush=True)
    signal.sigwait([signal.SIGTERM])
    server.shutdown()
    print("stopped", flush=True)
