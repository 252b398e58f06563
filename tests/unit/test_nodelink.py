"""protocol/nodelink.py: the internal link's opening, with bytes alone."""

import hashlib
import hmac
import json
import struct

import pytest
from hypothesis import given, settings, strategies as st

from websockify.protocol.nodelink import (CHALLENGE_SIZE, MAGIC, Answer, HolderHandshake,
                                          NodeLinkError, OpenerHandshake, OpenRequest)

SECRET = b"cluster secret"
SERVER_NONCE = bytes(range(32))
CLIENT_NONCE = bytes(range(100, 116))
HEADER = {"agent": "bus02", "face": "tcp", "peer": "127.0.0.1:5000"}


def hello_bytes(secret=SECRET, header=HEADER):
    opener = OpenerHandshake(secret, CLIENT_NONCE, header)
    return opener, opener.receive(MAGIC + SERVER_NONCE)


def test_the_challenge_is_magic_and_nonce():
    holder = HolderHandshake(SECRET, SERVER_NONCE)
    assert holder.challenge == b"WSKYNOD1" + SERVER_NONCE
    assert len(holder.challenge) == CHALLENGE_SIZE == 40


def test_hello_bytes_exactly():
    _, hello = hello_bytes()
    raw = b'{"agent":"bus02","face":"tcp","peer":"127.0.0.1:5000"}'
    mac = hmac.new(SECRET, b"\0".join([b"open", SERVER_NONCE, CLIENT_NONCE, raw]),
                   hashlib.sha256).digest()
    assert hello == CLIENT_NONCE + struct.pack("!I", len(raw)) + raw + mac


def test_a_whole_opening_and_the_first_stream_bytes():
    opener = OpenerHandshake(SECRET, CLIENT_NONCE, HEADER)
    holder = HolderHandshake(SECRET, SERVER_NONCE)
    assert opener.wanted() == 40
    hello = opener.receive(holder.challenge)
    request = holder.receive(hello + b"GET / HTTP/1.1\r\n")
    assert request == OpenRequest("bus02", "tcp", "127.0.0.1:5000", HEADER)
    assert holder.rest == b"GET / HTTP/1.1\r\n"
    answer = holder.answer(200, "open")
    assert answer[:8] == struct.pack("!HH", 200, 4) + b"open"
    assert opener.wanted() == 4
    assert opener.receive(answer[:4]) is None
    assert opener.wanted() == 4 + 32
    assert opener.receive(answer[4:]) == Answer(200, "open")
    assert opener.wanted() == 0


def test_a_hello_split_byte_by_byte():
    _, hello = hello_bytes()
    holder = HolderHandshake(SECRET, SERVER_NONCE)
    for byte in hello[:-1]:
        assert holder.receive(bytes([byte])) is None
    assert holder.receive(hello[-1:]).agent_id == "bus02"
    assert holder.rest == b""
    assert holder.receive(b"more") is not None and holder.rest == b"more"


def test_a_forged_hello_is_401():
    _, hello = hello_bytes(secret=b"a guess")
    with pytest.raises(NodeLinkError) as caught:
        HolderHandshake(SECRET, SERVER_NONCE).receive(hello)
    assert caught.value.status == 401
    assert "not signed with the cluster secret" in caught.value.text


def test_a_hello_recorded_for_another_challenge_is_401():
    _, hello = hello_bytes()
    with pytest.raises(NodeLinkError) as caught:
        HolderHandshake(SECRET, bytes(32)).receive(hello)
    assert caught.value.status == 401


@pytest.mark.parametrize("size", [0, 4097, 2 ** 32 - 1])
def test_header_lengths_out_of_bounds_are_400(size):
    with pytest.raises(NodeLinkError) as caught:
        HolderHandshake(SECRET, SERVER_NONCE).receive(CLIENT_NONCE + struct.pack("!I", size))
    assert caught.value.status == 400


@pytest.mark.parametrize("raw", [b"[1]", b"{not json", b'{"agent": "x"}', b'{"face": "tcp"}',
                                 b'{"agent": 5, "face": "tcp"}', b"\xff\xfe"])
def test_bad_headers_are_400(raw):
    mac = hmac.new(SECRET, b"\0".join([b"open", SERVER_NONCE, CLIENT_NONCE, raw]),
                   hashlib.sha256).digest()
    with pytest.raises(NodeLinkError) as caught:
        HolderHandshake(SECRET, SERVER_NONCE).receive(
            CLIENT_NONCE + struct.pack("!I", len(raw)) + raw + mac)
    assert caught.value.status == 400


def test_a_refusal_is_signed_too():
    opener = OpenerHandshake(SECRET, CLIENT_NONCE, HEADER)
    holder = HolderHandshake(SECRET, SERVER_NONCE)
    holder.receive(opener.receive(holder.challenge))
    answer = holder.answer(404, "agent bus02 is not held here")
    assert opener.receive(answer[:4]) is None
    assert opener.receive(answer[4:]) == Answer(404, "agent bus02 is not held here")


def test_a_peer_that_is_not_a_node_is_502():
    opener = OpenerHandshake(SECRET, CLIENT_NONCE, HEADER)
    with pytest.raises(NodeLinkError) as caught:
        opener.receive(b"HTTP/1.1 400 Bad Request\r\n\r\n" + bytes(12))
    assert caught.value.status == 502


def test_an_answer_not_signed_is_502():
    opener = OpenerHandshake(SECRET, CLIENT_NONCE, HEADER)
    holder = HolderHandshake(b"another secret", SERVER_NONCE)
    opener.receive(holder.challenge)
    holder.client_nonce = CLIENT_NONCE
    answer = holder.answer(200, "open")
    opener.receive(answer[:4])
    with pytest.raises(NodeLinkError) as caught:
        opener.receive(answer[4:])
    assert caught.value.status == 502


def test_feeding_past_wanted_is_a_bug():
    opener = OpenerHandshake(SECRET, CLIENT_NONCE, HEADER)
    with pytest.raises(ValueError):
        opener.receive(bytes(41))


def test_oversized_headers_cannot_be_sent():
    with pytest.raises(ValueError):
        OpenerHandshake(SECRET, CLIENT_NONCE, {"agent": "x" * 5000, "face": "tcp"})


ids = st.text(st.sampled_from("abcXYZ019_~.%-"), min_size=1, max_size=128)


@settings(max_examples=200, deadline=None)
@given(agent_id=ids, face=st.sampled_from(["tcp", "bridge", "http"]),
       first=st.binary(max_size=3000), cuts=st.lists(st.integers(1, 50), max_size=40),
       status=st.sampled_from([200, 404, 502, 503, 504]), reason=st.text(max_size=200))
def test_any_opening_cut_anywhere_round_trips(agent_id, face, first, cuts, status, reason):
    header = {"agent": agent_id, "face": face, "peer": "[::1]:1"}
    opener = OpenerHandshake(SECRET, CLIENT_NONCE, header)
    holder = HolderHandshake(SECRET, SERVER_NONCE)
    hello = opener.receive(holder.challenge)
    wire = hello + first
    request, position = None, 0
    for cut in cuts + [len(wire)]:
        request = holder.receive(wire[position:position + cut])
        position += cut
        if position >= len(wire):
            break
    if position < len(wire):
        request = holder.receive(wire[position:])
    assert request == OpenRequest(agent_id, face, "[::1]:1", header)
    assert holder.rest == first
    answer = holder.answer(status, reason)
    result = None
    while opener.wanted():
        take = answer[:min(opener.wanted(), 7)]
        answer = answer[len(take):]
        result = opener.receive(take)
    assert result == Answer(status, reason.encode("utf-8")[:1024].decode("utf-8", "replace"))
    assert answer == b""


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=5000))
def test_garbage_never_crashes_the_holder(data):
    holder = HolderHandshake(SECRET, SERVER_NONCE)
    try:
        holder.receive(data)
    except NodeLinkError as exc:
        assert exc.status in (400, 401)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=40, max_size=40), answer=st.binary(max_size=2000))
def test_garbage_never_crashes_the_opener(data, answer):
    opener = OpenerHandshake(SECRET, CLIENT_NONCE, HEADER)
    try:
        opener.receive(data)
        while opener.wanted() and answer:
            take, answer = answer[:opener.wanted()], answer[opener.wanted():]
            opener.receive(take)
    except NodeLinkError as exc:
        assert exc.status == 502
    assert json.dumps(HEADER)
