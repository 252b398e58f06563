"""--trusted-proxy: the client address in log lines behind reverse proxies."""

import ipaddress
import os
import re
import socket
import tempfile

import pytest

from tests.helpers import RawWebSocket, SharedProcess, read_http_response, wait_for
from tests.e2e.test_cli import assert_usage_error, run_cli
from websockify.protocol.forwarded import (TrustedProxies, forwarded_client, parse_address,
                                  parse_trusted_proxies, peer_label)


def session(port, *headers, path="/"):
    """One echo session with extra request headers; returns the client's port."""
    ws = RawWebSocket(port, path=path, extra=headers)
    try:
        assert ws.status == 101
        client_port = ws.sock.getsockname()[1] if ws.sock.family != socket.AF_UNIX else None
        ws.send_binary(b"hi")
        assert ws.recv_data(2) == b"hi"
        ws.send(0x8, b"\x03\xe8")
        assert ws.expect_close() == (1000, "")
    finally:
        ws.close()
    return client_port


def closed_line(proc, path):
    pattern = re.compile(r"INFO (.*) %s -> \S+: closed \(1000\)" % re.escape(path))
    match = wait_for(lambda: pattern.search(proc.log()),
                     what="session line for %s in:\n%s" % (path, proc.log()))
    return match.group(1)


@pytest.fixture(scope="module")
def shared_trusting_server(module_websockify, module_echo_target):
    proc, port = module_websockify("--workers", "1", "--trusted-proxy",
                                   "10.0.0.0/8,127.0.0.0/8", "127.0.0.1:{port}",
                                   "127.0.0.1:%d" % module_echo_target)
    return SharedProcess(proc), port


@pytest.fixture
def trusting_server(shared_trusting_server):
    """The module's shared server, its log read from this test's start on."""
    proc, port = shared_trusting_server
    proc.mark()
    return proc, port


@pytest.mark.parametrize("headers, client", [
    # The client wrote the first item itself; the proxy appended what it saw.
    (("X-Forwarded-For: 198.51.100.7, 203.0.113.9",), "203.0.113.9"),
    # Trusted hops are skipped, across repeated headers too.
    (("X-Forwarded-For: 203.0.113.9, 10.1.2.3", "X-Forwarded-For: 127.0.0.2"), "203.0.113.9"),
    # Every hop trusted: the left-most.
    (("X-Forwarded-For: 10.9.9.9, 10.1.2.3",), "10.9.9.9"),
    (("X-Real-IP: 2001:db8::5",), "2001:db8::5"),
    # A malformed X-Forwarded-For is ignored, X-Real-IP is still read.
    (("X-Forwarded-For: garbage", "X-Real-IP: 203.0.113.10"), "203.0.113.10"),
], ids=["forwarded-for", "trusted-hops", "all-trusted", "real-ip", "fallback"])
def test_client_from_a_trusted_proxy(trusting_server, headers, client):
    proc, port = trusting_server
    cport = session(port, *headers, path="/fwd")
    assert closed_line(proc, "/fwd") == "%s via 127.0.0.1:%d" % (client, cport)


def test_refusal_lines_name_the_forwarded_client(trusting_server):
    proc, port = trusting_server
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /plain HTTP/1.1\r\nHost: x\r\nX-Real-IP: 203.0.113.44\r\n\r\n")
        status, _, _ = read_http_response(sock)
        cport = sock.getsockname()[1]
    assert status == 405
    proc.wait_log(r'203\.0\.113\.44 via 127\.0\.0\.1:%d: "GET /plain HTTP/1\.1" 405' % cport)


@pytest.mark.parametrize("headers", [
    ("X-Forwarded-For: not-an-address",),
    ("X-Forwarded-For: 203.0.113.9, unknown",),
    ("X-Forwarded-For: 203.0.113.9 ; 1.2.3.4",),
    ("X-Forwarded-For: ",),
    ("X-Real-IP: 203.0.113.9, 198.51.100.1",),
    ("X-Real-IP: 999.1.1.1",),
], ids=["word", "unknown-hop", "semicolon", "empty", "real-ip-list", "bad-octet"])
def test_malformed_values_are_ignored(trusting_server, headers):
    proc, port = trusting_server
    cport = session(port, *headers, path="/malformed")
    assert closed_line(proc, "/malformed") == "127.0.0.1:%d" % cport
    assert proc.proc.poll() is None


def test_spoofing_from_an_untrusted_peer_is_ignored(websockify, echo_target):
    proc, port = websockify("--workers", "1", "--trusted-proxy", "10.0.0.0/8",
                            "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    cport = session(port, "X-Forwarded-For: 203.0.113.66", "X-Real-IP: 203.0.113.67",
                    path="/spoof")
    assert closed_line(proc, "/spoof") == "127.0.0.1:%d" % cport
    assert "203.0.113.6" not in proc.log()


def test_headers_ignored_without_the_option(websockify, echo_target):
    proc, port = websockify("--workers", "1", "127.0.0.1:{port}", "127.0.0.1:%d" % echo_target)
    cport = session(port, "X-Forwarded-For: 203.0.113.66", path="/plain-log")
    assert closed_line(proc, "/plain-log") == "127.0.0.1:%d" % cport


@pytest.fixture
def unix_path():
    directory = tempfile.mkdtemp(prefix="wsfwd")
    yield os.path.join(directory, "ws.sock")
    for name in os.listdir(directory):
        os.unlink(os.path.join(directory, name))
    os.rmdir(directory)


class UnixWebSocket(RawWebSocket):
    def __init__(self, path, extra=()):
        from tests.helpers import handshake_request
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.sock.sendall(handshake_request("/unix", "localhost", extra=extra))
        self.status, self.headers, self.buffer = read_http_response(self.sock)


@pytest.mark.parametrize("trusted, expected", [("unix", "203.0.113.5 via unix-client"),
                                                ("127.0.0.0/8", "unix-client")])
def test_unix_listener_trusted_with_the_unix_keyword(echo_target, unix_path,
                                                     processes, trusted, expected):
    from tests.helpers import websockify_argv
    proc = processes(websockify_argv("--workers", "1", "--unix-listen", unix_path,
                                     "--trusted-proxy", trusted, "127.0.0.1:%d" % echo_target),
                     name="websockify")
    proc.wait_log(r"proxying from")
    ws = UnixWebSocket(unix_path, extra=("X-Forwarded-For: 203.0.113.5",))
    try:
        assert ws.status == 101
        ws.send(0x8, b"\x03\xe8")
        assert ws.expect_close() == (1000, "")
    finally:
        ws.close()
    assert closed_line(proc, "/unix") == expected


# -- the command line ----------------------------------------------------------------

@pytest.mark.parametrize("value", ["10.0.0.0/33", "nonsense", "10.0.0.0/8,", "10.0.0.0/8;1.2.3.4",
                                   "fe80::/129"])
def test_bad_cidr_exits_2_with_one_line(value):
    line = assert_usage_error(run_cli("--trusted-proxy", value, "6080", "localhost:5900"),
                              "--trusted-proxy")
    assert "is not a network" in line


def test_parsing():
    proxies = parse_trusted_proxies("10.0.0.0/8, 192.168.1.1,2001:db8::/32,unix")
    assert proxies.unix
    assert [str(n) for n in proxies.networks] == ["10.0.0.0/8", "192.168.1.1/32",
                                                 "2001:db8::/32"]
    # Host bits are tolerated: 10.1.2.3/8 means 10.0.0.0/8.
    assert str(parse_trusted_proxies("10.1.2.3/8").networks[0]) == "10.0.0.0/8"


# -- the rule itself, on addresses ------------------------------------------------------

def headers(**values):
    mapping = {name.replace("_", "-").lower(): value for name, value in values.items()}
    return lambda name: mapping.get(name.lower())


@pytest.mark.parametrize("text, expected", [
    ("203.0.113.9", "203.0.113.9"), (" 203.0.113.9 ", "203.0.113.9"),
    ("203.0.113.9:5555", "203.0.113.9"), ("2001:db8::1", "2001:db8::1"),
    ("[2001:db8::1]", "2001:db8::1"), ("[2001:db8::1]:443", "2001:db8::1"),
    ("::ffff:198.51.100.3", "198.51.100.3"),
    ("unknown", None), ("_hidden", None), ("203.0.113.9:x", None), ("[2001:db8::1", None),
    ("[2001:db8::1]x", None), ("", None), ("1.2.3", None),
])
def test_parse_address(text, expected):
    address = parse_address(text)
    assert (str(address) if address is not None else None) == expected


def test_v4_mapped_peer_is_matched_as_ipv4():
    proxies = parse_trusted_proxies("127.0.0.0/8")
    client = forwarded_client(("::ffff:127.0.0.1", 5000, 0, 0),
                              headers(x_forwarded_for="203.0.113.1"), proxies)
    assert client == ipaddress.ip_address("203.0.113.1")


def test_peer_label_before_the_headers_are_read():
    proxies = parse_trusted_proxies("127.0.0.0/8")
    assert peer_label(("127.0.0.1", 4000), None, proxies) == "127.0.0.1:4000"
    assert peer_label(("::1", 4000, 0, 0), None, TrustedProxies()) == "[::1]:4000"
