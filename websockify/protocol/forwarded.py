"""The client address for log lines, behind trusted reverse proxies.

A reverse proxy (nginx, HAProxy) connects to us itself, so the TCP peer is
the proxy; the browser's address travels in ``X-Forwarded-For`` (each proxy
appends the address it received the request from) or ``X-Real-IP``.  Those
headers are believed only when the TCP peer is a proxy in ``--trusted-proxy``:
anyone else could write anything in them.  In ``X-Forwarded-For`` the
right-most address that is not itself a trusted proxy is the client, since
the addresses left of it were written by the client or by proxies we do
not know.  A value that does not parse is ignored.
"""

import ipaddress
from typing import Callable, Optional, Sequence, Union

from websockify.addr import format_host_port

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

#: In --trusted-proxy: connections on a Unix listening socket (--unix-listen,
#: or one passed by systemd), which only local processes can open.
UNIX = "unix"


class TrustedProxies:
    """The parsed --trusted-proxy list."""

    __slots__ = ("networks", "unix")

    def __init__(self, networks: Sequence[Network] = (), unix: bool = False):
        self.networks = tuple(networks)
        self.unix = unix

    def __bool__(self) -> bool:
        return bool(self.networks) or self.unix

    def __repr__(self) -> str:
        items = [str(net) for net in self.networks] + ([UNIX] if self.unix else [])
        return "TrustedProxies(%s)" % ",".join(items)

    def trusts(self, address: Address) -> bool:
        return any(address in net for net in self.networks)

    def trusts_peer(self, client_address) -> bool:
        """Whether the TCP (or Unix) peer of a connection is a trusted proxy."""
        if not (isinstance(client_address, tuple) and client_address):
            return self.unix
        address = parse_address(str(client_address[0]))
        return address is not None and self.trusts(address)


def parse_trusted_proxies(text: str) -> TrustedProxies:
    """``10.0.0.0/8,127.0.0.1,::1,unix`` -> TrustedProxies; ValueError names a bad item."""
    networks = []
    unix = False
    for item in text.split(","):
        item = item.strip()
        if item.lower() == UNIX:
            unix = True
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError("--trusted-proxy: %r is not a network (expected CIDR such as "
                             "10.0.0.0/8 or 2001:db8::/32, an address, or unix)" % item) from None
    return TrustedProxies(networks, unix)


def parse_address(text: str) -> Optional[Address]:
    """An address from a header item: ``1.2.3.4``, ``1.2.3.4:5678``, ``::1``,
    ``[::1]`` or ``[::1]:5678``; None when it is anything else."""
    text = text.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            return None
        text = host
    elif text.count(":") == 1:
        # IPv4 with a port, as some proxies write it.
        host, port = text.split(":")
        if not port.isdigit():
            return None
        text = host
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d.
        return address.ipv4_mapped
    return address


def forwarded_for(value: str, proxies: TrustedProxies) -> Optional[Address]:
    """The client in an X-Forwarded-For value: the right-most untrusted address."""
    items = value.split(",")
    address = None
    for item in reversed(items):
        address = parse_address(item)
        if address is None:
            return None             # malformed: the whole header is ignored
        if not proxies.trusts(address):
            return address
    # Every hop is a trusted proxy: the left-most is the furthest we know.
    return address


def forwarded_client(client_address, get_header: Callable[[str], Optional[str]],
                     proxies: Optional[TrustedProxies]) -> Optional[Address]:
    """The client a trusted proxy forwarded for, or None (then the peer is the client)."""
    if not proxies or not proxies.trusts_peer(client_address):
        return None
    value = get_header("X-Forwarded-For")
    if value is not None:
        address = forwarded_for(value, proxies)
        if address is not None:
            return address
    value = get_header("X-Real-IP")
    if value is not None and "," not in value:
        return parse_address(value)
    return None


def tcp_peer_label(client_address) -> str:
    """``1.2.3.4:5678``, ``[::1]:5678``, or ``unix-client``."""
    if isinstance(client_address, tuple) and client_address:
        return format_host_port(client_address[0], client_address[1])
    return "unix-client"


def peer_label(client_address, headers, proxies: Optional[TrustedProxies]) -> str:
    """The client as log lines name it: ``203.0.113.7 via 127.0.0.1:5678`` when a
    trusted proxy forwarded for it, else the TCP peer.

    ``headers`` is the request's header object (``get(name)``), or None before
    the request head has been read.
    """
    tcp = tcp_peer_label(client_address)
    get = getattr(headers, "get", None)
    if get is None:
        return tcp
    client = forwarded_client(client_address, get, proxies)
    if client is None:
        return tcp
    return "%s via %s" % (client, tcp)

