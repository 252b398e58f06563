"""An embedder that builds a WebSocketProxy from 0.13's keyword arguments given as JSON,
with the default handler or one that overrides new_websocket_client (a hooked session).

argv: kwargs_json [hooked]
The hooked handler greets with one frame ("hooked <pid>") and then does what 0.13's
default new_websocket_client does (the target of the server's settings, do_proxy).
"""

import json
import logging
import os
import sys

import websockify

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


class GreetingHandler(websockify.ProxyRequestHandler):
    def new_websocket_client(self):
        self.send_frames([b"hooked %d" % os.getpid()])
        super().new_websocket_client()


if __name__ == "__main__":
    kwargs = json.loads(sys.argv[1])
    if len(sys.argv) > 2 and sys.argv[2] == "hooked":
        kwargs["RequestHandlerClass"] = GreetingHandler
    status = websockify.WebSocketProxy(**kwargs).start_server()
    print("start_server returned %r" % (status,), flush=True)
