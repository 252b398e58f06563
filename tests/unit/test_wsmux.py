"""Unit tests of websocktunnel's framing (websockify.protocol.wsmux), with bytes alone.

The frames are written out byte by byte as websocktunnel's clients send
and expect them (type u8, stream id u32 little-endian, the payload to the
end of the message); ``GoLikeClient`` models wst-client's side (a 1024-byte
buffer per stream that must never overflow, an ACK of what it reads) for
the fuzzed round trips.
"""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from websockify.errors import ProtocolError
from websockify.protocol import mux
from websockify.protocol.mux import (DEFAULT_WINDOW, MuxProtocolError, ResetCode,
                                     SendWindowOpened, StreamAccepted, StreamClosed, StreamEnded,
                                     StreamLimitError, StreamReset)
from websockify.protocol.wsmux import (ACK, DAT, FIN, SYN, WsmuxConnection, encode_frame)

CLIENT_BUFFER = 1024        # wst-client's stream buffer (wsmux's DefaultCapacity)


def ack(stream_id: int, n: int) -> bytes:
    return bytes([2]) + struct.pack("<I", stream_id) + struct.pack("<I", n)


def accepted(conn, stream_id=2, buffer=CLIENT_BUFFER):
    """``conn`` with stream ``stream_id`` opened and accepted by the client; its output drained."""
    assert conn.open_stream({"face": "tcp"}) == stream_id
    assert conn.receive_message(ack(stream_id, buffer)) == [StreamAccepted(stream_id)]
    conn.data_to_send()
    return conn


# -- exact frames ---------------------------------------------------------------------

def test_frames_are_type_then_little_endian_id_then_payload():
    assert encode_frame(SYN, 2) == b"\x01\x02\x00\x00\x00"
    assert encode_frame(ACK, 0x01020304, struct.pack("<I", 1024)) == \
        b"\x02\x04\x03\x02\x01\x00\x04\x00\x00"
    assert encode_frame(DAT, 6, b"hi") == b"\x00\x06\x00\x00\x00hi"
    assert encode_frame(FIN, 258) == b"\x03\x02\x01\x00\x00"


def test_open_sends_a_syn_with_even_ids_from_two():
    conn = WsmuxConnection()
    assert conn.open_stream({"face": "tcp", "peer": "192.0.2.1:5"}) == 2
    assert conn.open_stream({}) == 4
    assert conn.data_to_send() == [b"\x01\x02\x00\x00\x00", b"\x01\x04\x00\x00\x00"]
    assert conn.pending_opens == 2 and conn.open_streams == 2
    assert not conn.has_data_to_send()


def test_the_clients_ack_accepts_and_our_window_is_granted_at_once():
    conn = WsmuxConnection()
    conn.open_stream({})
    conn.data_to_send()
    assert conn.receive_message(b"\x02\x02\x00\x00\x00\x00\x04\x00\x00") == [StreamAccepted(2)]
    assert conn.pending_opens == 0
    # The client assumes we buffer what it does (1024): the rest of our window follows.
    assert conn.data_to_send() == [b"\x02\x02\x00\x00\x00"
                                   + struct.pack("<I", DEFAULT_WINDOW - 1024)]
    assert conn.send_window(2) == 1024


def test_no_grant_when_the_clients_buffer_is_our_window():
    conn = accepted(WsmuxConnection(window=4096), buffer=4096)
    assert not conn.has_data_to_send()


def test_data_toward_the_client_never_exceeds_its_buffer():
    conn = accepted(WsmuxConnection())
    data = bytes(range(256)) * 12
    assert conn.send_data(2, data) == 1024
    assert conn.send_window(2) == 0
    assert conn.send_data(2, data) == 0
    assert conn.data_to_send() == [b"\x00\x02\x00\x00\x00" + data[:1024]]
    assert conn.receive_message(ack(2, 300)) == [SendWindowOpened(2, 300)]
    assert conn.send_data(2, data[1024:]) == 300
    assert conn.data_to_send() == [b"\x00\x02\x00\x00\x00" + data[1024:1324]]
    assert conn.bytes_out == 1324


def test_data_before_the_accept_waits_for_credit():
    conn = WsmuxConnection()
    conn.open_stream({})
    assert conn.send_window(2) == 0
    assert conn.send_data(2, b"early") == 0


def test_data_from_the_client_and_acks_batched_by_a_quarter_window():
    conn = accepted(WsmuxConnection(window=8192))
    conn.data_to_send()
    events = conn.receive_message(b"\x00\x02\x00\x00\x00" + b"a" * 2100)
    assert events == [mux.DataReceived(2, b"a" * 2100)]
    assert conn.bytes_in == 2100
    conn.consumed(2, 1000)
    assert not conn.has_data_to_send()
    conn.consumed(2, 1048)
    assert conn.data_to_send() == [ack(2, 2048)]


def test_empty_data_is_ignored():
    conn = accepted(WsmuxConnection())
    assert conn.receive_message(b"\x00\x02\x00\x00\x00") == []


def test_half_close_both_ways():
    conn = accepted(WsmuxConnection())
    conn.send_data(2, b"bye")
    conn.end_stream(2)
    assert conn.send_window(2) == 0
    assert conn.data_to_send() == [b"\x00\x02\x00\x00\x00bye", b"\x03\x02\x00\x00\x00"]
    assert conn.is_open(2)
    assert conn.receive_message(b"\x00\x02\x00\x00\x00last") == [mux.DataReceived(2, b"last")]
    assert conn.receive_message(b"\x03\x02\x00\x00\x00") == [StreamEnded(2), StreamClosed(2)]
    assert not conn.is_open(2) and conn.open_streams == 0


def test_the_clients_fin_first_then_ours_forgets_the_stream():
    conn = accepted(WsmuxConnection())
    assert conn.receive_message(b"\x03\x02\x00\x00\x00") == [StreamEnded(2)]
    conn.end_stream(2)
    assert conn.data_to_send() == [b"\x03\x02\x00\x00\x00"]
    assert conn.open_streams == 0


def test_reset_is_a_fin_and_what_follows_is_acknowledged_and_dropped():
    conn = accepted(WsmuxConnection())
    conn.send_data(2, b"never sent")
    conn.reset_stream(2, ResetCode.CANCEL, "user went away")
    assert conn.data_to_send() == [b"\x03\x02\x00\x00\x00"]
    assert not conn.is_open(2) and conn.open_streams == 1
    # The client's writer still had credit: its bytes are acknowledged at once.
    assert conn.receive_message(b"\x00\x02\x00\x00\x00" + b"z" * 700) == []
    assert conn.data_to_send() == [ack(2, 700)]
    assert conn.receive_message(ack(2, 64)) == []
    assert conn.receive_message(b"\x03\x02\x00\x00\x00") == []
    assert conn.open_streams == 0
    assert conn.bytes_in == 0


def test_reset_before_the_accept_sends_its_fin_after_the_ack():
    conn = WsmuxConnection()
    conn.open_stream({})
    conn.reset_stream(2, ResetCode.TIMEOUT, "no answer")
    # The client takes a SYN in a goroutine: a FIN right behind it could be lost.
    assert conn.data_to_send() == [b"\x01\x02\x00\x00\x00"]
    assert conn.pending_opens == 0
    assert conn.receive_message(ack(2, 1024)) == []
    assert conn.data_to_send() == [b"\x03\x02\x00\x00\x00"]
    assert conn.receive_message(b"\x03\x02\x00\x00\x00") == []
    assert conn.open_streams == 0


def test_fin_before_the_ack_is_a_refusal():
    conn = WsmuxConnection()
    conn.open_stream({})
    assert conn.receive_message(b"\x03\x02\x00\x00\x00") == [
        StreamReset(2, ResetCode.REFUSED, "the agent closed the stream before accepting it"),
        StreamClosed(2)]
    assert conn.open_streams == 0 and conn.pending_opens == 0


def test_frames_for_a_stream_closed_already_are_ignored():
    conn = accepted(WsmuxConnection())
    conn.end_stream(2)
    conn.data_to_send()
    conn.receive_message(b"\x03\x02\x00\x00\x00")
    for frame in (b"\x00\x02\x00\x00\x00late", ack(2, 5), b"\x03\x02\x00\x00\x00"):
        assert conn.receive_message(frame) == []


def test_control_frames_go_before_data():
    conn = accepted(WsmuxConnection(window=4096))
    conn.send_data(2, b"x" * 10)
    conn.receive_message(b"\x00\x02\x00\x00\x00" + b"y" * 1024)
    conn.consumed(2, 1024)
    conn.open_stream({})
    assert conn.data_to_send() == [ack(2, 1024), b"\x01\x04\x00\x00\x00",
                                   b"\x00\x02\x00\x00\x00" + b"x" * 10]


def test_data_to_send_stops_near_max_bytes():
    conn = WsmuxConnection(window=65536)
    for stream_id in (2, 4):
        accepted(conn, stream_id, buffer=65536)
    for stream_id in (2, 4):
        conn.send_data(stream_id, b"d" * 65536)
    first = conn.data_to_send(max_bytes=20000)
    assert [len(m) for m in first] == [5 + 16384, 5 + 16384]
    rest = conn.data_to_send()
    assert sum(len(m) - 5 for m in first + rest) == 2 * 65536


def test_limits_and_going_away():
    conn = WsmuxConnection(max_streams=3, max_pending_opens=2)
    conn.open_stream({})
    conn.open_stream({})
    with pytest.raises(StreamLimitError) as info:
        conn.open_stream({})
    assert info.value.code == ResetCode.LIMIT and "pending-open" in info.value.reason
    conn.receive_message(ack(2, 1024))
    conn.open_stream({})
    with pytest.raises(StreamLimitError, match="stream limit"):
        conn.open_stream({})
    other = WsmuxConnection()
    other.go_away(1001, "server restarting")
    assert not other.has_data_to_send()
    with pytest.raises(StreamLimitError) as info:
        other.open_stream({})
    assert info.value.code == ResetCode.GOING_AWAY


def test_pings_are_websocket_pings():
    conn = WsmuxConnection()
    assert conn.websocket_pings is True
    with pytest.raises(ValueError):
        conn.ping(b"12345678")


# -- violations: close 1002 -------------------------------------------------------------

@pytest.mark.parametrize("message,reason", [
    (b"\x00\x02\x00\x00", "wsmux frame of 4 bytes (the header is 5)"),
    (b"", "wsmux frame of 0 bytes (the header is 5)"),
    (b"\x04\x02\x00\x00\x00", "unknown wsmux frame type 4"),
    (b"\xff\x02\x00\x00\x00", "unknown wsmux frame type 255"),
    (b"\x01\x03\x00\x00\x00", "wsmux SYN from the agent (only the server opens streams)"),
    (b"\x02\x02\x00\x00\x00\x01\x00\x00", "wsmux ACK of 3 bytes (must be 4) on stream 2"),
    (b"\x02\x02\x00\x00\x00\x01\x00\x00\x00\x00", "wsmux ACK of 5 bytes (must be 4) on stream 2"),
    (b"\x03\x02\x00\x00\x00!", "wsmux FIN with a 1-byte payload on stream 2"),
    (b"\x00\x06\x00\x00\x00x", "wsmux DAT for stream 6, never opened"),
    (b"\x00\x03\x00\x00\x00x", "wsmux DAT for stream 3, never opened"),
    (b"\x00\x00\x00\x00\x00x", "wsmux DAT for stream 0, never opened"),
    (b"\x02\x08\x00\x00\x00\x00\x04\x00\x00", "wsmux ACK for stream 8, never opened"),
    (b"\x03\x09\x00\x00\x00", "wsmux FIN for stream 9, never opened"),
    (b"\x00\x04\x00\x00\x00x", "wsmux DAT before the stream's ACK on stream 4"),
    (b"\x02\x04\x00\x00\x00\x01\x00\x04\x00",
     "wsmux stream buffer of 262145 bytes (over 262144) on stream 4"),
    (b"\x00\x02\x00\x00\x00" + b"x" * (DEFAULT_WINDOW + 1),
     "wsmux DAT of 262145 bytes over the credit granted (262144) on stream 2"),
    (b"\x02\x02\x00\x00\x00\xff\xff\xff\x7f", "wsmux ACK overflows the credit of stream 2"),
])
def test_malformed_frames_are_protocol_errors(message, reason):
    conn = accepted(WsmuxConnection())
    conn.open_stream({})            # stream 4, not accepted
    with pytest.raises(MuxProtocolError) as info:
        conn.receive_message(message)
    assert str(info.value) == reason
    assert isinstance(info.value, ProtocolError) and info.value.close_code == 1002


def test_data_after_the_clients_fin_and_a_second_fin_are_errors():
    conn = accepted(WsmuxConnection())
    conn.receive_message(b"\x03\x02\x00\x00\x00")
    with pytest.raises(MuxProtocolError, match="DAT after FIN on stream 2"):
        conn.receive_message(b"\x00\x02\x00\x00\x00x")
    with pytest.raises(MuxProtocolError, match="second FIN on stream 2"):
        conn.receive_message(b"\x03\x02\x00\x00\x00")


def test_data_past_what_was_granted_so_far_is_an_error():
    conn = accepted(WsmuxConnection(window=4096))
    conn.receive_message(b"\x00\x02\x00\x00\x00" + b"a" * 4000)
    with pytest.raises(MuxProtocolError, match="DAT of 97 bytes over the credit granted "
                                               r"\(96\)"):
        conn.receive_message(b"\x00\x02\x00\x00\x00" + b"a" * 97)


# -- fuzzed -------------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(messages=st.lists(st.one_of(
    st.binary(max_size=40),
    st.builds(lambda t, i, p: bytes([t]) + struct.pack("<I", i) + p,
              st.integers(0, 5), st.sampled_from([0, 1, 2, 3, 4, 6, 2 ** 32 - 1]),
              st.binary(max_size=12))), max_size=20))
def test_any_bytes_are_events_or_a_protocol_error(messages):
    conn = accepted(WsmuxConnection(window=4096))
    conn.open_stream({})
    for message in messages:
        try:
            events = conn.receive_message(message)
        except MuxProtocolError as exc:
            assert exc.close_code == 1002
            return
        assert all(type(e) in (mux.DataReceived, SendWindowOpened, StreamAccepted, StreamEnded,
                               StreamReset, StreamClosed) for e in events)
        conn.data_to_send()


class GoLikeClient:
    """wst-client's side of a stream, as its wsmux code behaves: ACK(buffer) to
    accept, a buffer that a DAT past its room would break, an ACK of each read."""

    def __init__(self, buffer=CLIENT_BUFFER):
        self.buffer = buffer
        self.held = {}          # stream -> bytes buffered, unread
        self.received = {}      # stream -> bytes read
        self.credit = {}        # stream -> what it may still send us
        self.fin = set()
        self.out = []

    def deliver(self, message: bytes) -> None:
        frame_type, stream_id = struct.unpack_from("<BI", message)
        payload = message[5:]
        if frame_type == SYN:
            self.held[stream_id] = b""
            self.received[stream_id] = b""
            self.credit[stream_id] = self.buffer
            self.out.append(ack(stream_id, self.buffer))
        elif frame_type == DAT:
            held = self.held[stream_id] + payload
            assert len(held) <= self.buffer, "the client's buffer overflowed"
            self.held[stream_id] = held
        elif frame_type == ACK:
            self.credit[stream_id] += struct.unpack("<I", payload)[0]
        elif frame_type == FIN:
            self.fin.add(stream_id)

    def read(self, stream_id: int, n: int) -> None:
        held = self.held[stream_id]
        if held:
            taken, self.held[stream_id] = held[:n], held[n:]
            self.received[stream_id] += taken
            self.out.append(ack(stream_id, len(taken)))

    def write(self, stream_id: int, data: bytes) -> bytes:
        data = data[:self.credit[stream_id]]
        if data:
            self.credit[stream_id] -= len(data)
            self.out.append(b"\x00" + struct.pack("<I", stream_id) + data)
        return data


@FUZZ
@given(data=st.data())
def test_round_trips_with_a_go_like_client_keep_bytes_and_buffers_exact(data):
    window = data.draw(st.sampled_from([1024, 4096, 65536]))
    conn = WsmuxConnection(window=window)
    client = GoLikeClient()
    streams = [conn.open_stream({}) for _ in range(data.draw(st.integers(1, 3)))]
    sent = {s: b"" for s in streams}
    from_client = {s: b"" for s in streams}
    got = {s: b"" for s in streams}

    def pump():
        for message in conn.data_to_send():
            client.deliver(message)
        outgoing, client.out = client.out, []
        for message in outgoing:
            for event in conn.receive_message(message):
                if type(event) is mux.DataReceived:
                    got[event.stream_id] += event.data
                    conn.consumed(event.stream_id, len(event.data))

    pump()
    for _ in range(data.draw(st.integers(1, 40))):
        stream_id = data.draw(st.sampled_from(streams))
        action = data.draw(st.sampled_from(["send", "read", "write", "pump"]))
        if action == "send":
            chunk = data.draw(st.binary(min_size=1, max_size=3000))
            sent[stream_id] += chunk[:conn.send_data(stream_id, chunk)]
        elif action == "read":
            client.read(stream_id, data.draw(st.integers(1, 2048)))
        elif action == "write":
            from_client[stream_id] += client.write(
                stream_id, data.draw(st.binary(min_size=1, max_size=5000)))
        pump()
    # Drain: the client reads everything, and what it sent arrives.
    for _ in range(200):
        for stream_id in streams:
            client.read(stream_id, CLIENT_BUFFER)
        pump()
        if all(client.received[s] == sent[s] for s in streams):
            break
    for stream_id in streams:
        assert client.received[stream_id] == sent[stream_id]
        assert got[stream_id] == from_client[stream_id]
