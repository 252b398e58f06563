"""net/sendqueue.py's send_some on a real socketpair: what leaves the queue, what stays."""

import socket

import pytest

from websockify.net.sendqueue import IOV_MAX, send_some


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    yield ours, theirs
    ours.close()
    theirs.close()


def test_several_buffers_leave_in_one_call_and_empty_ones_with_them(pair):
    ours, theirs = pair
    out = [b"", b"abc", b"", b"defg", b""]
    assert send_some(ours, out) == 7
    assert out == []
    assert theirs.recv(100) == b"abcdefg"


def test_a_lone_empty_buffer_leaves(pair):
    ours, _ = pair
    out = [b""]
    assert send_some(ours, out) == 0
    assert out == []


def test_a_partial_send_leaves_a_view_of_the_rest_then_eagain(pair):
    ours, theirs = pair
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = bytes(range(256)) * 4096              # 1 MiB: more than the socket takes
    out = [big, b"tail"]
    sent = send_some(ours, out)
    assert 0 < sent < len(big)
    assert isinstance(out[0], memoryview) and out[0].obj is big   # no copy
    assert bytes(out[0]) == big[sent:] and out[1] == b"tail"
    with pytest.raises(BlockingIOError):
        send_some(ours, out)
    # Drained, the rest arrives in order.
    got = bytearray()
    theirs.settimeout(5)
    while len(got) < len(big) + 4:
        try:
            send_some(ours, out)
        except BlockingIOError:
            pass
        got += theirs.recv(1 << 20)
    assert bytes(got) == big + b"tail" and out == []


def test_one_buffer_at_a_time_when_not_plain(pair):
    ours, theirs = pair
    out = [b"one", b"two"]
    assert send_some(ours, out, plain=False) == 3
    assert out == [b"two"]
    assert theirs.recv(100) == b"one"


def test_at_most_iov_max_buffers_a_call(pair):
    ours, theirs = pair
    out = [b"x"] * (IOV_MAX + 3)
    assert send_some(ours, out) == IOV_MAX
    assert out == [b"x"] * 3
    assert theirs.recv(4096) == b"x" * IOV_MAX
