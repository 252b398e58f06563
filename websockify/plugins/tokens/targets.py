"""Targets: a token plugin's answer (text, a pair or a dict) -> ``(host, port)``.

A plugin's ``lookup()`` gives the target as its store holds it (0.13's
contract: ``['host', '5900']``, ``('h', b'5900')``); the server turns that
into ``(host, int port)`` or ``('unix_socket', path)`` here, where the
target is about to be connected, and answers 502 if it cannot.
"""

from typing import List, Tuple

from websockify.addr import UNIX, parse_host, parse_host_port, parse_port


def parse_target(text: str) -> Tuple[str, object]:
    """``host:port``, ``[v6]:port``, ``v6:port`` or ``unix_socket:/path`` -> a pair.

    The rules are websockify.addr's; a ValueError says what is wrong.
    """
    return parse_host_port(text, unix=True)


def split_target(text: str) -> List[str]:
    """``host:port`` text split as 0.13 splits it, the values left as text.

    The port is after the last colon (``['[::1]', '5900']``); after
    ``unix_socket:`` everything is the path.  Text without a colon is one
    item, which the server refuses.
    """
    if text.startswith(UNIX + ":"):
        return [UNIX, text[len(UNIX) + 1:]]
    return text.rsplit(":", 1)


def _text(value: object, what: str) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        raise ValueError("%s is %s, not text" % (what, type(value).__name__))
    return value


def target_from_result(result: object) -> Tuple[str, object]:
    """A plugin's lookup result -> ``(host, int port)`` or ``('unix_socket', path)``.

    Anything else (a bad port, a host that is not text, not a pair) is a
    ValueError.
    """
    if isinstance(result, (str, bytes)):
        return parse_target(_text(result, "the target"))
    if isinstance(result, dict):
        if "port" in result:
            return parse_host(_text(result.get("host"), "the host")), parse_port(result["port"])
        return parse_target(_text(result.get("host", ""), "the host"))
    try:
        items = list(result)
    except TypeError:
        raise ValueError("lookup returned %s, not (host, port)" % type(result).__name__) from None
    if len(items) != 2:
        raise ValueError("lookup returned %d items, not (host, port)" % len(items))
    host, port = items
    host = _text(host, "the host").strip()
    if host == UNIX:
        path = _text(port, "the unix_socket path").strip()
        if not path:
            raise ValueError("unix_socket target without a path")
        return UNIX, path
    if not isinstance(port, (int, str, bytes)):
        raise ValueError("the port is %s, not a number" % type(port).__name__)
    return parse_host(host), parse_port(port)
