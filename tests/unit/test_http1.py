"""protocol/http1.py: request heads, the HTTP face's routing and rewriting, body framing."""

import pytest
from hypothesis import given, strategies as st

from websockify.errors import HTTPError
from websockify.protocol.http1 import (HEAD_LIMIT, BodyFramer, head_end, parse_request_head,
                                       rewrite_request, split_face_target)

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
