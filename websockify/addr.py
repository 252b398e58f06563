"""host:port: one set of rules to parse and to format every address the program names.

- ``[v6]:port`` is the unambiguous IPv6 form, and the one ``format_host_port``
  writes.  Without brackets the port is after the last colon (websockify
  0.13's rule), so ``::1:5900`` is host ``::1``, port 5900.
- A port is ASCII digits (whitespace around them is ignored), 1-65535.
  A listen address alone may say 0 (any free port), leave out the host
  (every address) or be a bare port.
- A host is not empty and holds no whitespace, ``/`` or brackets; a host
  given apart from its port may be in brackets.
- ``unix_socket:PATH`` is a Unix socket target, where the caller takes one.

This module does no I/O and imports only ``typing``: protocol/ uses it.
"""

from typing import Tuple, Union

UNIX = "unix_socket"

# AddressError.kind: what is wrong with the text.
FORM = "form"           # not host:port at all
NO_HOST = "no-host"     # the host is left out where it may not be
HOST = "host"           # a host that cannot be one
PORT = "port"           # a port that is not a number
RANGE = "range"         # a port number outside 1-65535


class AddressError(ValueError):
    """A host:port that does not parse.

    ``kind`` is FORM, NO_HOST, HOST, PORT or RANGE; ``value`` is the part at
    fault (the whole text, the host, the port text, or the port number), so
    that a caller can word its own message.
    """

    def __init__(self, message: str, kind: str, value: object):
        super().__init__(message)
        self.kind = kind
        self.value = value


def parse_port(value: Union[int, str, bytes], listen: bool = False) -> int:
    """A port number from an int or its text; AddressError unless 1-65535 (0 too with ``listen``)."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, bool):
        # True is an int to Python, and never a port.
        raise AddressError("bad port %r" % (value,), PORT, value)
    if isinstance(value, int):
        number = value
    else:
        text = str(value).strip()
        if not text.isdigit() or not text.isascii():
            raise AddressError("bad port %r" % (text,), PORT, text)
        number = int(text)
    if not (0 if listen else 1) <= number <= 65535:
        raise AddressError("port %d out of range" % number, RANGE, number)
    return number


def parse_host(value: Union[str, bytes]) -> str:
    """A host given apart from its port (``[v6]`` loses its brackets); AddressError if none."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    host = str(value).strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise AddressError("bad host %r" % (value,), NO_HOST, host)
    if any(c.isspace() or c in "/[]" for c in host):
        raise AddressError("bad host %r" % (value,), HOST, host)
    return host


def parse_host_port(text: str, listen: bool = False,
                    unix: bool = False) -> Tuple[str, Union[int, str]]:
    """``host:port`` or ``[v6]:port`` -> ``(host, port)``.

    With ``listen``, also a bare ``port``, ``:port`` (host ``""``: every
    address) and port 0.  With ``unix``, also ``unix_socket:PATH`` ->
    ``('unix_socket', PATH)``.  Anything else is an AddressError.
    """
    text = text.strip()
    if unix and text.startswith(UNIX + ":"):
        path = text[len(UNIX) + 1:].strip()
        if not path:
            raise AddressError("unix_socket: needs a path", FORM, text)
        return UNIX, path
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise AddressError("%r is not host:port" % text, FORM, text)
        port = rest[1:]
    elif ":" in text:
        host, _, port = text.rpartition(":")
    elif listen:
        host, port = "", text
    else:
        raise AddressError("%r is not host:port" % text, FORM, text)
    number = parse_port(port, listen)
    if listen and not host.strip():
        return "", number
    return parse_host(host), number


def format_host_port(host: str, port: object) -> str:
    """``host:port``, or ``[host]:port`` when the host is an IPv6 address."""
    return "[%s]:%s" % (host, port) if ":" in host else "%s:%s" % (host, port)
