"""An embedder that monkeypatches ProxyRequestHandler and calls websockify_init(),
as scripts do with ``python -c "...; websockify_init()"``: the rest of argv is
websockify's command line.

A token "port-N" sends the session to 127.0.0.1:N (get_target); every session
first gets a "patched" message (new_websocket_client).
"""

from websockify.websocketproxy import ProxyRequestHandler, websockify_init

original = ProxyRequestHandler.new_websocket_client


def new_websocket_client(self):
    self.send_frames([b"patched " + self.path.encode()])
    original(self)


def get_target(self, target_plugin):
    token = self.path.partition("token=")[2]
    if not token.startswith("port-"):
        raise self.server.EClose("no such token %r" % token)
    return "127.0.0.1", token[len("port-"):]


ProxyRequestHandler.new_websocket_client = new_websocket_client
ProxyRequestHandler.get_target = get_target

if __name__ == "__main__":
    websockify_init()
