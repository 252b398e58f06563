"""websockify: a WebSockets to TCP bridge on a preforking gevent server."""

__version__ = "0.14.0.dev0"
