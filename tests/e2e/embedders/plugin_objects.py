"""An embedder that builds its token and auth plugins itself and passes the objects.

argv: listen_port targets_json (token -> [host, port] as the plugin returns it)
The handler overrides nothing: sessions take the relay's fast path.
"""

import json
import logging
import sys

import websockify
from websockify.auth_plugins import AuthenticationError

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


class Directory:
    """A token plugin object with state of its own (no --token-source)."""

    def __init__(self, table):
        self.table = table

    def lookup(self, token):
        return self.table.get(token)


class SharedSecret:
    def authenticate(self, headers, target_host, target_port):
        if headers.get("X-Secret") != "sesame":
            raise AuthenticationError(log_msg="no secret", response_code=401,
                                      response_headers={"WWW-Authenticate": "Secret"})


if __name__ == "__main__":
    proxy = websockify.WebSocketProxy(
        listen_host="127.0.0.1", listen_port=sys.argv[1],
        token_plugin=Directory(json.loads(sys.argv[2])), auth_plugin=SharedSecret(),
        web=False, record=False, key=None)
    print("start_server returned %r" % (proxy.start_server(),), flush=True)
