"""Targets: ``host:port`` text and a plugin's lookup result -> ``(host, port)``.

A target is ``(host, int port)`` or ``('unix_socket', path)``.
"""

from typing import Tuple

UNIX = "unix_socket"


def parse_port(text, what="port") -> int:
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    if isinstance(text, bool):
        raise ValueError("bad %s %r" % (what, text))
    if isinstance(text, int):
        number = text
    else:
        text = str(text).strip()
        if not text.isdigit() or not text.isascii():
            raise ValueError("bad %s %r" % (what, text))
        number = int(text)
    if not 1 <= number <= 65535:
        raise ValueError("%s %d out of range" % (what, number))
    return number


def parse_host(text) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    host = str(text).strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise ValueError("bad host %r" % (text,))
    return host


def parse_target(text: str) -> Tuple[str, object]:
    """``host:port``, ``[v6]:port``, ``v6:port`` or ``unix_socket:/path`` -> a pair.

    The port is the part after the last colon, so ``::1:5900`` is ``::1``
    port 5900 (websockify 0.13's rule); brackets are the unambiguous form.
    """
    text = text.strip()
    if text.startswith(UNIX + ":"):
        path = text[len(UNIX) + 1:].strip()
        if not path:
            raise ValueError("unix_socket: needs a path")
        return UNIX, path
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ValueError("target %r is not host:port" % text)
    return parse_host(host), parse_port(port)


def target_from_result(result) -> Tuple[str, object]:
    """A plugin's lookup result -> ``(host, int port)`` or ``('unix_socket', path)``."""
    if isinstance(result, (str, bytes)):
        text = result.decode("utf-8") if isinstance(result, bytes) else result
        return parse_target(text)
    if isinstance(result, dict):
        if "port" in result:
            return parse_host(result["host"]), parse_port(result["port"])
        return parse_target(str(result.get("host", "")))
    try:
        items = list(result)
    except TypeError:
        raise ValueError("lookup returned %s, not (host, port)" % type(result).__name__) from None
    if len(items) != 2:
        raise ValueError("lookup returned %d items, not (host, port)" % len(items))
    host, port = items
    if isinstance(host, bytes):
        host = host.decode("utf-8", "replace")
    if host == UNIX:
        if isinstance(port, bytes):
            port = port.decode("utf-8", "replace")
        if not port or not isinstance(port, str):
            raise ValueError("unix_socket target without a path")
        return UNIX, port
    return parse_host(host), parse_port(port)
