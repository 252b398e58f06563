"""Upgrade negotiation (protocol.handshake) from bytes alone: no server, no socket."""

import base64
import hashlib

import pytest
from hypothesis import given, strategies as st

from websockify.errors import BadRequest
from websockify.protocol import legacy
from websockify.protocol.codec import HYBI
from websockify.protocol.handshake import (Accept, RequestHeaders, UpgradeRequest, head_end,
                                           is_request_line, is_upgrade_request, negotiate,
                                           redact_uri, refusal_bytes)

RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="          # RFC 6455 section 1.3
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def request(head: bytes, version="HTTP/1.1", path="/", secure=False) -> UpgradeRequest:
    return UpgradeRequest(version, path, RequestHeaders.parse(head), secure)


def hybi(extra: bytes = b"", key=RFC_KEY.encode(), version=b"13") -> UpgradeRequest:
    return request(b"Host: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: " + version
                   + b"\r\n" + extra)


def test_rfc_sample_key_is_accepted_with_the_rfc_answer():
    accept = negotiate(hybi())
    assert accept.codec is HYBI and accept.status == "101 Switching Protocols"
    assert not accept.needs_key3
    assert accept.response() == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + RFC_ACCEPT.encode() + b"\r\n\r\n")


@pytest.mark.parametrize("offer, chosen, codec", [
    (b"binary", b"binary", HYBI),
    (b"base64, binary", b"binary", HYBI),
    (b"base64", b"base64", legacy.BASE64),
    (b"chat", None, HYBI),
])
def test_subprotocol_choice(offer, chosen, codec):
    accept = negotiate(hybi(b"Sec-WebSocket-Protocol: " + offer + b"\r\n"))
    assert accept.codec is codec
    line = b"Sec-WebSocket-Protocol: " + chosen + b"\r\n" if chosen else b"Sec-WebSocket-Protocol"
    assert (line in accept.response()) == bool(chosen)


@pytest.mark.parametrize("version", [b"7", b"8", b"13"])
def test_supported_versions(version):
    assert negotiate(hybi(version=version)).codec is HYBI


@pytest.mark.parametrize("req, message", [
    (hybi(version=b"12"), "unsupported WebSocket version '12'; supported versions: 13, 8, 7"),
    (hybi(key=b"not base64!"), "invalid Sec-WebSocket-Key: must be 16 bytes in base64"),
    (hybi(key=base64.b64encode(b"x" * 15)), "invalid Sec-WebSocket-Key: must be 16 bytes in base64"),
    (request(b"Sec-WebSocket-Version: 13\r\n"), "missing Sec-WebSocket-Key"),
    (request(b"Sec-WebSocket-Key: " + RFC_KEY.encode() + b"\r\n"),
     "missing Sec-WebSocket-Version; supported versions: 13, 8, 7"),
    (request(b"Host: h\r\nSec-WebSocket-Version: 13\r\n", version="HTTP/1.0"),
     "WebSocket upgrade needs HTTP/1.1, got HTTP/1.0"),
    (request(b"Upgrade: websocket\r\n"),
     "missing Host (a Hixie handshake answers with the location)"),
    (request(b"Host: h\r\nSec-WebSocket-Key1: 1 2\r\n"),
     "Hixie-76 handshake needs both Sec-WebSocket-Key1 and Key2"),
])
def test_refusals_say_why(req, message):
    with pytest.raises(BadRequest) as info:
        negotiate(req)
    assert info.value.status == 400 and str(info.value) == message


def test_unsupported_version_names_the_supported_ones_in_a_header():
    with pytest.raises(BadRequest) as info:
        negotiate(hybi(version=b"99"))
    assert info.value.headers == [("Sec-WebSocket-Version", "13, 8, 7")]


def test_hixie_76_sample_from_the_draft():
    # draft-hixie-thewebsocketprotocol-76, section 1.3
    req = request(b"Host: example.com\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key2: 12998 5 Y3 1  .P00\r\nSec-WebSocket-Protocol: sample\r\n"
                  b"Upgrade: WebSocket\r\nSec-WebSocket-Key1: 4 @1  46546xW%0l 1 5\r\n"
                  b"Origin: http://example.com\r\n", path="/demo")
    accept = negotiate(req)
    assert accept.codec is legacy.HIXIE_76 and accept.needs_key3
    with pytest.raises(ValueError):
        accept.response()
    response = accept.response(b"^n:ds[4U")
    assert response.endswith(b"\r\n\r\n8jKS'y:G*Co,Wxa-")
    assert b"Sec-WebSocket-Location: ws://example.com/demo\r\n" in response
    assert b"Sec-WebSocket-Origin: http://example.com\r\n" in response
    assert b"Sec-WebSocket-Protocol: sample\r\n" in response
    assert accept.status == "101 WebSocket Protocol Handshake"


def test_hixie_75_location_follows_tls():
    accept = negotiate(request(b"Host: h:1\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n",
                               path="/x?y", secure=True))
    assert accept.codec is legacy.HIXIE_75 and not accept.needs_key3
    assert b"WebSocket-Location: wss://h:1/x?y\r\n" in accept.response()


@pytest.mark.parametrize("req", [
    hybi(b"Sec-WebSocket-Protocol: base64\r\n"),
    request(b"Host: h\r\nUpgrade: WebSocket\r\n"),
])
def test_legacy_clients_refused_when_the_service_frames_hybi_itself(req):
    with pytest.raises(BadRequest) as info:
        negotiate(req, legacy_clients=False)
    assert "WebSocket clients are not supported by this service" in str(info.value)


def test_binary_clients_pass_when_legacy_ones_are_refused():
    assert negotiate(hybi(), legacy_clients=False).codec is HYBI


# -- heads and headers ------------------------------------------------------------

@pytest.mark.parametrize("data, searched, expected", [
    (b"GET / HTTP/1.1\r\nHost: h\r\n\r\nrest", 0, (23, 4)),
    (b"GET / HTTP/1.1\nHost: h\n\nrest", 0, (22, 2)),
    (b"GET / HTTP/1.1\r\nHost: h\r\n", 0, (-1, 4)),
    (b"GET / HTTP/1.1\r\nHost: h\r\n\r", 26, (-1, 4)),
])
def test_head_end(data, searched, expected):
    assert head_end(data, searched) == expected


def test_head_end_found_across_reads():
    head = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
    # The blank line split over two reads: searching from where the last read ended.
    assert head_end(head, len(head) - 2) == (len(head) - 4, 4)


@pytest.mark.parametrize("line, ok", [
    (b"GET /x HTTP/1.1\r\n", True), (b"GET /x HTTP/1.1\n", True),
    (b"get /x HTTP/1.1\r\n", False), (b"GET /x\r\n", False), (b"\x16\x03\x01\r\n", False),
    (b"GET  /x HTTP/1.1\r\n", False),
])
def test_request_line(line, ok):
    assert is_request_line(line) is ok


def test_headers_parse_joins_repeats_and_rejects_garbage():
    headers = RequestHeaders.parse(b"A: 1\r\nB:2\r\na: 3\r\n")
    assert headers.get("a") == "1, 3" and headers["B"] == "2" and len(headers) == 2
    assert headers.keys() == ["A", "B", "a"]
    for bad in (b"no colon\r\n", b"Bad Name: x\r\n", b" folded: x\r\n"):
        with pytest.raises(BadRequest):
            RequestHeaders.parse(bad)


def test_remove_prefix_treats_dash_and_underscore_alike():
    headers = RequestHeaders.parse(b"SSL_CLIENT: x\r\nSsl-Client-S: y\r\nHost: h\r\n")
    assert sorted(headers.remove_prefix("SSL_")) == ["ssl-client-s", "ssl_client"]
    assert headers.keys() == ["Host"]


@pytest.mark.parametrize("method, head, expected", [
    ("GET", b"Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n", True),
    ("GET", b"Upgrade: WebSocket\r\nConnection: upgrade\r\n", True),
    ("POST", b"Upgrade: websocket\r\nConnection: Upgrade\r\n", False),
    ("GET", b"Upgrade: h2c\r\nConnection: Upgrade\r\n", False),
    ("GET", b"Upgrade: websocket\r\n", False),
])
def test_is_upgrade_request(method, head, expected):
    assert is_upgrade_request(method, RequestHeaders.parse(head)) is expected


def test_refusal_bytes():
    assert refusal_bytes("404 Not Found", "unknown token", [("X-A", "b")]) == (
        b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 14\r\nConnection: close\r\nX-A: b\r\n\r\nunknown token\n")


def test_redact_uri():
    assert redact_uri("GET /?token=abc&x=1 HTTP/1.1") == "GET /?token=<redacted>&x=1 HTTP/1.1"
    assert redact_uri("/?path=websockify%3Ftoken%3Dabc%26x%3D1") == \
        "/?path=websockify%3Ftoken%3D<redacted>%26x%3D1"


@given(st.binary(min_size=16, max_size=16))
def test_any_16_byte_key_gets_the_rfc_accept(raw):
    key = base64.b64encode(raw)
    expected = base64.b64encode(hashlib.sha1(
        key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    assert b"Sec-WebSocket-Accept: " + expected + b"\r\n" in negotiate(hybi(key=key)).response()


@given(st.binary(max_size=300))
def test_arbitrary_header_blocks_parse_or_refuse_with_400(block):
    try:
        headers = RequestHeaders.parse(block)
    except BadRequest as exc:
        assert exc.status == 400
        return
    try:
        result = negotiate(UpgradeRequest("HTTP/1.1", "/", headers))
    except BadRequest as exc:
        assert exc.status == 400
    else:
        assert isinstance(result, Accept)


# -- the client side (the tunnel agent's upgrade) ----------------------------------

from websockify.errors import TunnelHandshakeError  # noqa: E402
from websockify.protocol.handshake import (check_client_response, client_key,  # noqa: E402
                                           client_request)

SUB = "websockify-tunnel.v1"


def answer(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


GOOD = ("HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
        "Sec-WebSocket-Accept: " + RFC_ACCEPT, "Sec-WebSocket-Protocol: " + SUB)


def test_client_request_head():
    head = client_request("rendezvous.example:8443", "/tunnel/LKLAFA151NA774655", RFC_KEY, SUB,
                          [("Authorization", "Bearer a.b.c"), ("User-Agent", "websockify-agent")])
    assert head == (b"GET /tunnel/LKLAFA151NA774655 HTTP/1.1\r\n"
                    b"Host: rendezvous.example:8443\r\n"
                    b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"Sec-WebSocket-Version: 13\r\n"
                    b"Sec-WebSocket-Protocol: websockify-tunnel.v1\r\n"
                    b"Authorization: Bearer a.b.c\r\nUser-Agent: websockify-agent\r\n\r\n")
    assert client_request("h", "/", RFC_KEY, None, []).count(b"Protocol") == 0


def test_our_server_accepts_the_client_request():
    head = client_request("h", "/x?y=1", RFC_KEY, "binary", [])
    end, size = head_end(head, 0)
    request_line, _, block = head[:end].partition(b"\r\n")
    assert is_request_line(request_line + b"\r\n")
    headers = RequestHeaders.parse(block)
    assert is_upgrade_request("GET", headers)
    accept = negotiate(UpgradeRequest("HTTP/1.1", "/x?y=1", headers))
    check_client_response(accept.response(), RFC_KEY, "binary")


@pytest.mark.parametrize("host, path, headers", [
    ("h\r\nX-Evil: 1", "/", []),
    ("h", "/a b", []),
    ("h", "tunnel/ID", []),
    ("h", "/", [("Authorization", "Bearer x\r\nX-Evil: 1")]),
    ("h", "/", [("Bad Name", "v")]),
    ("h", "/", [("X", "nul\x00")]),
])
def test_client_request_refuses_injection(host, path, headers):
    with pytest.raises(ValueError):
        client_request(host, path, RFC_KEY, SUB, headers)


def test_client_key():
    assert client_key(b"the sample nonce") == RFC_KEY
    with pytest.raises(ValueError):
        client_key(b"short")


def test_a_valid_101_passes():
    check_client_response(answer(*GOOD), RFC_KEY, SUB)
    # Case and spacing of names and values do not matter; LF-only lines are fine.
    check_client_response(b"HTTP/1.1 101 Switching Protocols\nupgrade:  WebSocket\n"
                          b"connection: keep-alive, upgrade\nsec-websocket-accept: "
                          + RFC_ACCEPT.encode() + b"\nSEC-WEBSOCKET-PROTOCOL: " + SUB.encode()
                          + b"\n\n", RFC_KEY, SUB)
    check_client_response(answer(*GOOD[:4]), RFC_KEY, None)


@pytest.mark.parametrize("status_line, status, reason", [
    ("HTTP/1.1 401 Unauthorized", 401, "Unauthorized"),
    ("HTTP/1.1 403 Forbidden", 403, "Forbidden"),
    ("HTTP/1.1 409 Conflict", 409, "Conflict"),
    ("HTTP/1.0 503 agent gone fishing", 503, "agent gone fishing"),
    ("HTTP/1.1 200 OK", 200, "OK"),
    ("HTTP/1.1 400", 400, ""),
])
def test_a_refusal_carries_status_and_reason(status_line, status, reason):
    head = answer(status_line, "Content-Type: text/plain", "Content-Length: 14")
    with pytest.raises(TunnelHandshakeError) as info:
        check_client_response(head, RFC_KEY, SUB)
    assert (info.value.status, info.value.reason) == (status, reason)
    assert info.value.problem is None
    assert str(info.value) == ("%d %s" % (status, reason)).rstrip()


@pytest.mark.parametrize("lines, problem", [
    (GOOD[:1] + GOOD[2:], "Upgrade is ''"),
    (GOOD[:1] + ("Upgrade: h2c",) + GOOD[2:], "Upgrade is 'h2c'"),
    (GOOD[:2] + GOOD[3:], "Connection does not say Upgrade"),
    (GOOD[:3] + GOOD[4:], "missing Sec-WebSocket-Accept"),
    (GOOD[:3] + ("Sec-WebSocket-Accept: AAAA",) + GOOD[4:], "wrong Sec-WebSocket-Accept"),
    (GOOD[:4], "the server chose no subprotocol"),
    (GOOD[:4] + ("Sec-WebSocket-Protocol: binary",), "chose subprotocol 'binary'"),
    (GOOD + ("Sec-WebSocket-Extensions: permessage-deflate",), "extensions"),
    (GOOD + ("no colon here",), "malformed header line"),
])
def test_a_bad_101_is_refused(lines, problem):
    with pytest.raises(TunnelHandshakeError) as info:
        check_client_response(answer(*lines), RFC_KEY, SUB)
    assert info.value.status == 101 and info.value.reason == "Switching Protocols"
    assert problem in info.value.problem and problem in str(info.value)


def test_a_subprotocol_we_did_not_offer_is_refused():
    with pytest.raises(TunnelHandshakeError) as info:
        check_client_response(answer(*GOOD), RFC_KEY, None)
    assert "offered none" in info.value.problem


@pytest.mark.parametrize("head", [b"", b"SSH-2.0-OpenSSH_9.6\r\n\r\n", b"HTTP/2 101\r\n\r\n",
                                  b"HTTP/1.1 1O1 Switching\r\n\r\n", b"\x16\x03\x01\x02\x00"])
def test_an_answer_that_is_not_http(head):
    with pytest.raises(TunnelHandshakeError) as info:
        check_client_response(head, RFC_KEY, SUB)
    assert info.value.status == 0 and "not an HTTP answer" in str(info.value)


@given(st.binary(max_size=300))
def test_arbitrary_answers_pass_or_raise_tunnel_handshake_error(head):
    try:
        check_client_response(head, RFC_KEY, SUB)
    except TunnelHandshakeError as error:
        assert isinstance(error.status, int) and isinstance(error.reason, str)
