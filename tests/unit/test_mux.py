"""Unit tests of the tunnel multiplexing protocol (websockify.protocol.mux), with bytes alone.

A server and an agent ``Connection`` are wired together by handing the
messages one produces to the other; hand-made frames check each violation.
"""

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from websockify.errors import ProtocolError
from websockify.protocol import mux
from websockify.protocol.mux import (DEFAULT_WINDOW, HEADER, MAX_DATA, Connection,
                                     DataReceived, FrameType, GoAwayReceived, Liveness,
                                     MuxProtocolError, PongReceived, ResetCode,
                                     SendWindowOpened, StreamAccepted, StreamClosed,
                                     StreamEnded, StreamLimitError, StreamOpened,
                                     StreamReset, encode_frame, parse_frames)

META = {"face": "tcp", "peer": "192.0.2.7:5678"}


def pump(src, dst, **kwargs):
    """Deliver everything ``src`` has queued to ``dst``; the events, in order."""
    events = []
    for message in src.data_to_send(**kwargs):
        events += dst.receive_message(message)
    return events


def frames_of(conn):
    """Every frame ``conn`` would send now, as (type, stream, payload)."""
    return [f for message in conn.data_to_send() for f in parse_frames(message)]


def pair(**kwargs):
    return Connection("server", **kwargs), Connection("agent", **kwargs)


def established(server, agent, meta=META):
    stream_id = server.open_stream(meta)
    assert pump(server, agent) == [StreamOpened(stream_id, meta)]
    agent.accept_stream(stream_id)
    assert pump(agent, server) == [StreamAccepted(stream_id)]
    return stream_id


def data_events(events):
    out = {}
    for event in events:
        if isinstance(event, DataReceived):
            out[event.stream_id] = out.get(event.stream_id, b"") + event.data
    return out


# -- the codec -----------------------------------------------------------------

def test_header_is_seven_bytes_big_endian():
    assert HEADER.format == "!BIH" and HEADER.size == 7
    assert encode_frame(FrameType.DATA, 0x01020304, b"ab") == b"\x03\x01\x02\x03\x04\x00\x02ab"
    assert parse_frames(b"\x03\x00\x00\x00\x01\x00\x02ab\x05\x00\x00\x00\x01\x00\x00") == [
        (3, 1, b"ab"), (5, 1, b"")]
    assert mux.SUBPROTOCOL == "websockify-tunnel.v1"
    assert MAX_DATA == 16384 and DEFAULT_WINDOW == 262144


def test_frame_type_and_reset_code_values():
    assert [t.value for t in FrameType] == list(range(1, 10))
    assert [t.name for t in FrameType] == ["OPEN", "OPEN_OK", "DATA", "CREDIT", "FIN",
                                           "RESET", "PING", "PONG", "GOAWAY"]
    assert {c.name: c.value for c in ResetCode} == {
        "CANCEL": 1, "REFUSED": 2, "TIMEOUT": 3, "LIMIT": 4, "PROTOCOL": 5,
        "INTERNAL": 6, "GOING_AWAY": 7}


def test_open_round_trip():
    server, agent = pair()
    stream_id = server.open_stream(META)
    assert stream_id == 1
    frames = frames_of(server)
    assert frames == [(FrameType.OPEN, 1, json.dumps(META, separators=(",", ":")).encode())]
    agent2 = Connection("agent")
    assert agent2.receive_message(encode_frame(*frames[0])) == [StreamOpened(1, META)]
    assert agent2.pending_opens == 1 and agent2.open_streams == 1


def test_stream_ids_are_odd_and_increasing():
    server = Connection("server")
    assert [server.open_stream({}) for _ in range(5)] == [1, 3, 5, 7, 9]


def test_open_ok_round_trip():
    server, agent = pair()
    stream_id = server.open_stream(META)
    pump(server, agent)
    agent.accept_stream(stream_id)
    assert frames_of(agent) == [(FrameType.OPEN_OK, stream_id, b"")]
    assert server.receive_message(encode_frame(FrameType.OPEN_OK, stream_id)) == [
        StreamAccepted(stream_id)]
    assert server.pending_opens == 0 and server.open_streams == 1


def test_data_round_trip_both_ways():
    server, agent = pair()
    stream_id = established(server, agent)
    assert server.send_data(stream_id, b"to the agent") == 12
    assert frames_of(server) == [(FrameType.DATA, stream_id, b"to the agent")]
    server.send_data(stream_id, b"hello")
    assert pump(server, agent) == [DataReceived(stream_id, b"hello")]
    agent.send_data(stream_id, bytearray(b"to the server"))
    assert pump(agent, server) == [DataReceived(stream_id, b"to the server")]
    assert server.bytes_out == 17 and agent.bytes_in == 5
    assert agent.bytes_out == 13 and server.bytes_in == 13


def test_large_data_is_split_into_max_data_frames():
    server, agent = pair()
    stream_id = established(server, agent)
    payload = bytes(range(256)) * 200          # 51200 bytes
    assert server.send_data(stream_id, payload) == len(payload)
    frames = frames_of(server)
    assert [len(f[2]) for f in frames] == [16384, 16384, 16384, 2048]
    assert b"".join(f[2] for f in frames) == payload


def test_small_chunks_share_one_frame():
    server, agent = pair()
    stream_id = established(server, agent)
    for piece in (b"ab", b"cd", b"ef"):
        server.send_data(stream_id, piece)
    assert frames_of(server) == [(FrameType.DATA, stream_id, b"abcdef")]


def test_data_frames_of_one_stream_become_one_event():
    server, agent = pair()
    stream_id = established(server, agent)
    payload = b"z" * 40000
    server.send_data(stream_id, payload)
    messages = server.data_to_send()
    assert len(messages) == 1
    assert agent.receive_message(messages[0]) == [DataReceived(stream_id, payload)]


def test_credit_round_trip():
    server, agent = pair()
    stream_id = established(server, agent)
    server.send_data(stream_id, b"x" * 65536)
    events = pump(server, agent)
    agent.consumed(stream_id, 65536)
    assert frames_of(agent) == [(FrameType.CREDIT, stream_id, struct.pack("!I", 65536))]
    assert len(events) == 1
    server2, agent2 = pair()
    stream_id = established(server2, agent2)
    server2.send_data(stream_id, b"x" * 65536)
    pump(server2, agent2)
    agent2.consumed(stream_id, 65536)
    assert pump(agent2, server2) == [SendWindowOpened(stream_id, DEFAULT_WINDOW)]


def test_fin_round_trip_and_stream_closed_both_orders():
    server, agent = pair()
    stream_id = established(server, agent)
    server.send_data(stream_id, b"last")
    server.end_stream(stream_id)
    assert frames_of(server) == [(FrameType.DATA, stream_id, b"last"),
                                 (FrameType.FIN, stream_id, b"")]
    # Rebuild the same state and deliver it.
    server, agent = pair()
    stream_id = established(server, agent)
    server.send_data(stream_id, b"last")
    server.end_stream(stream_id)
    assert server.send_window(stream_id) == 0
    assert pump(server, agent) == [DataReceived(stream_id, b"last"), StreamEnded(stream_id)]
    assert server.is_open(stream_id) and agent.is_open(stream_id)
    agent.send_data(stream_id, b"reply")     # half-closed: the other way still flows
    agent.end_stream(stream_id)
    assert pump(agent, server) == [DataReceived(stream_id, b"reply"), StreamEnded(stream_id),
                                   StreamClosed(stream_id)]
    assert not agent.is_open(stream_id) and not server.is_open(stream_id)
    assert server.open_streams == 0 and agent.open_streams == 0


def test_fin_from_the_agent_first():
    server, agent = pair()
    stream_id = established(server, agent)
    agent.end_stream(stream_id)
    assert pump(agent, server) == [StreamEnded(stream_id)]
    server.end_stream(stream_id)
    assert pump(server, agent) == [StreamEnded(stream_id), StreamClosed(stream_id)]
    assert server.open_streams == 0 and agent.open_streams == 0


def test_reset_round_trip_drops_queued_data():
    server, agent = pair()
    stream_id = established(server, agent)
    server.send_data(stream_id, b"never sent")
    server.reset_stream(stream_id, ResetCode.CANCEL, "user went away")
    assert not server.is_open(stream_id)
    assert frames_of(server) == [(FrameType.RESET, stream_id,
                                  struct.pack("!H", 1) + b"user went away")]


def test_reset_received():
    server, agent = pair()
    stream_id = established(server, agent)
    agent.reset_stream(stream_id, ResetCode.REFUSED, "connection refused")
    assert pump(agent, server) == [StreamReset(stream_id, ResetCode.REFUSED,
                                               "connection refused"),
                                   StreamClosed(stream_id)]
    assert server.open_streams == 0


def test_reset_of_a_pending_open():
    server, agent = pair()
    stream_id = server.open_stream(META)
    pump(server, agent)
    agent.reset_stream(stream_id, ResetCode.TIMEOUT)
    assert pump(agent, server) == [StreamReset(stream_id, ResetCode.TIMEOUT, ""),
                                   StreamClosed(stream_id)]
    assert server.pending_opens == 0 and agent.pending_opens == 0


def test_reset_reason_is_cut_at_a_character_boundary():
    server, agent = pair()
    stream_id = established(server, agent)
    server.reset_stream(stream_id, ResetCode.INTERNAL, "é" * 100)   # 200 bytes
    (frame,) = frames_of(server)
    assert frame[2] == struct.pack("!H", 6) + ("é" * 61).encode()  # 122 bytes


def test_ping_is_answered_with_pong():
    server, agent = pair()
    server.ping(b"\x00\x01\x02\x03\x04\x05\x06\x07")
    assert frames_of(server) == [(FrameType.PING, 0, b"\x00\x01\x02\x03\x04\x05\x06\x07")]
    server.ping(b"12345678")
    assert pump(server, agent) == []
    assert frames_of(agent) == [(FrameType.PONG, 0, b"12345678")]
    server.ping(b"abcdefgh")
    pump(server, agent)
    assert pump(agent, server) == [PongReceived(b"abcdefgh")]
    with pytest.raises(ValueError):
        server.ping(b"short")


def test_only_the_latest_ping_is_answered_while_pongs_wait():
    agent = Connection("agent")
    message = b"".join(encode_frame(FrameType.PING, 0, b"%08d" % i) for i in range(1000))
    assert agent.receive_message(message) == []
    assert agent.receive_message(message) == []
    assert frames_of(agent) == [(FrameType.PONG, 0, b"00000999")]
    assert not agent.has_data_to_send()


def test_goaway_from_the_agent_stops_new_streams():
    server, agent = pair()
    stream_id = established(server, agent)
    agent.go_away(ResetCode.GOING_AWAY, "restarting")
    assert frames_of(agent) == [(FrameType.GOAWAY, 0, struct.pack("!H", 7) + b"restarting")]
    agent.go_away(ResetCode.GOING_AWAY, "restarting")
    assert pump(agent, server) == [GoAwayReceived(7, "restarting")]
    with pytest.raises(StreamLimitError) as info:
        server.open_stream(META)
    assert info.value.code == ResetCode.GOING_AWAY
    # Existing streams carry on.
    server.send_data(stream_id, b"still here")
    assert pump(server, agent) == [DataReceived(stream_id, b"still here")]


def test_an_agent_going_away_resets_opens_that_cross_its_goaway():
    agent = Connection("agent")
    agent.go_away(ResetCode.GOING_AWAY)
    agent.data_to_send()
    assert agent.receive_message(encode_frame(FrameType.OPEN, 1, b"{}")) == []
    assert frames_of(agent) == [(FrameType.RESET, 1, struct.pack("!H", 7) + b"going away")]


def test_server_going_away_refuses_opens_locally():
    server = Connection("server")
    server.go_away(ResetCode.GOING_AWAY, "shutting down")
    with pytest.raises(StreamLimitError):
        server.open_stream(META)


# -- ordering and fairness --------------------------------------------------------

def test_control_frames_come_before_data():
    server, agent = pair()
    stream_id = established(server, agent)
    server.send_data(stream_id, b"d" * 100000)
    server.ping(b"pingpong")
    frames = frames_of(server)
    assert frames[0] == (FrameType.PING, 0, b"pingpong")
    assert [f[0] for f in frames[1:]] == [FrameType.DATA] * 7


def test_round_robin_across_streams():
    server, agent = pair()
    first = established(server, agent)
    second = established(server, agent)
    server.send_data(first, b"a" * 3 * MAX_DATA)
    server.send_data(second, b"b" * 3 * MAX_DATA)
    assert [f[1] for f in frames_of(server)] == [first, second] * 3


def test_messages_respect_max_message():
    server, agent = pair(max_message=2000)
    stream_id = established(server, agent)
    server.send_data(stream_id, b"q" * 10000)
    server.ping(b"01234567")
    messages = server.data_to_send()
    assert all(len(m) <= 2000 for m in messages)
    frames = [f for m in messages for f in parse_frames(m)]
    assert frames[0][0] == FrameType.PING
    assert [len(f[2]) for f in frames[1:]] == [1993] * 5 + [35]
    with pytest.raises(ValueError):
        Connection("server", max_message=100)


def test_default_messages_hold_four_full_data_frames():
    server, agent = pair()
    stream_id = established(server, agent)
    server.send_data(stream_id, b"m" * 8 * MAX_DATA)
    messages = server.data_to_send()
    assert [len(m) for m in messages] == [4 * (MAX_DATA + 7)] * 2


def test_max_bytes_leaves_the_rest_queued_behind_later_control_frames():
    server, agent = pair()
    stream_id = established(server, agent)
    server.send_data(stream_id, b"r" * DEFAULT_WINDOW)
    first = server.data_to_send(max_bytes=65536)
    assert [len(m) for m in first] == [65564]
    assert server.has_data_to_send()
    server.ping(b"pingping")
    second = server.data_to_send()
    assert parse_frames(second[0])[0] == (FrameType.PING, 0, b"pingping")
    assert sum(len(f[2]) for m in first + second for f in parse_frames(m)) == \
        DEFAULT_WINDOW + 8
    assert not server.has_data_to_send()


def test_data_waits_for_open_ok():
    server, agent = pair()
    stream_id = server.open_stream(META)
    assert server.send_data(stream_id, b"early bytes") == 11
    server.end_stream(stream_id)
    assert frames_of(server) == [(FrameType.OPEN, stream_id, json.dumps(
        META, separators=(",", ":")).encode())]
    assert not server.has_data_to_send()
    agent.receive_message(encode_frame(FrameType.OPEN, stream_id, b"{}"))
    agent.accept_stream(stream_id)
    assert pump(agent, server) == [StreamAccepted(stream_id)]
    assert pump(server, agent) == [DataReceived(stream_id, b"early bytes"),
                                   StreamEnded(stream_id)]


# -- credit -----------------------------------------------------------------------

def test_a_sender_cannot_exceed_the_window():
    server, agent = pair()
    stream_id = established(server, agent)
    assert server.send_window(stream_id) == DEFAULT_WINDOW
    assert server.send_data(stream_id, b"w" * (DEFAULT_WINDOW + 5000)) == DEFAULT_WINDOW
    assert server.send_window(stream_id) == 0
    assert server.send_data(stream_id, b"more") == 0
    got = data_events(pump(server, agent))
    assert len(got[stream_id]) == DEFAULT_WINDOW
    assert server.send_data(stream_id, b"more") == 0


def test_consumed_batches_credit_at_a_quarter_window():
    server, agent = pair()
    stream_id = established(server, agent)
    server.send_data(stream_id, b"c" * DEFAULT_WINDOW)
    pump(server, agent)
    agent.consumed(stream_id, 65535)
    assert not agent.has_data_to_send()
    agent.consumed(stream_id, 1)
    assert frames_of(agent) == [(FrameType.CREDIT, stream_id, struct.pack("!I", 65536))]
    agent.consumed(stream_id, 100000)
    assert frames_of(agent) == [(FrameType.CREDIT, stream_id, struct.pack("!I", 100000))]
    agent.consumed(stream_id, 10)
    assert not agent.has_data_to_send()


def test_credit_reopens_the_send_window():
    server, agent = pair()
    stream_id = established(server, agent)
    server.send_data(stream_id, b"c" * DEFAULT_WINDOW)
    pump(server, agent)
    agent.consumed(stream_id, 70000)
    assert pump(agent, server) == [SendWindowOpened(stream_id, 70000)]
    assert server.send_window(stream_id) == 70000
    assert server.send_data(stream_id, b"c" * 80000) == 70000


def test_consuming_more_than_received_is_an_application_error():
    server, agent = pair()
    stream_id = established(server, agent)
    server.send_data(stream_id, b"abc")
    pump(server, agent)
    with pytest.raises(ValueError):
        agent.consumed(stream_id, 4)


def test_a_stalled_stream_does_not_block_another():
    server, agent = pair()
    stalled = established(server, agent)
    bulk = established(server, agent)
    server.send_data(stalled, b"s" * DEFAULT_WINDOW)
    server.send_data(bulk, b"b" * 1000)
    got = data_events(pump(server, agent))
    assert len(got[stalled]) == DEFAULT_WINDOW and len(got[bulk]) == 1000
    # The stalled user never reads: its window stays shut, the bulk one flows.
    total = 1000
    agent.consumed(bulk, 1000)
    for _ in range(20):
        assert server.send_data(stalled, b"s") == 0
        taken = server.send_data(bulk, b"b" * 100000)
        assert taken > 0
        got = data_events(pump(server, agent))
        assert set(got) == {bulk}
        total += len(got[bulk])
        agent.consumed(bulk, len(got[bulk]))
        pump(agent, server)
    assert total == 1000 + 20 * 100000     # every byte offered was taken and delivered


# -- limits -----------------------------------------------------------------------

def test_a_thousand_opens_against_max_streams():
    server, agent = pair()
    opened, refused = [], []
    for _ in range(1000):
        try:
            opened.append(server.open_stream(META))
        except StreamLimitError as error:
            assert error.code == ResetCode.LIMIT
            refused.append(error)
        for event in pump(server, agent):
            agent.accept_stream(event.stream_id)
        pump(agent, server)
    assert len(opened) == 256 and len(refused) == 744
    assert server.open_streams == 256 and agent.open_streams == 256
    # Closing one makes room for one more.
    server.reset_stream(opened[0], ResetCode.CANCEL)
    pump(server, agent)
    assert server.open_stream(META) > opened[-1]


def test_a_thousand_unanswered_opens_against_max_pending_opens():
    server = Connection("server")
    opened = 0
    for _ in range(1000):
        try:
            server.open_stream(META)
            opened += 1
        except StreamLimitError as error:
            assert error.code == ResetCode.LIMIT
    assert opened == 64 and server.pending_opens == 64


def test_agent_answers_reset_limit_past_max_streams():
    agent = Connection("agent", max_streams=3)
    for stream_id in (1, 3, 5):
        assert agent.receive_message(encode_frame(FrameType.OPEN, stream_id, b"{}")) == [
            StreamOpened(stream_id, {})]
        agent.accept_stream(stream_id)
    agent.data_to_send()
    assert agent.receive_message(encode_frame(FrameType.OPEN, 7, b"{}")) == []
    (frame,) = frames_of(agent)
    assert frame[:2] == (FrameType.RESET, 7)
    assert struct.unpack("!H", frame[2][:2])[0] == ResetCode.LIMIT
    assert agent.open_streams == 3
    # Frames crossing that RESET are ignored; the next open is judged afresh.
    assert agent.receive_message(encode_frame(FrameType.FIN, 7)) == []


def test_agent_answers_reset_limit_past_max_pending_opens():
    agent = Connection("agent")
    message = b"".join(encode_frame(FrameType.OPEN, 2 * i + 1, b"{}") for i in range(65))
    events = agent.receive_message(message)
    assert len(events) == 64 and agent.pending_opens == 64
    (frame,) = frames_of(agent)
    assert frame[:2] == (FrameType.RESET, 129)
    assert struct.unpack("!H", frame[2][:2])[0] == ResetCode.LIMIT


def test_the_server_sees_the_agents_limit_reset():
    server = Connection("server", max_streams=10)
    agent = Connection("agent", max_streams=2)
    ids = [server.open_stream(META) for _ in range(3)]
    events = pump(server, agent)
    assert [e.stream_id for e in events] == ids[:2]
    events = pump(agent, server)
    assert events[0] == StreamReset(ids[2], ResetCode.LIMIT, "agent stream limit (2) reached")
    assert events[1] == StreamClosed(ids[2])
    assert server.open_streams == 2


# -- protocol violations ------------------------------------------------------------

def F(frame_type, stream_id, payload=b""):
    return encode_frame(frame_type, stream_id, payload)


def open_agent(accept=True):
    """An agent with stream 1 open (accepted or not) and stream 3 opened then reset."""
    agent = Connection("agent")
    agent.receive_message(F(1, 1, b"{}") + F(1, 3, b"{}"))
    if accept:
        agent.accept_stream(1)
    agent.reset_stream(3, ResetCode.CANCEL)
    agent.data_to_send()
    return agent


def open_server(accept=True):
    """A server with stream 1 open (accepted by the agent or not) and stream 3 reset."""
    server = Connection("server")
    server.open_stream({})
    server.open_stream({})
    if accept:
        server.receive_message(F(2, 1))
    server.reset_stream(3, ResetCode.CANCEL)
    server.data_to_send()
    return server


def fin_agent():
    agent = open_agent()
    agent.receive_message(F(5, 1))
    return agent


def data_full_agent():
    agent = open_agent()
    for _ in range(DEFAULT_WINDOW // MAX_DATA):
        agent.receive_message(F(3, 1, b"x" * MAX_DATA))
    return agent


def credit_full_server():
    server = open_server()
    server.receive_message(F(4, 1, struct.pack("!I", 2 ** 31 - 1 - DEFAULT_WINDOW)))
    return server


VIOLATIONS = [
    # (name, connection factory, message, words the reason contains)
    ("empty message", open_agent, b"", "empty message"),
    ("truncated header", open_agent, b"\x03\x00\x00", "truncated frame header"),
    ("truncated after a frame", open_agent, F(7, 0, b"12345678") + b"\x07", "truncated"),
    ("frame past its message", open_agent, F(3, 1, b"abc")[:-1], "runs past the end"),
    ("unknown type 0", open_agent, F(0, 1), "unknown frame type 0"),
    ("unknown type 10", open_agent, F(10, 1), "unknown frame type 10"),
    ("unknown type 255", open_server, F(255, 0, b"x"), "unknown frame type 255"),
    ("OPEN from the agent", open_server, F(1, 5, b"{}"), "OPEN from the agent"),
    ("OPEN with an even id", open_agent, F(1, 6, b"{}"), "even stream id"),
    ("OPEN id not above the last", open_agent, F(1, 3, b"{}"), "not above the last id"),
    ("OPEN id reused", open_agent, F(1, 1, b"{}"), "not above the last id"),
    ("OPEN over 1024 bytes", open_agent,
     F(1, 5, json.dumps({"peer": "x" * 1020}).encode()), "limit 1024"),
    ("OPEN not JSON", open_agent, F(1, 5, b"{nope"), "not UTF-8 JSON"),
    ("OPEN not UTF-8", open_agent, F(1, 5, b'{"a": "\xff"}'), "not UTF-8 JSON"),
    ("OPEN not an object", open_agent, F(1, 5, b"[1, 2]"), "not a JSON object"),
    ("OPEN_OK to the agent", open_agent, F(2, 1), "OPEN_OK from the server"),
    ("OPEN_OK with a payload", open_server, F(2, 1, b"x"), "payload"),
    ("second OPEN_OK", open_server, F(2, 1), "second OPEN_OK"),
    ("OPEN_OK never opened", open_server, F(2, 5), "never opened"),
    ("DATA never opened", open_agent, F(3, 5, b"x"), "never opened"),
    ("DATA on stream 0", open_agent, F(3, 0, b"x"), "on stream 0"),
    ("DATA empty", open_agent, F(3, 1), "empty DATA"),
    ("DATA over MAX_DATA", open_agent, F(3, 1, b"x" * (MAX_DATA + 1)), "limit 16384"),
    ("DATA over the window", data_full_agent, F(3, 1, b"x"), "over the receive window"),
    ("DATA after FIN", fin_agent, F(3, 1, b"x"), "DATA after FIN"),
    ("DATA before OPEN_OK (agent)", lambda: open_agent(False), F(3, 1, b"x"),
     "before OPEN_OK"),
    ("DATA before OPEN_OK (server)", lambda: open_server(False), F(3, 1, b"x"),
     "before OPEN_OK"),
    ("CREDIT never opened", open_agent, F(4, 9, struct.pack("!I", 1)), "never opened"),
    ("CREDIT of 3 bytes", open_agent, F(4, 1, b"\x00\x00\x01"), "must be 4"),
    ("CREDIT of 5 bytes", open_agent, F(4, 1, b"\x00\x00\x00\x01\x00"), "must be 4"),
    ("CREDIT of 0", open_agent, F(4, 1, struct.pack("!I", 0)), "CREDIT of 0"),
    ("CREDIT overflow", credit_full_server, F(4, 1, struct.pack("!I", 1)), "overflows"),
    ("CREDIT overflow at once", open_server, F(4, 1, struct.pack("!I", 2 ** 32 - 1)),
     "overflows"),
    ("FIN never opened", open_agent, F(5, 99), "never opened"),
    ("FIN with a payload", open_agent, F(5, 1, b"x"), "payload"),
    ("second FIN", fin_agent, F(5, 1), "second FIN"),
    ("FIN before OPEN_OK", lambda: open_server(False), F(5, 1), "before OPEN_OK"),
    ("RESET never opened", open_server, F(6, 7, b"\x00\x01"), "never opened"),
    ("RESET without a code", open_agent, F(6, 1, b"\x00"), "needs a code"),
    ("RESET unknown code", open_agent, F(6, 1, b"\x00\x08"), "unknown RESET code 8"),
    ("RESET code 0", open_agent, F(6, 1, b"\x00\x00"), "unknown RESET code 0"),
    ("RESET long reason", open_agent, F(6, 1, b"\x00\x01" + b"r" * 124), "over 123"),
    ("RESET reason not UTF-8", open_agent, F(6, 1, b"\x00\x01\xc3"), "not valid UTF-8"),
    ("PING on a stream", open_agent, F(7, 1, b"12345678"), "must be 0"),
    ("PING of 7 bytes", open_agent, F(7, 0, b"1234567"), "must be 8"),
    ("PONG of 9 bytes", open_server, F(8, 0, b"123456789"), "must be 8"),
    ("PONG on a stream", open_server, F(8, 3, b"12345678"), "must be 0"),
    ("GOAWAY on a stream", open_server, F(9, 1, b"\x00\x07"), "must be 0"),
    ("GOAWAY without a code", open_server, F(9, 0, b"\x07"), "needs a code"),
    ("GOAWAY reason not UTF-8", open_server, F(9, 0, b"\x00\x07\xff"), "not valid UTF-8"),
    ("a violation after valid frames", open_agent,
     F(3, 1, b"ok") + F(7, 0, b"12345678") + F(11, 0), "unknown frame type 11"),
]


@pytest.mark.parametrize("factory,message,words", [v[1:] for v in VIOLATIONS],
                         ids=[v[0] for v in VIOLATIONS])
def test_protocol_violation(factory, message, words):
    conn = factory()
    with pytest.raises(MuxProtocolError) as info:
        conn.receive_message(message)
    assert words in info.value.reason
    assert info.value.close_code == 1002
    assert isinstance(info.value, ProtocolError)


@pytest.mark.parametrize("message", [
    F(3, 3, b"late data"), F(4, 3, struct.pack("!I", 10)), F(5, 3), F(6, 3, b"\x00\x01"),
    F(3, 2, b"even id below the last"),
], ids=["DATA", "CREDIT", "FIN", "RESET", "even id"])
def test_frames_for_a_recently_closed_stream_are_ignored(message):
    assert open_agent().receive_message(message) == []


def test_open_ok_for_a_stream_the_server_reset_is_ignored():
    assert open_server().receive_message(F(2, 3)) == []


def test_memoryview_and_bytearray_messages():
    agent = open_agent()
    assert agent.receive_message(bytearray(F(3, 1, b"ab"))) == [DataReceived(1, b"ab")]
    assert agent.receive_message(memoryview(F(3, 1, b"cd"))) == [DataReceived(1, b"cd")]


def test_application_misuse_raises_value_error():
    server, agent = pair()
    with pytest.raises(ValueError):
        agent.open_stream(META)
    with pytest.raises(ValueError):
        server.accept_stream(1)
    with pytest.raises(ValueError):
        server.send_data(1, b"x")
    with pytest.raises(ValueError):
        Connection("client")
    with pytest.raises(ValueError):
        server.open_stream({"peer": "x" * 2000})
    stream_id = established(server, agent)
    server.end_stream(stream_id)
    with pytest.raises(ValueError):
        server.send_data(stream_id, b"x")
    # Cleanup calls on closed streams are no-ops.
    server.reset_stream(99, ResetCode.CANCEL)
    server.end_stream(99)
    server.consumed(99, 10)


# -- liveness -----------------------------------------------------------------------

def test_liveness_pings_after_silence_and_declares_death():
    live = Liveness(ping_interval=15.0, dead_after=45.0, now=100.0)
    assert live.next_deadline(100.0) == 115.0
    assert live.poll(114.999) is None
    assert live.poll(115.0) == "ping"
    assert live.poll(115.0) is None
    assert live.next_deadline(116.0) == 130.0
    assert live.poll(129.9) is None
    assert live.poll(130.0) == "ping"
    assert live.next_deadline(130.0) == 145.0
    assert live.poll(144.9) is None
    assert live.poll(145.0) == "dead"
    assert live.poll(200.0) == "dead"


def test_liveness_heard_resets_the_timers():
    live = Liveness(ping_interval=2.0, dead_after=5.0, now=0.0)
    assert live.poll(2.0) == "ping"
    live.heard(3.5)
    assert live.next_deadline(3.5) == 5.5
    assert live.poll(5.4) is None
    assert live.poll(5.5) == "ping"
    assert live.next_deadline(6.0) == 7.5
    assert live.poll(7.5) == "ping"
    assert live.next_deadline(7.5) == 8.5     # death comes before the next ping
    assert live.poll(8.4) is None
    assert live.poll(8.5) == "dead"
    live.heard(9.0)
    assert live.poll(9.0) is None


def test_liveness_deadline_is_never_in_the_past():
    live = Liveness(ping_interval=1.0, dead_after=3.0, now=0.0)
    assert live.next_deadline(10.0) == 10.0
    with pytest.raises(ValueError):
        Liveness(ping_interval=0)


# -- fuzzing ------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

frame_st = st.builds(
    lambda t, s, p: encode_frame(t, s, p),
    st.sampled_from(list(range(0, 12)) + [255]),
    st.sampled_from([0, 1, 2, 3, 5, 7, 2 ** 32 - 1]),
    st.one_of(st.binary(max_size=12), st.sampled_from(
        [b"{}", struct.pack("!I", 1), struct.pack("!I", 2 ** 31), b"\x00\x01", b"\x00\x07bye",
         b"12345678", b"x" * MAX_DATA, b'{"face": "tcp"}'])))


@FUZZ
@given(role=st.sampled_from(["server", "agent"]),
       messages=st.lists(st.one_of(st.binary(max_size=64),
                                   st.lists(frame_st, min_size=1, max_size=5).map(b"".join)),
                         max_size=8))
def test_random_messages_raise_only_mux_protocol_errors(role, messages):
    conn = open_server() if role == "server" else open_agent()
    for message in messages:
        try:
            events = conn.receive_message(message)
        except MuxProtocolError as error:
            assert error.close_code == 1002 and error.reason
            return
        for event in events:     # the application answers the opens
            if isinstance(event, StreamOpened):
                conn.accept_stream(event.stream_id)
        for out in conn.data_to_send():
            assert len(out) <= conn.max_message
            parse_frames(out)


class Side:
    """One end and what its application has sent and received, per stream."""

    def __init__(self, conn):
        self.conn = conn
        self.sent = {}          # stream -> bytes taken by send_data
        self.received = {}      # stream -> bytes from DataReceived
        self.unconsumed = {}    # stream -> bytes received, not yet consumed
        self.inbox = []         # messages from the peer, not yet delivered
        self.ended = set()      # streams we ended
        self.peer_ended = set()
        self.closed = set()

    def handle(self, events):
        for event in events:
            if isinstance(event, DataReceived):
                sid = event.stream_id
                self.received[sid] = self.received.get(sid, b"") + event.data
                self.unconsumed[sid] = self.unconsumed.get(sid, 0) + len(event.data)
            elif isinstance(event, StreamEnded):
                self.peer_ended.add(event.stream_id)
            elif isinstance(event, StreamClosed):
                self.closed.add(event.stream_id)
            elif isinstance(event, StreamOpened):
                self.conn.accept_stream(event.stream_id)
            assert not isinstance(event, StreamReset), event


@FUZZ
@given(data=st.data())
def test_random_interleavings_deliver_every_byte_in_order(data):
    window = data.draw(st.sampled_from([1024, 4096, DEFAULT_WINDOW]), label="window")
    # Windows that may grow (a budget of a window or two) and ones that may not.
    growth = data.draw(st.sampled_from([{}, {"max_window": 4 * window, "growth_budget": window},
                                        {"max_window": 8 * window,
                                         "growth_budget": 2 * window}]), label="growth")
    server = Side(Connection("server", window=window, max_streams=4, max_pending_opens=2,
                             **growth))
    agent = Side(Connection("agent", window=window, max_streams=4, max_pending_opens=2,
                            **growth))
    sides = {"server": server, "agent": agent}
    peer = {"server": agent, "agent": server}
    counter = [0]

    def payload(n):
        counter[0] += 1
        return bytes((counter[0] + i) & 0xFF for i in range(n))

    def flush(side, max_bytes=None):
        peer[side].inbox += sides[side].conn.data_to_send(max_bytes=max_bytes)

    def deliver(side):
        me = sides[side]
        if me.inbox:
            me.handle(me.conn.receive_message(me.inbox.pop(0)))

    for _ in range(data.draw(st.integers(0, 60), label="steps")):
        op = data.draw(st.sampled_from(["open", "send", "send", "consume", "flush", "flush",
                                        "deliver", "deliver", "deliver", "end"]))
        who = data.draw(st.sampled_from(["server", "agent"]))
        me = sides[who]
        ids = sorted(sid for sid in range(1, 256, 2) if me.conn.is_open(sid))
        if op == "open":
            try:
                server.conn.open_stream({"n": counter[0]})
            except StreamLimitError:
                pass
        elif op == "send" and ids:
            sid = data.draw(st.sampled_from(ids))
            if sid not in me.ended:
                chunk = payload(data.draw(st.integers(1, 3 * MAX_DATA)))
                taken = me.conn.send_data(sid, chunk)
                assert taken == min(len(chunk), me.conn.send_window(sid) + taken)
                me.sent[sid] = me.sent.get(sid, b"") + chunk[:taken]
        elif op == "consume":
            pending = [sid for sid, n in me.unconsumed.items() if n]
            if pending:
                sid = data.draw(st.sampled_from(pending))
                n = data.draw(st.integers(1, me.unconsumed[sid]))
                me.unconsumed[sid] -= n
                me.conn.consumed(sid, n)
                assert 0 <= me.conn.grown <= me.conn.growth_budget
        elif op == "flush":
            flush(who, data.draw(st.sampled_from([None, 1, 30000])))
        elif op == "deliver":
            deliver(who)
        elif op == "end" and ids:
            sid = data.draw(st.sampled_from(ids))
            me.ended.add(sid)
            me.conn.end_stream(sid)

    # Drain: consume everything, flush and deliver until both ends are quiet.
    for _ in range(10000):
        for name, me in sides.items():
            for sid, n in me.unconsumed.items():
                if n:
                    me.conn.consumed(sid, n)
                    me.unconsumed[sid] = 0
            flush(name)
        if not server.inbox and not agent.inbox:
            break
        deliver("server")
        deliver("agent")
    else:
        raise AssertionError("no quiescence")
    for me, other in ((server, agent), (agent, server)):
        for sid, sent in me.sent.items():
            assert other.received.get(sid, b"") == sent, sid
        for sid in me.ended:
            assert sid in other.peer_ended
        assert set(other.received) <= set(me.sent)
    for me, other in ((server, agent), (agent, server)):
        for sid in me.ended & other.ended:
            assert not me.conn.is_open(sid)


# -- announced windows (X-Websockify-Window) ---------------------------------------------------

@pytest.mark.parametrize("text, window", [
    ("1048576", 1048576), (" 65536 ", 65536), (str(16 * 1048576), 16 * 1048576),
    ("65535", None), (str(16 * 1048576 + 1), None), ("1e6", None), ("-1048576", None),
    ("\u00b9\u00b2", None), ("", None), (None, None), ("9" * 40, None),
])
def test_parse_window(text, window):
    assert mux.parse_window(text) == window


def test_each_side_sends_up_to_the_others_window_and_receives_up_to_its_own():
    server = Connection("server", window=1048576, peer_window=4 * 65536)
    agent = Connection("agent", window=4 * 65536, peer_window=1048576)
    stream_id = established(server, agent)
    assert server.send_window(stream_id) == 4 * 65536
    assert agent.send_window(stream_id) == 1048576
    # The agent may send its whole credit: the server's receive window holds it.
    assert agent.send_data(stream_id, b"x" * 2000000) == 1048576
    received = data_events(pump(agent, server))
    assert len(received[stream_id]) == 1048576
    assert server.send_data(stream_id, b"y" * 300000) == 4 * 65536
    # Past the agent's own (smaller) receive window is the server's error, as before.
    sixteen = b"".join(encode_frame(FrameType.DATA, stream_id, b"z" * 16384)
                       for _ in range(16))
    agent.receive_message(sixteen)
    with pytest.raises(MuxProtocolError):
        agent.receive_message(encode_frame(FrameType.DATA, stream_id, b"z"))


# -- announced message sizes (X-Websockify-Max-Message) ----------------------------------------

@pytest.mark.parametrize("text, size", [
    ("262256", 262256), (" 65564 ", 65564), ("1048576", 1048576),
    (str(1048576 + 64 * 7), 1048576 + 64 * 7),
    ("65563", None), (str(1048576 + 64 * 7 + 1), None), ("2.5e5", None), ("-262256", None),
    ("\u00b9\u00b2", None), ("", None), (None, None), ("9" * 40, None),
])
def test_parse_max_message(text, size):
    assert mux.parse_max_message(text) == size


def test_the_protocol_sizes():
    assert mux.DEFAULT_MESSAGE == 65564 == 4 * (MAX_DATA + 7)
    assert mux.LARGE_MESSAGE == 262256 == 16 * (MAX_DATA + 7)


def test_tunnel_connection_packs_up_to_the_peers_announced_message():
    agent = mux.tunnel_connection("agent", mux.LARGE_WINDOW, mux.LARGE_MESSAGE)
    server = mux.tunnel_connection("server", mux.LARGE_WINDOW, None)
    assert (agent.max_message, server.max_message) == (262256, 65564)
    stream_id = established(server, agent)
    agent.send_data(stream_id, b"L" * (40 * MAX_DATA))
    messages = agent.data_to_send()
    # Sixteen full DATA frames a message, the rest in the last one.
    assert [len(m) for m in messages] == [262256, 262256, 8 * (MAX_DATA + 7)]
    assert all(len(f[2]) == MAX_DATA for m in messages for f in parse_frames(m))
    events = [e for m in messages for e in server.receive_message(m)]
    # Consecutive DATA of one stream in a message: one event per message.
    assert [len(e.data) for e in events] == [16 * MAX_DATA, 16 * MAX_DATA, 8 * MAX_DATA]
    # Without an announcement a side keeps the protocol's default.
    assert mux.tunnel_connection("agent", None).max_message == 65564


# -- growing windows (GROWN_WINDOW, GROWTH_BUDGET) -----------------------------------------

def _credits(conn, stream_id):
    """The CREDIT increments ``conn`` would send now for ``stream_id``."""
    return [struct.unpack("!I", payload)[0] for kind, sid, payload in frames_of(conn)
            if kind == FrameType.CREDIT and sid == stream_id]


def _send_and_consume(sender, receiver, stream_id, total, chunk=65536):
    """``total`` bytes from sender to receiver, each message consumed as it arrives
    (a consumer that keeps up); the CREDIT increments the receiver returned."""
    credits = []
    left = total
    while left:
        taken = sender.send_data(stream_id, b"d" * min(left, sender.send_window(stream_id)))
        assert taken, "the sender ran out of credit"
        left -= taken
        for message in sender.data_to_send():
            for event in receiver.receive_message(message):
                if isinstance(event, DataReceived):
                    receiver.consumed(stream_id, len(event.data))
        increments = _credits(receiver, stream_id)
        credits += increments
        for increment in increments:
            sender.receive_message(encode_frame(FrameType.CREDIT, stream_id,
                                                struct.pack("!I", increment)))
    return credits


def test_a_consumer_that_keeps_up_doubles_its_window_up_to_max_window():
    kib = 1024
    server, agent = pair(window=256 * kib, max_window=1024 * kib, growth_budget=4096 * kib)
    stream_id = established(server, agent)
    credits = _send_and_consume(agent, server, stream_id, 4096 * kib)
    # A quarter of the window each time; after a whole window kept up, the
    # fourth credit also carries the growth (256 KiB -> 512 KiB -> 1 MiB).
    assert credits[:4] == [64 * kib, 64 * kib, 64 * kib, 64 * kib + 256 * kib]
    assert credits[4:8] == [128 * kib, 128 * kib, 128 * kib, 128 * kib + 512 * kib]
    assert set(credits[8:]) == {256 * kib}
    assert server._streams[stream_id].window == 1024 * kib
    assert server.grown == 768 * kib
    assert agent.send_window(stream_id) == 1024 * kib
    # The agent's own receive window did not change: nothing came its way.
    assert agent._streams[stream_id].window == 256 * kib and agent.grown == 0


def test_without_max_window_nothing_grows():
    server, agent = pair(window=65536)
    stream_id = established(server, agent)
    credits = _send_and_consume(agent, server, stream_id, 1048576)
    # Every byte consumed comes back once, and never more.
    assert sum(credits) == 1048576 and max(credits) == 65536
    assert server._streams[stream_id].window == 65536
    assert server.max_window == 65536 and server.grown == 0


def test_a_consumer_behind_its_sender_does_not_grow():
    server, agent = pair(window=65536, max_window=1048576, growth_budget=1048576)
    stream_id = established(server, agent)
    for _ in range(64):
        # The whole window arrives before the consumer takes a quarter of it.
        agent.send_data(stream_id, b"s" * agent.send_window(stream_id))
        pump(agent, server)
        server.consumed(stream_id, 16384)
        increments = _credits(server, stream_id)
        assert increments == [16384]
        agent.receive_message(encode_frame(FrameType.CREDIT, stream_id,
                                           struct.pack("!I", 16384)))
        server.consumed(stream_id, 65536 - 16384)
        assert _credits(server, stream_id) == [65536 - 16384]
        agent.receive_message(encode_frame(FrameType.CREDIT, stream_id,
                                           struct.pack("!I", 65536 - 16384)))
    assert server._streams[stream_id].window == 65536 and server.grown == 0


def test_growth_stays_within_the_budget_and_a_closed_stream_gives_its_growth_back():
    server, agent = pair(window=65536, max_window=1048576, growth_budget=196608)
    first = established(server, agent)
    second = established(server, agent)
    _send_and_consume(agent, server, first, 4 * 1048576)
    # 64 -> 128 -> 256 KiB: 192 KiB of growth, the whole budget.
    assert server._streams[first].window == 262144 and server.grown == 196608
    _send_and_consume(agent, server, second, 1048576)
    assert server._streams[second].window == 65536
    server.reset_stream(first, ResetCode.CANCEL)
    assert server.grown == 0
    _send_and_consume(agent, server, second, 4 * 1048576)
    assert server._streams[second].window == 262144 and server.grown == 196608


def test_a_grown_window_is_enforced():
    server, agent = pair(window=65536, max_window=131072, growth_budget=65536)
    stream_id = established(server, agent)
    _send_and_consume(agent, server, stream_id, 1048576)
    assert server._streams[stream_id].window == 131072
    # The agent's whole credit (the grown window) is accepted; one byte more is not.
    assert agent.send_window(stream_id) == 131072
    agent.send_data(stream_id, b"w" * 131072)
    pump(agent, server)
    with pytest.raises(MuxProtocolError):
        server.receive_message(encode_frame(FrameType.DATA, stream_id, b"x"))


@pytest.mark.parametrize("kwargs", [
    {"window": 65536, "max_window": 32768},
    {"window": 65536, "max_window": mux.MAX_WINDOW + 1},
    {"window": 65536, "max_window": 131072, "growth_budget": -1},
])
def test_bad_growth_settings(kwargs):
    with pytest.raises(ValueError):
        Connection("server", **kwargs)


# -- DATA framed in place by the agent (protocol/inplace.py) ----------------------

def in_place_message(layout, stream_id, data):
    """The mux payloads of the messages a MessageLayout seals for ``data``."""
    from tests.unit.test_inplace import fill, parse
    fill(layout, data)
    views = layout.seal(stream_id, len(data), bytes(4 * layout.count(len(data))))
    messages, _, _ = parse(b"".join(bytes(v) for v in views))
    return messages


def test_credit_in_place_is_the_credit_of_an_accepted_stream_with_nothing_queued():
    server = Connection("server")
    agent = Connection("agent")
    stream_id = server.open_stream(META)
    pump(server, agent)
    assert agent.credit_in_place(stream_id) == 0        # not accepted yet
    agent.accept_stream(stream_id)
    assert agent.credit_in_place(stream_id) == DEFAULT_WINDOW
    agent.send_data(stream_id, b"queued")
    assert agent.credit_in_place(stream_id) == 0        # its bytes must go first
    pump(agent, server)
    assert agent.credit_in_place(stream_id) == DEFAULT_WINDOW - 6
    agent.end_stream(stream_id)
    assert agent.credit_in_place(stream_id) == 0        # ended
    assert agent.credit_in_place(99) == 0               # never opened


def test_data_sent_in_place_takes_credit_and_reaches_the_server():
    from websockify.protocol.inplace import MessageLayout
    server, agent = pair()
    stream_id = established(server, agent)
    layout = MessageLayout.for_connection(agent, 3 * MAX_DATA)
    data = bytes(range(256)) * 200                     # 51200 bytes: four frames
    agent.sent_in_place(stream_id, len(data))
    assert agent.credit_in_place(stream_id) == DEFAULT_WINDOW - len(data)
    assert agent.send_window(stream_id) == DEFAULT_WINDOW - len(data)
    assert agent.bytes_out == len(data)
    events = []
    for message in in_place_message(layout, stream_id, data):
        events += server.receive_message(message)
    assert data_events(events) == {stream_id: data}
    assert server.bytes_in == len(data)


def test_sent_in_place_past_the_credit_is_refused():
    server, agent = pair(window=65536)
    stream_id = established(server, agent)
    with pytest.raises(ValueError):
        agent.sent_in_place(stream_id, 65537)
    with pytest.raises(ValueError):
        agent.sent_in_place(stream_id, 0)
    agent.sent_in_place(stream_id, 65536)
    with pytest.raises(ValueError):
        agent.sent_in_place(stream_id, 1)              # no credit left
    assert agent.send_window(stream_id) == 0


# -- borrowed DATA (receive_message(borrow=True)) ----------------------------------

def test_borrowed_data_is_views_of_the_message_one_event_per_run():
    server, agent = pair()
    first = established(server, agent)
    second = established(server, agent)
    message = bytearray(F(3, first, b"a" * MAX_DATA) + F(3, first, b"bc")
                        + F(3, second, b"de") + F(7, 0, b"12345678")
                        + F(3, second, b"f"))
    events = agent.receive_message(message, borrow=True)
    # The PING between them ends the second stream's run.
    assert all(type(event) is mux.DataViewsReceived for event in events)
    runs = [(e.stream_id, [bytes(v) for v in e.views], e.size) for e in events]
    assert runs == [(first, [b"a" * MAX_DATA, b"bc"], MAX_DATA + 2),
                    (second, [b"de"], 2), (second, [b"f"], 1)]
    # Views of the message itself, not copies: a later write to it shows.
    view = events[0].views[1]
    assert view.obj is message
    message[HEADER.size + MAX_DATA + HEADER.size] = ord("X")
    assert bytes(view) == b"Xc"
    assert agent.bytes_in == MAX_DATA + 5


def test_borrowed_data_counts_against_the_window_as_joined_data_does():
    server, agent = pair(window=65536)
    stream_id = established(server, agent)
    full = F(3, stream_id, b"x" * MAX_DATA)
    events = agent.receive_message(full * 3 + F(3, stream_id, b"x" * 16383), borrow=True)
    assert [e.size for e in events] == [65535]
    with pytest.raises(ProtocolError, match="over the receive window"):
        agent.receive_message(F(3, stream_id, b"yz"), borrow=True)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from([0, 1]), st.integers(1, 3000)), min_size=1,
                max_size=30))
def test_borrowed_and_joined_data_are_the_same_bytes(pieces):
    """Any interleaving of two streams' DATA frames: the borrowed events, joined,
    are the joined events, in the same order, with the same sizes."""
    results = []
    for borrow in (False, True):
        server, agent = pair()
        ids = [established(server, agent), established(server, agent)]
        message = b"".join(F(3, ids[which], bytes([n % 251]) * n) for which, n in pieces)
        events = agent.receive_message(message, borrow=borrow)
        if borrow:
            assert all(e.size == sum(len(v) for v in e.views) for e in events)
            events = [DataReceived(e.stream_id, b"".join(e.views)) for e in events]
        results.append(events)
    assert results[0] == results[1]
