"""An embedder shaped like oVirt's websocket proxy: the handler decodes a ticket
from the path in validate_connection and writes the target on self.server
(host as bytes, port as text, as it does); nothing after the upgrade is
overridden, so the relay carries the sessions.

argv: listen_port
"""

import base64
import json
import logging
import sys

import websockify

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


class OvirtProxyRequestHandler(websockify.ProxyRequestHandler):
    def validate_connection(self):
        ticket = self.path[1:].partition("?")[0]
        connection = json.loads(base64.urlsafe_b64decode(ticket.encode()))
        self.server.target_host = connection["host"].encode("utf8")
        self.server.target_port = connection["port"]
        self.server.ssl_target = connection.get("ssl_target", False)


if __name__ == "__main__":
    proxy = websockify.WebSocketProxy(RequestHandlerClass=OvirtProxyRequestHandler,
                                      listen_host="127.0.0.1", listen_port=sys.argv[1],
                                      target_host=None, target_port=None)
    print("start_server returned %r" % (proxy.start_server(),), flush=True)
