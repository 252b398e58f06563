"""websockify: a WebSockets to TCP bridge on a preforking gevent server.

``import websockify`` stays cheap (the command line's master never imports
gevent): websockify 0.13's library names (``websockify.WebSocketProxy``,
``ProxyRequestHandler``, ``websockify_init``, ``WebSocket`` ...) and its
modules are imported when first asked for.
"""

import importlib

__version__ = "0.14.0.dev0"

#: 0.13's top-level names (it star-imported websocket and websocketproxy): where they live.
_LAZY = {
    "WebSocketProxy": "websockify.websocketproxy",
    "ProxyRequestHandler": "websockify.websocketproxy",
    "LibProxyServer": "websockify.websocketproxy",
    "websockify_init": "websockify.websocketproxy",
    "select_ssl_version": "websockify.websocketproxy",
    "SSL_OPTIONS": "websockify.websocketproxy",
    "WebSocket": "websockify.websocket",
    "WebSocketWantReadError": "websockify.websocket",
    "WebSocketWantWriteError": "websockify.websocket",
}
_MODULES = ("websocketproxy", "websockifyserver", "websocket", "token_plugins", "auth_plugins")


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _MODULES:
        value = importlib.import_module("websockify." + name)
    else:
        raise AttributeError("module 'websockify' has no attribute %r" % name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY) + list(_MODULES))
