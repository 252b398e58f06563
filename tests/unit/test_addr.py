"""websockify.addr: the one host:port parser and formatter, exact values and a round trip."""

import ipaddress

import pytest
from hypothesis import given, strategies as st

from websockify import addr
from websockify.addr import (AddressError, format_host_port, parse_host, parse_host_port,
                             parse_port)


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:5900", ("127.0.0.1", 5900)),
    ("vnc.example.org:5901", ("vnc.example.org", 5901)),
    ("localhost:1", ("localhost", 1)),
    ("h:65535", ("h", 65535)),
    ("[::1]:5900", ("::1", 5900)),
    ("[2001:db8::7]:443", ("2001:db8::7", 443)),
    ("[fe80::1%eth0]:22", ("fe80::1%eth0", 22)),
    ("::1:5900", ("::1", 5900)),                 # bare: the port follows the last colon
    ("2001:db8::7:443", ("2001:db8::7", 443)),
    ("  h:5900\n", ("h", 5900)),
    ("h: 5900", ("h", 5900)),
    ("h:05900", ("h", 5900)),
])
def test_parses(text, expected):
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text, kind, message", [
    ("h:0", addr.RANGE, "port 0 out of range"),
    ("h:65536", addr.RANGE, "port 65536 out of range"),
    ("[::1]:0", addr.RANGE, "port 0 out of range"),
    ("h:x", addr.PORT, "bad port 'x'"),
    ("h:", addr.PORT, "bad port ''"),
    ("h:-1", addr.PORT, "bad port '-1'"),
    ("h:+1", addr.PORT, "bad port '+1'"),
    ("h:5_900", addr.PORT, "bad port '5_900'"),
    ("h:\uff15\uff19", addr.PORT, "bad port '\uff15\uff19'"),
    ("h", addr.FORM, "'h' is not host:port"),
    ("5900", addr.FORM, "'5900' is not host:port"),
    ("[::1]", addr.FORM, "'[::1]' is not host:port"),
    ("[::1]5900", addr.FORM, "'[::1]5900' is not host:port"),
    ("[::1:5900", addr.FORM, "'[::1:5900' is not host:port"),
    (":5900", addr.NO_HOST, "bad host ''"),
    ("[]:5900", addr.NO_HOST, "bad host ''"),
    ("a b:5900", addr.HOST, "bad host 'a b'"),
    ("a/b:5900", addr.HOST, "bad host 'a/b'"),
    ("a]:5900", addr.HOST, "bad host 'a]'"),
    ("[[::1]:5900", addr.HOST, "bad host '[::1'"),
    ("unix_socket:/run/x.sock", addr.PORT, "bad port '/run/x.sock'"),
])
def test_refuses_with_exact_message(text, kind, message):
    with pytest.raises(AddressError) as info:
        parse_host_port(text)
    assert str(info.value) == message
    assert info.value.kind == kind
    assert isinstance(info.value, ValueError)


def test_error_value_is_the_part_at_fault():
    cases = {"h:x": "x", "h:70000": 70000, "a b:1": "a b", "h": "h"}
    for text, value in cases.items():
        with pytest.raises(AddressError) as info:
            parse_host_port(text)
        assert info.value.value == value, text


@pytest.mark.parametrize("text, expected", [
    ("6080", ("", 6080)),
    (":6080", ("", 6080)),
    ("[]:6080", ("", 6080)),
    ("0", ("", 0)),
    ("127.0.0.1:0", ("127.0.0.1", 0)),
    ("[::]:6080", ("::", 6080)),
    ("::1:6080", ("::1", 6080)),
    ("localhost:6080", ("localhost", 6080)),
])
def test_listen_addresses(text, expected):
    assert parse_host_port(text, listen=True) == expected


@pytest.mark.parametrize("text, message", [
    ("65536", "port 65536 out of range"),
    ("x6080", "bad port 'x6080'"),
    ("[::1]", "'[::1]' is not host:port"),
    ("a b:6080", "bad host 'a b'"),
])
def test_listen_refusals(text, message):
    with pytest.raises(AddressError) as info:
        parse_host_port(text, listen=True)
    assert str(info.value) == message


def test_unix_socket_targets():
    assert parse_host_port("unix_socket:/run/vnc.sock", unix=True) == ("unix_socket",
                                                                       "/run/vnc.sock")
    assert parse_host_port("unix_socket: rel/vnc.sock ", unix=True) == ("unix_socket",
                                                                        "rel/vnc.sock")
    assert parse_host_port("[::1]:5900", unix=True) == ("::1", 5900)
    with pytest.raises(AddressError) as info:
        parse_host_port("unix_socket:", unix=True)
    assert str(info.value) == "unix_socket: needs a path"
    assert info.value.kind == addr.FORM


def test_port_alone():
    assert parse_port(5900) == 5900
    assert parse_port("5900") == 5900
    assert parse_port(b"5900") == 5900
    assert parse_port(" 1 ") == 1
    assert parse_port(0, listen=True) == 0
    for value, message in [(0, "port 0 out of range"), (65536, "port 65536 out of range"),
                           (-1, "port -1 out of range"), (True, "bad port True"),
                           ("5900.0", "bad port '5900.0'"), ("", "bad port ''")]:
        with pytest.raises(AddressError) as info:
            parse_port(value)
        assert str(info.value) == message


def test_host_alone():
    assert parse_host("h") == "h"
    assert parse_host("[::1]") == "::1"
    assert parse_host(b"10.0.0.1") == "10.0.0.1"
    assert parse_host(" ::1 ") == "::1"
    for value, message in [("", "bad host ''"), ("[]", "bad host '[]'"),
                           ("a b", "bad host 'a b'"), ("x/y", "bad host 'x/y'")]:
        with pytest.raises(AddressError) as info:
            parse_host(value)
        assert str(info.value) == message


@pytest.mark.parametrize("host, port, expected", [
    ("127.0.0.1", 5900, "127.0.0.1:5900"),
    ("::1", 5900, "[::1]:5900"),
    ("2001:db8::7", "443", "[2001:db8::7]:443"),
    ("vnc.example.org", 1, "vnc.example.org:1"),
    ("", 6080, ":6080"),
    ("", None, ":None"),
])
def test_formats(host, port, expected):
    assert format_host_port(host, port) == expected


# -- round trip -----------------------------------------------------------------------

LABEL = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\Z")
NAMES = st.lists(LABEL, min_size=1, max_size=4).map(".".join)
IPV4 = st.ip_addresses(v=4).map(str)
IPV6 = st.ip_addresses(v=6).map(str)
PORTS = st.integers(min_value=1, max_value=65535)


@given(host=st.one_of(NAMES, IPV4, IPV6), port=PORTS)
def test_format_then_parse_gives_back_host_and_port(host, port):
    text = format_host_port(host, port)
    assert parse_host_port(text) == (host, port)
    assert parse_host_port(text, unix=True) == (host, port)
    assert parse_host_port(text, listen=True) == (host, port)


@given(host=IPV6, port=PORTS)
def test_bare_ipv6_parses_by_the_last_colon(host, port):
    # Unbracketed, the last group is always taken for the port (0.13's rule).
    assert parse_host_port("%s:%d" % (host, port)) == (host, port)
    assert ipaddress.ip_address(parse_host_port("[%s]:%d" % (host, port))[0])
