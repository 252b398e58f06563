"""Targets: a token plugin's answer (text, a pair or a dict) -> ``(host, port)``.

A target is ``(host, int port)`` or ``('unix_socket', path)``.
"""

from typing import Tuple

from websockify.addr import UNIX, parse_host, parse_host_port, parse_port


def parse_target(text: str) -> Tuple[str, object]:
    """``host:port``, ``[v6]:port``, ``v6:port`` or ``unix_socket:/path`` -> a pair.

    The rules are websockify.addr's; a ValueError says what is wrong.
    """
    return parse_host_port(text, unix=True)


def target_from_result(result: object) -> Tuple[str, object]:
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
