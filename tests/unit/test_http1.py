"""protocol/http1.py: request heads, the HTTP face's routing and rewriting, body framing."""

import pytest
from hypothesis import given, strategies as st

from websockify.errors import HTTPError
from websockify.protocol.http1 import (HEAD_LIMIT, BodyFramer, ViewerRequests, head_end,
                                       parse_request_head, rewrite_request, split_face_target)
from websockify.tunnel.http_face import close_connection, forwarded_headers

HEAD = b"POST /t/A1/x?q=1 HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 6.6.6.6\r\n" \
       b"Content-Length: 5\r\n\r\n"


def test_head_parsed_and_rewritten_with_forwarded_headers_replaced():
    head = parse_request_head(HEAD)
    assert (head.method, head.target, head.version) == ("POST", "/t/A1/x?q=1", "HTTP/1.1")
    assert split_face_target(head.target, "/t/") == ("A1", "/x?q=1")
    out = rewrite_request(head, "/x?q=1", {"X-Forwarded-For": "127.0.0.1",
                                           "x-websocktunnel-original-path": "/t/A1/x?q=1"})
    assert out == (b"POST /x?q=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
                   b"X-Forwarded-For: 127.0.0.1\r\n"
                   b"x-websocktunnel-original-path: /t/A1/x?q=1\r\n\r\n")


@pytest.mark.parametrize("target", ["/t/A1/../B2/", "/t/A1/%2e%2e/B2/", "/t/A1/%2E./B2",
                                    "/t/A1%2fB2/", "/t/A1/x%5c..", "/t/../B2/", "/t/./A1/"])
def test_escapes_are_refused_with_400(target):
    with pytest.raises(HTTPError) as info:
        split_face_target(target, "/t/")
    assert info.value.status == 400


def test_targets_outside_the_prefix_are_not_the_face():
    assert split_face_target("/other/A1/", "/t/") is None
    assert split_face_target("/t/", "/t/") is None
    assert split_face_target("/t/A1", "/t/") == ("A1", "/")


def test_head_over_16_kib_is_431():
    big = b"GET / HTTP/1.1\r\nX: " + b"a" * HEAD_LIMIT + b"\r\n\r\n"
    with pytest.raises(HTTPError) as info:
        head_end(big)
    assert info.value.status == 431
    assert head_end(HEAD + b"hello") == len(HEAD)
    assert head_end(HEAD[:-2]) == -1


def test_content_length_body_ends_exactly():
    framer = BodyFramer(parse_request_head(HEAD))
    assert framer.feed(b"hel") == 3 and not framer.done
    assert framer.feed(b"loGET") == 2 and framer.done


def test_both_lengths_or_other_encodings_are_400():
    for extra in (b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
                  b"Transfer-Encoding: gzip\r\n", b"Content-Length: -1\r\n"):
        with pytest.raises(HTTPError) as info:
            BodyFramer(parse_request_head(b"POST / HTTP/1.1\r\n" + extra + b"\r\n"))
        assert info.value.status == 400


CHUNKED = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nTrailer: x\r\n\r\n"


@given(st.lists(st.integers(min_value=1, max_value=len(CHUNKED)), max_size=8))
def test_chunked_body_ends_at_the_same_byte_however_it_is_cut(cuts):
    framer = BodyFramer(parse_request_head(b"POST / HTTP/1.1\r\n"
                                           b"Transfer-Encoding: chunked\r\n\r\n"))
    data = CHUNKED + b"GET / HTTP/1.1\r\n"
    points = sorted(set(cuts)) + [len(data)]
    used, start = 0, 0
    for point in points:
        used += framer.feed(data[start:point])
        start = point
    assert framer.done and used == len(CHUNKED)


@given(st.binary(max_size=300))
def test_garbage_heads_parse_or_raise_400(data):
    try:
        parse_request_head(data)
    except HTTPError as exc:
        assert exc.status in (400, 431)


# -- a viewer's byte stream (ViewerRequests) -------------------------------------------

def _forwarded(head):
    return {"X-Forwarded-For": "192.0.2.7", "x-websocktunnel-original-path": head.target}


def _viewer(keep_alive=True):
    return ViewerRequests("/t/", "web", _forwarded, keep_alive=keep_alive)


PIPELINED = (b"POST /t/web/form?a=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
             b"X-Forwarded-For: 6.6.6.6\r\n\r\nhello"
             b"PUT /t/web/up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"3\r\nabc\r\n0\r\n\r\n"
             b"\r\nGET /t/web/ HTTP/1.1\r\nHost: h\r\n\r\n")
PIPELINED_OUT = (b"POST /form?a=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
                 b"X-Forwarded-For: 192.0.2.7\r\nx-websocktunnel-original-path: /t/web/form?a=1"
                 b"\r\n\r\nhello"
                 b"PUT /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
                 b"X-Forwarded-For: 192.0.2.7\r\nx-websocktunnel-original-path: /t/web/up\r\n\r\n"
                 b"3\r\nabc\r\n0\r\n\r\n"
                 b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 192.0.2.7\r\n"
                 b"x-websocktunnel-original-path: /t/web/\r\n\r\n")


def test_pipelined_requests_rewritten_exactly():
    viewer = _viewer()
    assert viewer.feed(PIPELINED) == PIPELINED_OUT
    assert (viewer.requests, viewer.stopped, viewer.boundary) == (3, False, None)


@given(st.lists(st.integers(min_value=0, max_value=len(PIPELINED)), max_size=12))
def test_pipelined_requests_the_same_however_the_bytes_are_cut(cuts):
    viewer = _viewer()
    out = b""
    points = sorted(set(cuts)) + [len(PIPELINED)]
    start = 0
    for point in points:
        out += viewer.feed(PIPELINED[start:point])
        start = point
    assert out == PIPELINED_OUT


def test_without_keep_alive_one_request_with_connection_close():
    viewer = _viewer(keep_alive=False)
    out = viewer.feed(b"GET /t/web/a HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\n\r\n"
                      b"GET /t/web/b HTTP/1.1\r\n\r\n")
    assert out == (b"GET /a HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 192.0.2.7\r\n"
                   b"x-websocktunnel-original-path: /t/web/a\r\nConnection: close\r\n\r\n")
    # Stopped at the first request's end, not at a boundary: the service closes.
    assert (viewer.requests, viewer.stopped, viewer.boundary) == (1, True, None)
    assert viewer.feed(b"more") == b""


def test_a_request_for_another_agent_ends_the_forwarding():
    viewer = _viewer()
    out = viewer.feed(b"GET /t/web/ HTTP/1.1\r\n\r\nGET /t/other/secret HTTP/1.1\r\n\r\n"
                      b"GET /t/web/again HTTP/1.1\r\n\r\n")
    assert out.count(b"HTTP/1.1\r\n") == 1 and b"secret" not in out and b"again" not in out
    assert viewer.stopped and viewer.boundary.startswith("a request for /t/other/secret")
    for outside in (b"GET /elsewhere HTTP/1.1\r\n\r\n", b"GET /t/webby/ HTTP/1.1\r\n\r\n"):
        viewer = _viewer()
        assert viewer.feed(outside) == b"" and viewer.stopped and viewer.requests == 0


UPGRADE = (b"GET /t/web/ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n"
           b"Connection: keep-alive, Upgrade\r\n\r\n")


def test_an_upgrade_holds_what_follows_until_a_101_then_passes_everything():
    viewer = _viewer(keep_alive=False)
    frames = b"\x81\x85abcd" + b"GET /t/other/ HTTP/1.1\r\n\r\n"
    out = viewer.feed(UPGRADE + frames)
    assert out.endswith(b"Connection: keep-alive, Upgrade\r\nX-Forwarded-For: 192.0.2.7\r\n"
                        b"x-websocktunnel-original-path: /t/web/ws\r\n\r\n")
    assert b"Connection: close" not in out
    assert viewer.awaiting_upgrade and viewer.feed(b"more") == b""
    assert viewer.upgrade_answered(True) == frames + b"more"
    assert viewer.raw and viewer.feed(b"\x00\xff") == b"\x00\xff"


def test_a_refused_upgrade_ends_the_forwarding():
    viewer = _viewer()
    viewer.feed(UPGRADE + b"GET /t/web/../../smuggled HTTP/1.1\r\n\r\n")
    assert viewer.upgrade_answered(False) == b""
    assert viewer.stopped and viewer.boundary == "the upgrade was not accepted"
    assert viewer.feed(b"GET /t/web/ HTTP/1.1\r\n\r\n") == b""


def test_an_upgrade_after_other_requests_ends_the_forwarding():
    viewer = _viewer()
    out = viewer.feed(b"GET /t/web/ HTTP/1.1\r\n\r\n" + UPGRADE)
    assert out.count(b"HTTP/1.1") == 1 and b"Upgrade" not in out
    assert viewer.stopped and viewer.boundary.startswith("an upgrade after other requests")


@pytest.mark.parametrize("head", [
    # A bare LF would hide a header from us that a lenient service reads.
    b"GET /t/web/ HTTP/1.1\r\nHost: h\nX-Forwarded-For: 6.6.6.6\r\n\r\n",
    b"GET /t/web/ HTTP/1.1\r\nHost: h\rX: y\r\n\r\n",
    b"GET /t/web/ HTTP/1.1\r\nHost: h\x00\r\n\r\n",
    b"POST /t/web/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 50\r\n\r\n",
    b"POST /t/web/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked"
    b"\r\n\r\n",
    "POST /t/web/ HTTP/1.1\r\nContent-Length: \u00b2\r\n\r\n".encode("latin-1"),
])
def test_heads_a_service_could_read_differently_are_400(head):
    with pytest.raises(HTTPError) as raised:
        _viewer().feed(head)
    assert raised.value.status == 400


@pytest.mark.parametrize("size", [b"-6", b"+5", b"0x10", b" 5", b"1_0", b"11111111111111111"])
def test_chunk_sizes_other_than_hex_digits_are_400(size):
    # -6 once made the framer walk backwards forever.
    with pytest.raises(HTTPError) as raised:
        _viewer().feed(b"POST /t/web/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                       + size + b"\r\nXXXXXXXXXXXXXXXXXXXXX")
    assert raised.value.status == 400


def test_chunk_data_must_end_with_crlf():
    with pytest.raises(HTTPError):
        _viewer().feed(b"POST /t/web/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"3\r\nabcXY0\r\n\r\n")


@pytest.mark.parametrize("later, status", [
    (b"GET /t/web/../other/ HTTP/1.1\r\n\r\n", 400),
    (b"GET /t/web/%2E%2E/other/ HTTP/1.1\r\n\r\n", 400),
    (b"NOT HTTP\r\n\r\n", 400),
    (b"GET /t/web/ HTTP/1.1\r\nX: " + b"a" * HEAD_LIMIT + b"\r\n\r\n", 431),
])
def test_a_bad_later_head_raises_after_the_good_ones(later, status):
    viewer = _viewer()
    good = viewer.feed(b"GET /t/web/ HTTP/1.1\r\n\r\n")
    assert good.startswith(b"GET / HTTP/1.1")
    with pytest.raises(HTTPError) as raised:
        viewer.feed(later)
    assert raised.value.status == status and viewer.requests == 1


@given(st.binary(max_size=300))
def test_any_bytes_forward_only_rewritten_heads_or_raise(data):
    viewer = _viewer()
    try:
        out = viewer.feed(b"GET /t/web/ HTTP/1.1\r\nContent-Length: 10\r\n\r\n" + data)
    except HTTPError as exc:
        assert exc.status in (400, 431)
        return
    # Every head forwarded is one of ours: the prefix gone, our header there.
    assert out.startswith(b"GET / HTTP/1.1\r\nContent-Length: 10\r\n")
    assert out.count(b"x-websocktunnel-original-path: /t/web/") == viewer.requests


def test_forwarded_headers_replaced_or_extended_for_a_trusted_proxy():
    head = parse_request_head(b"GET /t/web/x HTTP/1.1\r\nHost: example.org\r\n"
                              b"X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\n\r\n")
    assert forwarded_headers(head, client="127.0.0.1", scheme="http", trusted=False) == {
        "X-Forwarded-For": "127.0.0.1", "X-Forwarded-Proto": "http",
        "X-Forwarded-Host": "example.org", "x-websocktunnel-original-path": "/t/web/x"}
    assert forwarded_headers(head, client="127.0.0.1", scheme="http", trusted=True) == {
        "X-Forwarded-For": "203.0.113.9, 127.0.0.1", "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "example.org", "x-websocktunnel-original-path": "/t/web/x"}


def test_a_one_request_response_says_connection_close():
    response = b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"
    end = response.find(b"\r\n\r\n")
    assert close_connection(response, end) == \
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
