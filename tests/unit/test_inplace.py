"""The agent's in-place messages (websockify/protocol/inplace.py), checked with bytes alone:
what ``seal`` returns is parsed back by the server's own FrameParser and mux."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from websockify.protocol import mux
from websockify.protocol.frames import FrameParser, client_header_length
from websockify.protocol.inplace import MessageLayout

DATA = int(mux.FrameType.DATA)


def fill(layout, data):
    """What recvmsg_into does: ``data`` spread over the views of a read of len(data)."""
    pos = 0
    for view in layout.views(len(data)):
        view[:] = data[pos:pos + len(view)]
        pos += len(view)
    assert pos == len(data)


def parse(wire):
    """(messages' payloads, their masking keys, their header lengths) of client frames,
    through the server's FrameParser; each frame is checked to be a final binary one."""
    messages, current = [], bytearray()
    parser = FrameParser(lambda chunk, opcode: current.extend(chunk), lambda *a: None,
                         on_message_end=lambda opcode: (messages.append(bytes(current)),
                                                        current.clear()))
    parser.feed(wire)
    keys, lengths, pos = [], [], 0
    for payload in messages:
        assert wire[pos] == 0x82 and wire[pos + 1] & 0x80       # FIN binary, masked
        code = wire[pos + 1] & 0x7F
        length = {126: 8, 127: 14}.get(code, 6)
        assert length == client_header_length(len(payload))           # the shortest form
        keys.append(wire[pos + length - 4:pos + length])
        lengths.append(length)
        pos += length + len(payload)
    assert pos == len(wire)
    return messages, keys, lengths


def carried(layout, stream_id, data):
    """Fill, seal and parse back: (the DATA bytes in order, the messages' frames, their
    views); each view is one whole message."""
    fill(layout, data)
    count = layout.count(len(data))
    views = layout.seal(stream_id, len(data), os.urandom(4 * count))
    assert len(views) == count
    for view in views:
        assert len(parse(bytes(view))[0]) == 1
    messages, _, _ = parse(b"".join(bytes(view) for view in views))
    assert len(messages) == count
    frames = [mux.parse_frames(message) for message in messages]
    out = b"".join(payload for message in frames for _, _, payload in message)
    for message in frames:
        for frame_type, sid, payload in message:
            assert (frame_type, sid) == (DATA, stream_id)
            assert 0 < len(payload) <= layout.frame_max
    return out, frames, views


def gaps(views):
    """Bytes between consecutive messages in the layout's buffer (0: end to end)."""
    import ctypes
    starts = [ctypes.addressof(ctypes.c_char.from_buffer(view)) for view in views]
    return [b - (a + len(v)) for a, b, v in zip(starts, starts[1:], views)]


@pytest.mark.parametrize("n, sizes", [
    (1, [[1]]),                                   # a 6-byte WebSocket header
    (100, [[16, 16, 16, 16], [16, 16, 4]]),         # two short messages, headers of 6
    (64, [[16, 16, 16, 16]]),                     # one full message
    (65, [[16, 16, 16, 16], [1]]),                # a full one, then a short one
    (256, [[16] * 4] * 4),                        # all full: one piece
])
def test_small_layout_frames_and_messages(n, sizes):
    layout = MessageLayout(frame_max=16, frames=4, messages=4)
    assert layout.capacity == 256
    data = os.urandom(n)
    out, frames, _ = carried(layout, 7, data)
    assert out == data
    assert [[len(p) for _, _, p in message] for message in frames] == sizes


def test_full_messages_lie_end_to_end_and_only_a_short_last_one_leaves_a_gap():
    layout = MessageLayout(frame_max=mux.MAX_DATA, frames=16, messages=4)
    per = layout.per_message
    for n, gaps_wanted in ((4 * per, [0, 0, 0]), (3 * per, [0, 0]), (per + 70000, [0]),
                           (per + 100, [8]), (per + 1, [8]), (per + 1000, [6]), (per - 1, [])):
        data = os.urandom(n)
        out, _, views = carried(layout, 3, data)
        assert out == data
        assert gaps(views) == gaps_wanted, n


def test_the_largest_message_is_what_the_server_announces():
    layout = MessageLayout(frame_max=mux.MAX_DATA, frames=16, messages=2)
    fill(layout, os.urandom(layout.capacity))
    views = layout.seal(1, layout.capacity, os.urandom(8))
    messages, _, lengths = parse(b"".join(bytes(v) for v in views))
    assert [len(m) for m in messages] == [mux.LARGE_MESSAGE] * 2
    assert lengths == [14, 14]


def test_each_message_has_its_own_key():
    layout = MessageLayout(frame_max=8, frames=2, messages=3)
    keys = b"AAAABBBBCCCC"
    fill(layout, bytes(48))
    views = layout.seal(1, 48, keys)
    _, got, _ = parse(b"".join(bytes(v) for v in views))
    assert got == [b"AAAA", b"BBBB", b"CCCC"]


def test_views_cover_a_read_of_at_most_the_capacity():
    layout = MessageLayout(frame_max=10, frames=3, messages=2)
    assert [len(v) for v in layout.views(1)] == [1]
    assert [len(v) for v in layout.views(25)] == [10, 10, 5]
    assert [len(v) for v in layout.views(30)] == [10, 10, 10]
    assert [len(v) for v in layout.views(1000)] == [10] * 6


def test_for_connection_follows_the_peers_message_size():
    big = mux.tunnel_connection("agent", 1 << 20, mux.LARGE_MESSAGE)
    layout = MessageLayout.for_connection(big, 4 << 20)
    assert (layout.frame_max, layout.frames, layout.messages) == (mux.MAX_DATA, 16, 16)
    assert layout.capacity == 4 << 20
    old = mux.tunnel_connection("agent", None, None)          # an older server: 4 frames
    layout = MessageLayout.for_connection(old, 1 << 20)
    assert (layout.frames, layout.messages) == (4, 16)


@pytest.mark.parametrize("n, keys", [(0, b""), (257, bytes(20)), (100, bytes(4))])
def test_seal_refuses_what_does_not_fit(n, keys):
    layout = MessageLayout(frame_max=16, frames=4, messages=4)
    with pytest.raises(ValueError):
        layout.seal(1, n, keys)


@pytest.mark.parametrize("args", [(0, 1, 1), (1, 0, 1), (1, 1, 0), (mux.MAX_DATA + 1, 1, 1)])
def test_bad_layouts_are_refused(args):
    with pytest.raises(ValueError):
        MessageLayout(*args)


@settings(max_examples=300, deadline=None)
@given(frame_max=st.integers(1, 40), frames=st.integers(1, 5), messages=st.integers(1, 4),
       data=st.data(), stream_id=st.integers(1, 2 ** 32 - 1))
def test_any_read_parses_back_to_its_bytes(frame_max, frames, messages, data, stream_id):
    layout = MessageLayout(frame_max, frames, messages)
    # The same buffer, reused for reads of several sizes, as a stream does.
    for _ in range(3):
        n = data.draw(st.integers(1, layout.capacity))
        payload = data.draw(st.binary(min_size=n, max_size=n))
        out, _, views = carried(layout, stream_id, payload)
        assert out == payload
        assert all(gap == 0 for gap in gaps(views)[:-1])
