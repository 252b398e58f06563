"""Unit tests of the frame layer: masking, FrameParser, close payloads, encoders.

Everything here feeds bytes to ``websockify.protocol.frames`` directly; no sockets.
"""

import os
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import mask_frame, require_module
from websockify.protocol import frames as ws
from websockify.errors import (InvalidPayload, MessageTooBig, ProtocolError,
                               WebSocketError)
from websockify.protocol.frames import (OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING,
                                  OP_PONG, OP_TEXT, FrameParser, binary_header,
                                  close_payload, encode_frame,
                                  parse_close_payload)

KEY = b"\x37\xfa\x21\x3d"


def naive_unmask(data, key):
    """The reference: one byte at a time."""
    data = bytes(data)
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


class Collector:
    """Records what a FrameParser delivers, in order."""

    def __init__(self):
        self.events = []

    def on_data(self, chunk, opcode):
        assert isinstance(chunk, (bytes, bytearray, memoryview)), type(chunk)  # bytes-like
        self.events.append(("data", bytes(chunk), opcode))

    def on_control(self, opcode, payload):
        self.events.append(("control", opcode, bytes(payload)))

    @property
    def data(self):
        return b"".join(e[1] for e in self.events if e[0] == "data")

    @property
    def data_opcodes(self):
        return {e[2] for e in self.events if e[0] == "data"}

    @property
    def controls(self):
        return [(e[1], e[2]) for e in self.events if e[0] == "control"]

    def merged(self):
        """Events with consecutive data chunks of the same opcode joined.

        Empty chunks are dropped: whether an empty chunk marks a message end
        is an implementation detail of the parser.
        """
        out = []
        for event in self.events:
            if event[0] == "data":
                if not event[1]:
                    continue
                if out and out[-1][0] == "data" and out[-1][2] == event[2]:
                    out[-1] = ("data", out[-1][1] + event[1], event[2])
                    continue
            out.append(event)
        return out


def make_parser(**kwargs):
    collector = Collector()
    parser = FrameParser(collector.on_data, collector.on_control, **kwargs)
    return parser, collector


def feed_all(data, splits=None, **kwargs):
    """Feed ``data`` in one piece, or cut at the given offsets."""
    parser, collector = make_parser(**kwargs)
    if splits is None:
        parser.feed(data)
    else:
        last = 0
        for cut in list(splits) + [len(data)]:
            parser.feed(data[last:cut])
            last = cut
    return parser, collector


def feed_bytewise(data, **kwargs):
    parser, collector = make_parser(**kwargs)
    for i in range(len(data)):
        parser.feed(data[i:i + 1])
    return parser, collector


def header_only(opcode, length, fin=True, mask=True, rsv=0):
    """A frame header (with masking key when masked) announcing ``length`` bytes."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mbit = 0x80 if mask else 0
    if length < 126:
        head = struct.pack("!BB", first, mbit | length)
    elif length < 65536:
        head = struct.pack("!BBH", first, mbit | 126, length)
    else:
        head = struct.pack("!BBQ", first, mbit | 127, length)
    return head + (KEY if mask else b"")


def raw_header64(opcode, length, fin=True):
    """A masked header that always uses the 64-bit length form."""
    first = (0x80 if fin else 0) | opcode
    return struct.pack("!BBQ", first, 0x80 | 127, length) + KEY


# -- masking ----------------------------------------------------------------


class TestUnmask:
    """Both implementations must agree with the per-byte reference."""

    @pytest.fixture(params=["pure", "numpy"])
    def unmask(self, request):
        if request.param == "numpy":
            require_module("numpy", "the test extra installs it: numpy unmask untested")
            assert ws._numpy is not None, "numpy importable but websocket.py did not load it"
            return ws.unmask_numpy
        return ws.unmask_pure

    def test_empty(self, unmask):
        assert unmask(b"", KEY) == b""

    @pytest.mark.parametrize("n", range(1, 8))
    def test_short(self, unmask, n):
        data = bytes(range(100, 100 + n))
        assert unmask(data, KEY) == naive_unmask(data, KEY)

    def test_64k(self, unmask):
        data = os.urandom(65536)
        result = unmask(data, KEY)
        assert isinstance(result, (bytes, bytearray))  # any bytes-like result
        assert len(result) == 65536
        assert result == naive_unmask(data, KEY)

    @pytest.mark.parametrize("n", [9, 13, 127, 255, 257, 1001, 4097, 65535, 65537])
    def test_odd_lengths(self, unmask, n):
        data = os.urandom(n)
        key = os.urandom(4)
        assert unmask(data, key) == naive_unmask(data, key)

    @pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 300, 1027])
    def test_memoryview_input(self, unmask, n):
        buf = os.urandom(n + 3)
        view = memoryview(buf)[3:]       # also an unaligned start
        assert unmask(view, KEY) == naive_unmask(buf[3:], KEY)

    def test_zero_and_ff_keys(self, unmask):
        data = os.urandom(1000)
        assert unmask(data, b"\x00\x00\x00\x00") == data
        assert unmask(data, b"\xff\xff\xff\xff") == bytes(b ^ 0xFF for b in data)

    @pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8, 100, 1023, 70000])
    def test_involution(self, unmask, n):
        data = os.urandom(n)
        key = os.urandom(4)
        assert unmask(unmask(data, key), key) == data

    def test_random_against_reference(self, unmask):
        rnd = random.Random(1234)
        for _ in range(200):
            n = rnd.randrange(0, 600)
            data = bytes(rnd.getrandbits(8) for _ in range(n))
            key = bytes(rnd.getrandbits(8) for _ in range(4))
            assert unmask(data, key) == naive_unmask(data, key)


def test_unmask_auto_around_threshold():
    for n in (0, 1, 255, 256, 257, 1024):
        data = os.urandom(n)
        assert ws.unmask(data, KEY) == naive_unmask(data, KEY)


# -- FrameParser: good input -----------------------------------------------


def test_masked_binary_frame_one_feed():
    payload = b"hello, websocket"
    parser, got = feed_all(mask_frame(OP_BINARY, payload, key=KEY))
    assert got.merged() == [("data", payload, OP_BINARY)]
    assert not parser.in_message
    assert parser._pending == b""


def test_masked_text_frame_one_feed():
    payload = "grüße €".encode("utf-8")
    _, got = feed_all(mask_frame(OP_TEXT, payload, key=KEY))
    assert got.merged() == [("data", payload, OP_TEXT)]


@pytest.mark.parametrize("length", [0, 1, 5, 125, 126, 300, 65535, 65536])
def test_split_at_every_boundary_same_payload(length):
    payload = os.urandom(length)
    frame = mask_frame(OP_BINARY, payload, key=KEY)
    whole = feed_all(frame)[1]
    if length <= 300:
        bytewise = feed_bytewise(frame)[1]
        assert bytewise.data == payload
        assert bytewise.data_opcodes <= {OP_BINARY}
    else:
        # Byte by byte through a large payload is slow; cut at random places
        # plus every offset inside the header.
        rnd = random.Random(length)
        cuts = sorted(set(list(range(1, 15)) + rnd.sample(range(15, len(frame)), 200)))
        split = feed_all(frame, cuts)[1]
        assert split.data == payload
    assert whole.data == payload


def test_every_single_split_point():
    """One cut anywhere in a stream of several frames gives the same result."""
    frames = (mask_frame(OP_BINARY, b"abcdefghij" * 3, key=KEY)
              + mask_frame(OP_PING, b"pp", key=b"\x01\x02\x03\x04")
              + mask_frame(OP_TEXT, "héllo".encode(), key=b"\xaa\xbb\xcc\xdd")
              + mask_frame(OP_BINARY, b"z" * 200, key=KEY))
    expected = feed_all(frames)[1].merged()
    for cut in range(len(frames) + 1):
        assert feed_all(frames, [cut])[1].merged() == expected, cut


@pytest.mark.parametrize("length,header_size", [(126, 4), (1000, 4), (65535, 4),
                                                (65536, 10), (200000, 10)])
def test_extended_lengths(length, header_size):
    payload = os.urandom(length)
    frame = mask_frame(OP_BINARY, payload, key=KEY)
    assert len(frame) == header_size + 4 + length
    _, got = feed_all(frame)
    assert got.data == payload
    assert got.data_opcodes == {OP_BINARY}


def test_16_bit_length_form_with_small_value():
    """A 16-bit length field holding a small value is accepted as that value."""
    payload = b"short"
    frame = struct.pack("!BBH", 0x80 | OP_BINARY, 0x80 | 126, len(payload)) + KEY \
        + naive_unmask(payload, KEY)
    assert feed_all(frame)[1].data == payload


def test_64_bit_length_form_with_small_value():
    payload = b"x" * 130
    frame = raw_header64(OP_BINARY, len(payload)) + naive_unmask(payload, KEY)
    assert feed_all(frame)[1].data == payload


@pytest.mark.parametrize("first", [OP_TEXT, OP_BINARY])
def test_fragmented_message_in_order(first):
    parts = [b"Hel", b"lo, ", b"wor", b"ld"]
    stream = mask_frame(first, parts[0], fin=False)
    for part in parts[1:-1]:
        stream += mask_frame(OP_CONTINUATION, part, fin=False)
    stream += mask_frame(OP_CONTINUATION, parts[-1], fin=True)
    for parser, got in (feed_all(stream), feed_bytewise(stream)):
        assert got.data == b"".join(parts)
        # Continuation chunks carry the message's opcode, never 0.
        assert got.data_opcodes == {first}
        assert not parser.in_message


def test_in_message_flag():
    parser, got = make_parser()
    parser.feed(mask_frame(OP_BINARY, b"a", fin=False))
    assert parser.in_message
    parser.feed(mask_frame(OP_CONTINUATION, b"b", fin=False))
    assert parser.in_message
    parser.feed(mask_frame(OP_CONTINUATION, b"c", fin=True))
    assert not parser.in_message
    # A new message may start now.
    parser.feed(mask_frame(OP_TEXT, b"d"))
    assert got.merged() == [("data", b"abc", OP_BINARY), ("data", b"d", OP_TEXT)]


@pytest.mark.parametrize("first", [OP_TEXT, OP_BINARY])
def test_control_frames_interleaved_in_fragmented_message(first):
    stream = (mask_frame(first, b"one ", fin=False)
              + mask_frame(OP_PING, b"ping-1")
              + mask_frame(OP_CONTINUATION, b"two ", fin=False)
              + mask_frame(OP_PONG, b"pong-1")
              + mask_frame(OP_PING, b"")
              + mask_frame(OP_CONTINUATION, b"three", fin=True)
              + mask_frame(OP_CLOSE, b"\x03\xe8bye"))
    expected = [("data", b"one ", first),
                ("control", OP_PING, b"ping-1"),
                ("data", b"two ", first),
                ("control", OP_PONG, b"pong-1"),
                ("control", OP_PING, b""),
                ("data", b"three", first),
                ("control", OP_CLOSE, b"\x03\xe8bye")]
    assert feed_all(stream)[1].merged() == expected
    assert feed_bytewise(stream)[1].merged() == expected


def test_control_frame_of_125_bytes():
    payload = os.urandom(125)
    _, got = feed_bytewise(mask_frame(OP_PING, payload))
    assert got.controls == [(OP_PING, payload)]


def test_empty_frames():
    stream = (mask_frame(OP_BINARY, b"")
              + mask_frame(OP_TEXT, b"")
              + mask_frame(OP_PING, b"")
              + mask_frame(OP_PONG, b"")
              + mask_frame(OP_TEXT, b"", fin=False)
              + mask_frame(OP_CONTINUATION, b"", fin=False)
              + mask_frame(OP_CONTINUATION, b"", fin=True)
              + mask_frame(OP_BINARY, b"after")
              + mask_frame(OP_CLOSE, b""))
    for parser, got in (feed_all(stream), feed_bytewise(stream)):
        assert got.merged() == [("control", OP_PING, b""), ("control", OP_PONG, b""),
                                ("data", b"after", OP_BINARY), ("control", OP_CLOSE, b"")]
        for event in got.events:
            if event[0] == "data" and event[1] == b"":
                assert event[2] in (OP_TEXT, OP_BINARY)
        assert not parser.in_message
        assert parser._pending == b""


def test_empty_frame_as_last_of_a_stream():
    """A zero-length frame ending exactly at the end of a feed is complete."""
    parser, got = make_parser()
    parser.feed(mask_frame(OP_BINARY, b"x", fin=False))
    parser.feed(mask_frame(OP_CONTINUATION, b"", fin=True))
    assert not parser.in_message
    assert got.data == b"x"
    parser.feed(mask_frame(OP_PING, b""))
    assert got.controls == [(OP_PING, b"")]


def test_unmasked_frames_when_mask_not_required():
    parser, got = feed_all(encode_frame(OP_BINARY, b"abc"), require_mask=False)
    assert got.data == b"abc"


# -- FrameParser: bad input ----------------------------------------------------


def expect_error(data, cls, code, bytewise=False, **kwargs):
    """Feeding ``data`` raises ``cls`` with ``close_code`` ``code``."""
    parser, _ = make_parser(**kwargs)
    with pytest.raises(cls) as info:
        if bytewise:
            for i in range(len(data)):
                parser.feed(data[i:i + 1])
        else:
            parser.feed(data)
    assert isinstance(info.value, WebSocketError)
    assert info.value.close_code == code
    return info.value


@pytest.mark.parametrize("rsv", [1, 2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("bytewise", [False, True])
def test_reserved_bits(rsv, bytewise):
    expect_error(mask_frame(OP_BINARY, b"abc", rsv=rsv), ProtocolError, 1002, bytewise)


def test_reserved_bits_on_control_frame():
    expect_error(mask_frame(OP_PING, b"", rsv=4), ProtocolError, 1002)


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7])
def test_unknown_data_opcodes(opcode):
    expect_error(mask_frame(opcode, b"abc"), ProtocolError, 1002)


@pytest.mark.parametrize("opcode", [0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_control_opcodes(opcode):
    expect_error(mask_frame(opcode, b"abc"), ProtocolError, 1002)


@pytest.mark.parametrize("opcode", [3, 7, 0xB, 0xF])
def test_unknown_opcode_inside_fragmented_message(opcode):
    stream = mask_frame(OP_BINARY, b"a", fin=False) + mask_frame(opcode, b"b")
    expect_error(stream, ProtocolError, 1002)


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_fragmented_control_frame(opcode):
    expect_error(mask_frame(opcode, b"abc", fin=False), ProtocolError, 1002)


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
@pytest.mark.parametrize("length", [126, 1000, 70000])
def test_control_payload_over_125(opcode, length):
    expect_error(mask_frame(opcode, b"p" * length), ProtocolError, 1002)


@pytest.mark.parametrize("opcode", [OP_PING, OP_CLOSE])
def test_control_payload_over_125_refused_from_header(opcode):
    expect_error(header_only(opcode, 126), ProtocolError, 1002)
    expect_error(header_only(opcode, 2 ** 40), ProtocolError, 1002)


@pytest.mark.parametrize("fin", [True, False])
def test_continuation_with_no_start(fin):
    expect_error(mask_frame(OP_CONTINUATION, b"abc", fin=fin), ProtocolError, 1002)


def test_continuation_after_finished_message():
    stream = mask_frame(OP_TEXT, b"done") + mask_frame(OP_CONTINUATION, b"more")
    expect_error(stream, ProtocolError, 1002)


@pytest.mark.parametrize("first", [OP_TEXT, OP_BINARY])
@pytest.mark.parametrize("second", [OP_TEXT, OP_BINARY])
def test_new_data_frame_inside_fragmented_message(first, second):
    stream = mask_frame(first, b"abc", fin=False) + mask_frame(second, b"def")
    expect_error(stream, ProtocolError, 1002)


@pytest.mark.parametrize("opcode", [OP_BINARY, OP_TEXT, OP_PING, OP_CLOSE, OP_CONTINUATION])
@pytest.mark.parametrize("bytewise", [False, True])
def test_unmasked_client_frame(opcode, bytewise):
    expect_error(mask_frame(opcode, b"abc", mask=False), ProtocolError, 1002, bytewise)


def test_unmasked_frame_refused_from_first_two_bytes():
    expect_error(mask_frame(OP_BINARY, b"", mask=False, length=70000)[:2], ProtocolError, 1002)


@pytest.mark.parametrize("length", [1001, 65536, 2 ** 40, 2 ** 63 - 1])
def test_frame_over_max_size_refused_from_header(length):
    """1009 as soon as the header is complete, before any payload arrives."""
    head = header_only(OP_BINARY, length)
    parser, got = make_parser(max_frame_size=1000)
    # Every proper prefix of the header is accepted and kept pending.
    for i in range(len(head) - 1):
        parser.feed(head[i:i + 1])
    with pytest.raises(MessageTooBig) as info:
        parser.feed(head[-1:])
    assert info.value.close_code == 1009
    assert got.events == []


def test_frame_at_max_size_accepted():
    payload = os.urandom(1000)
    _, got = feed_all(mask_frame(OP_BINARY, payload), max_frame_size=1000)
    assert got.data == payload


def test_continuation_over_max_size():
    stream = mask_frame(OP_BINARY, b"a" * 1000, fin=False) + header_only(OP_CONTINUATION, 1001)
    expect_error(stream, MessageTooBig, 1009, max_frame_size=1000)


def test_default_max_frame_size_header_only():
    expect_error(header_only(OP_BINARY, ws.DEFAULT_MAX_FRAME_SIZE + 1), MessageTooBig, 1009)


@pytest.mark.parametrize("length", [2 ** 63, 2 ** 63 + 1, 2 ** 64 - 1])
@pytest.mark.parametrize("bytewise", [False, True])
def test_64_bit_length_with_msb_set(length, bytewise):
    expect_error(raw_header64(OP_BINARY, length), ProtocolError, 1002, bytewise)


def test_64_bit_length_with_msb_set_even_with_huge_limit():
    expect_error(raw_header64(OP_BINARY, 2 ** 63), ProtocolError, 1002,
                 max_frame_size=2 ** 64)


def test_invalid_utf8_single_frame():
    expect_error(mask_frame(OP_TEXT, b"abc\xff"), InvalidPayload, 1007)


@pytest.mark.parametrize("bad", [b"\xc0\x80", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80",
                                 b"\xe2\x28\xa1", b"\x80"])
def test_invalid_utf8_sequences(bad):
    expect_error(mask_frame(OP_TEXT, b"ok" + bad + b"ok"), InvalidPayload, 1007)


def test_invalid_utf8_split_across_frames():
    stream = (mask_frame(OP_TEXT, b"ab\xe2\x82", fin=False)
              + mask_frame(OP_CONTINUATION, b"\x28cd", fin=True))
    expect_error(stream, InvalidPayload, 1007)


def test_invalid_utf8_split_across_feeds():
    expect_error(mask_frame(OP_TEXT, "€uro".encode()[:2] + b"\x41"), InvalidPayload, 1007,
                 bytewise=True)


def test_truncated_utf8_at_message_end():
    expect_error(mask_frame(OP_TEXT, b"abc\xe2\x82"), InvalidPayload, 1007)
    stream = (mask_frame(OP_TEXT, b"abc", fin=False)
              + mask_frame(OP_CONTINUATION, b"\xf0\x9f", fin=False)
              + mask_frame(OP_CONTINUATION, b"", fin=True))
    expect_error(stream, InvalidPayload, 1007)
    expect_error(stream, InvalidPayload, 1007, bytewise=True)


def test_invalid_utf8_in_binary_message_is_fine():
    _, got = feed_all(mask_frame(OP_BINARY, b"\xff\xfe\xc0\x80"))
    assert got.data == b"\xff\xfe\xc0\x80"


def test_valid_multibyte_utf8_split_across_frames_and_feeds():
    text = "a€b😀c" * 3
    raw = text.encode("utf-8")
    # Cut the message into one-byte frames: every multi-byte character is split.
    stream = mask_frame(OP_TEXT, raw[:1], fin=False)
    for i in range(1, len(raw) - 1):
        stream += mask_frame(OP_CONTINUATION, raw[i:i + 1], fin=False)
    stream += mask_frame(OP_CONTINUATION, raw[-1:], fin=True)
    for parser, got in (feed_all(stream), feed_bytewise(stream)):
        assert got.data.decode("utf-8") == text
        assert got.data_opcodes == {OP_TEXT}
    # And as one frame fed byte by byte.
    assert feed_bytewise(mask_frame(OP_TEXT, raw))[1].data == raw


def test_utf8_state_reset_between_messages():
    stream = mask_frame(OP_TEXT, "é".encode()) + mask_frame(OP_TEXT, "ü".encode())
    assert feed_all(stream)[1].data == "éü".encode()


def test_control_frame_inside_text_message_does_not_break_utf8():
    raw = "€".encode()
    stream = (mask_frame(OP_TEXT, raw[:1], fin=False)
              + mask_frame(OP_PING, b"\xff")          # pings are not text
              + mask_frame(OP_CONTINUATION, raw[1:], fin=True))
    _, got = feed_all(stream)
    assert got.data == raw
    assert got.controls == [(OP_PING, b"\xff")]


# -- close payloads -------------------------------------------------------


def test_parse_close_empty_body():
    assert parse_close_payload(b"") == (None, "")


def test_parse_close_one_byte_body():
    with pytest.raises(ProtocolError) as info:
        parse_close_payload(b"\x03")
    assert info.value.close_code == 1002


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999,
                                  5000, 65535])
def test_parse_close_refused_codes(code):
    with pytest.raises(ProtocolError) as info:
        parse_close_payload(struct.pack("!H", code) + b"why")
    assert info.value.close_code == 1002


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011,
                                  3000, 3001, 4000, 4999])
def test_parse_close_accepted_codes(code):
    assert parse_close_payload(struct.pack("!H", code)) == (code, "")
    assert parse_close_payload(struct.pack("!H", code) + "bye ☺".encode()) == (code, "bye ☺")


@pytest.mark.parametrize("reason", [b"\xff", b"ab\xc3", b"\xed\xa0\x80"])
def test_parse_close_invalid_utf8_reason(reason):
    with pytest.raises(InvalidPayload) as info:
        parse_close_payload(struct.pack("!H", 1000) + reason)
    assert info.value.close_code == 1007


def test_close_payload_helper():
    assert close_payload(None) == b""
    assert close_payload(1000) == b"\x03\xe8"
    assert close_payload(1000, "Target closed") == b"\x03\xe8Target closed"
    assert parse_close_payload(close_payload(4001, "ok")) == (4001, "ok")
    assert len(close_payload(1000, "x" * 500)) == 125


@pytest.mark.parametrize("reason", ["é" * 100, "€" * 60, "a" + "😀" * 40],
                         ids=["2-byte", "3-byte", "4-byte"])
def test_close_payload_truncation_keeps_valid_utf8(reason):
    """A long reason is cut to fit 125 bytes without splitting a character.

    Otherwise the peer must fail the connection with 1007 on our own close.
    """
    body = close_payload(1011, reason)
    assert len(body) <= 125
    code, got = parse_close_payload(body)
    assert code == 1011
    assert reason.startswith(got)


def test_is_valid_close_code():
    assert ws.is_valid_close_code(1000)
    assert not ws.is_valid_close_code(1005)
    assert ws.is_valid_close_code(3000) and ws.is_valid_close_code(4999)
    assert not ws.is_valid_close_code(5000)


# -- encoders -----------------------------------------------------------------


@pytest.mark.parametrize("length,size", [(0, 2), (125, 2), (126, 4), (65535, 4),
                                         (65536, 10)])
@pytest.mark.parametrize("opcode", [OP_BINARY, OP_TEXT])
def test_encode_frame_round_trip(length, size, opcode):
    payload = (b"ab" * (length // 2 + 1))[:length]
    frame = encode_frame(opcode, payload)
    header = binary_header(length, opcode)
    assert len(header) == size
    assert frame == header + payload
    assert header[0] == 0x80 | opcode            # FIN, no RSV
    assert not header[1] & 0x80                  # server frames are not masked
    # Same bytes as gevent-websocket's encoder.
    assert header == gws_header(opcode, length)
    parser, got = feed_all(frame, require_mask=False)
    assert got.data == payload
    assert got.data_opcodes <= {opcode}
    assert not parser.in_message


@pytest.mark.parametrize("length", [0, 125, 126, 65535, 65536])
def test_binary_header_default_opcode(length):
    assert binary_header(length) == binary_header(length, OP_BINARY)
    assert binary_header(length)[0] == 0x82


def test_encode_control_frames_round_trip():
    stream = (encode_frame(OP_PONG, b"pong") + encode_frame(OP_CLOSE, close_payload(1000, "bye"))
              + encode_frame(OP_PING, b""))
    _, got = feed_all(stream, require_mask=False)
    assert got.controls == [(OP_PONG, b"pong"), (OP_CLOSE, b"\x03\xe8bye"), (OP_PING, b"")]


def gws_header(opcode, length, mask=b""):
    """gevent-websocket's frame header encoder: the reference for ours."""
    from geventwebsocket.websocket import Header
    return bytes(Header.encode_header(True, opcode, mask, length, 0))


def test_encode_frame_header_masked():
    head = gws_header(OP_BINARY, 300, mask=KEY)
    assert head == header_only(OP_BINARY, 300)


# -- property: arbitrary bytes ------------------------------------------------


def _check_stream(data, cuts, **kwargs):
    parser, _ = make_parser(**kwargs)
    last = 0
    try:
        for cut in sorted(cuts) + [len(data)]:
            parser.feed(data[last:cut])
            last = cut
            assert len(parser._pending) < 14
    except WebSocketError as exc:
        assert exc.close_code in (1002, 1007, 1009)
        assert isinstance(exc, (ProtocolError, InvalidPayload, MessageTooBig))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_bytes_in_random_splits(data):
    raw = data.draw(st.binary(max_size=400), label="raw")
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=20), label="cuts")
    require_mask = data.draw(st.booleans(), label="require_mask")
    max_size = data.draw(st.sampled_from([126, 1000, ws.DEFAULT_MAX_FRAME_SIZE]), label="max")
    _check_stream(raw, cuts, require_mask=require_mask, max_frame_size=max_size)


_frame = st.builds(
    lambda fin, rsv, opcode, mask, payload, lie: mask_frame(
        opcode, payload, fin=fin, rsv=rsv, mask=mask,
        length=None if lie is None else lie),
    st.booleans(),
    st.sampled_from([0, 0, 0, 0, 1, 2, 4]),
    st.integers(0, 15),
    st.sampled_from([True, True, True, False]),
    st.binary(max_size=300),
    st.one_of(st.none(), st.none(), st.none(),
              st.sampled_from([0, 1, 125, 126, 127, 65535, 65536, 2 ** 63 - 1, 2 ** 63,
                               2 ** 64 - 1])),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_frame_like_streams_in_random_splits(data):
    """Streams of plausible frames (some wrong) in random splits."""
    frames = data.draw(st.lists(_frame, max_size=8), label="frames")
    raw = b"".join(frames)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=30), label="cuts")
    max_size = data.draw(st.sampled_from([126, 1000, ws.DEFAULT_MAX_FRAME_SIZE]), label="max")
    _check_stream(raw, cuts, max_frame_size=max_size)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([OP_BINARY, OP_TEXT]),
                          st.text(max_size=50), st.integers(1, 4)), max_size=6),
       st.data())
def test_valid_streams_deliver_exact_payload(messages, data):
    """Valid fragmented messages in random splits deliver exactly their bytes."""
    stream = b""
    expected = []
    for opcode, text, pieces in messages:
        raw = text.encode("utf-8")
        step = max(1, len(raw) // pieces)
        chunks = [raw[i:i + step] for i in range(0, len(raw), step)] or [b""]
        for i, chunk in enumerate(chunks):
            stream += mask_frame(opcode if i == 0 else OP_CONTINUATION, chunk,
                                 fin=i == len(chunks) - 1)
            if i == 0:
                stream += mask_frame(OP_PING, b"x")
        expected.append((opcode, raw))
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="cuts")
    parser, got = feed_all(stream, sorted(cuts))
    # Join per message: consecutive messages of the same opcode merge, so
    # compare the whole byte stream and the opcode sequence without empties.
    assert got.data == b"".join(raw for _, raw in expected)
    assert len(got.controls) == len(messages)
    assert not parser.in_message


class TestUnmaskInPlace:
    """The relay's path: unmask a region of a shared buffer in place, both
    implementations, with data around the region left untouched."""

    @pytest.fixture(params=["pure", "numpy"])
    def unmask_into(self, request):
        if request.param == "numpy":
            require_module("numpy", "the test extra installs it: numpy unmask untested")
            return ws.unmask_into_numpy
        return ws.unmask_into_pure

    @pytest.mark.parametrize("start,length", [(0, 0), (0, 1), (3, 5), (1, 511), (2, 512),
                                              (5, 513), (7, 65536), (0, 262144 - 9)])
    def test_region_only(self, unmask_into, start, length):
        key = os.urandom(4)
        original = os.urandom(start + length + 11)
        buf = bytearray(original)
        unmask_into(buf, start, start + length, key)
        assert bytes(buf[:start]) == original[:start]
        assert bytes(buf[start + length:]) == original[start + length:]
        assert bytes(buf[start:start + length]) == naive_unmask(original[start:start + length], key)

    # The fixture only picks a function: nothing to reset between examples.
    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(start=st.integers(0, 9), length=st.integers(0, 40), key=st.binary(min_size=4,
                                                                           max_size=4))
    def test_any_offset_and_length(self, unmask_into, start, length, key):
        original = bytes(range(start + length + 5))
        buf = bytearray(original)
        unmask_into(buf, start, start + length, key)
        assert bytes(buf) == (original[:start] + naive_unmask(original[start:start + length], key)
                              + original[start + length:])

    def test_involution(self, unmask_into):
        key = os.urandom(4)
        original = os.urandom(70001)
        buf = bytearray(original)
        unmask_into(buf, 3, 70000, key)
        unmask_into(buf, 3, 70000, key)
        assert bytes(buf) == original


def test_feed_buffer_unmasks_in_place_and_keeps_split_headers():
    """feed_buffer over a reused buffer gives the same data as feed, even when
    a read ends inside a frame header."""
    payloads = [os.urandom(n) for n in (10, 300, 70000, 0, 5)]
    stream = b"".join(mask_frame(0x2, p) for p in payloads)
    expected = b"".join(payloads)
    for read_size in (1, 7, 13, 4096, 65536):
        parser, collector = make_parser()
        buf = bytearray(65536)
        for pos in range(0, len(stream), read_size):
            piece = stream[pos:pos + read_size]
            buf[:len(piece)] = piece
            parser.feed_buffer(buf, len(piece))
            # what the caller keeps must be copied before the buffer is reused
        assert collector.data == expected, read_size


# -- the client side (the tunnel agent) -----------------------------------------


@pytest.mark.parametrize("length", [0, 1, 125, 126, 65535, 65536, 70001])
def test_encode_client_frame_matches_the_reference_and_parses(length):
    payload = os.urandom(length)
    frame = ws.encode_client_frame(OP_BINARY, payload, KEY)
    assert frame == mask_frame(OP_BINARY, payload, key=KEY)
    parser, got = feed_all(frame)            # a server's parser: masked required
    assert got.data == payload and got.data_opcodes == {OP_BINARY}


def test_encode_client_frame_header_bytes():
    assert ws.encode_client_frame(OP_TEXT, b"", b"\x00\x00\x00\x00") == b"\x81\x80\x00\x00\x00\x00"
    frame = ws.encode_client_frame(OP_CLOSE, close_payload(1000), KEY)
    assert frame[:2] == b"\x88\x82" and frame[2:6] == KEY
    assert naive_unmask(frame[6:], KEY) == b"\x03\xe8"
    assert ws.encode_client_frame(OP_BINARY, b"x" * 200, KEY)[:4] == b"\x82\xfe\x00\xc8"
    assert ws.encode_client_frame(OP_BINARY, b"x" * 65536, KEY)[:10] == \
        b"\x82\xff" + struct.pack("!Q", 65536)


def test_encode_client_frame_takes_any_bytes_like():
    data = bytearray(b"hello world")
    assert ws.encode_client_frame(OP_BINARY, memoryview(data), KEY) == \
        ws.encode_client_frame(OP_BINARY, bytes(data), KEY)
    with pytest.raises(ValueError):
        ws.encode_client_frame(OP_BINARY, b"x", b"abc")


@given(payload=st.binary(max_size=3000), key=st.binary(min_size=4, max_size=4),
       opcode=st.sampled_from([OP_TEXT, OP_BINARY, OP_PING]))
def test_encode_client_frame_round_trip(payload, key, opcode):
    if opcode == OP_PING:
        payload = payload[:125]
    if opcode == OP_TEXT:
        payload = payload.decode("latin-1").encode("utf-8")
    _, got = feed_all(ws.encode_client_frame(opcode, payload, key))
    if opcode == OP_PING:
        assert got.controls == [(OP_PING, payload)]
    else:
        assert got.data == payload


def test_parser_for_server_frames():
    stream = (encode_frame(OP_BINARY, b"abc") + encode_frame(OP_PING, b"p")
              + ws.frame_header(2, OP_TEXT, False) + b"de" + encode_frame(OP_CONTINUATION, b"f")
              + encode_frame(OP_BINARY, os.urandom(70000)))
    for splits in (None, range(1, len(stream))):
        parser, got = feed_all(stream, splits, expect_masked=False)
        merged = got.merged()
        assert merged[:4] == [("data", b"abc", OP_BINARY), ("control", OP_PING, b"p"),
                              ("data", b"def", OP_TEXT), merged[3]]
        assert len(merged[3][1]) == 70000


@pytest.mark.parametrize("frame", [mask_frame(OP_BINARY, b"abc"), mask_frame(OP_PING, b""),
                                   mask_frame(OP_BINARY, b"x" * 300)],
                         ids=["data", "control", "16-bit length"])
def test_a_masked_server_frame_is_a_protocol_error(frame):
    for bytewise in (False, True):
        error = expect_error(frame, ProtocolError, 1002, bytewise=bytewise, expect_masked=False)
        assert "server frame is masked" in str(error)


def test_expect_masked_false_ignores_require_mask():
    _, got = feed_all(encode_frame(OP_BINARY, b"ok"), expect_masked=False, require_mask=True)
    assert got.data == b"ok"
    expect_error(mask_frame(OP_BINARY, b"no"), ProtocolError, 1002, expect_masked=False,
                 require_mask=False)
