"""websockify-agent's command line: the --server URL, the service address, bad combinations."""

import pytest

from websockify.agent.cli import ServerURL, parse_args, parse_server_url
from websockify.errors import UsageError


@pytest.mark.parametrize("text, expected, host_header", [
    ("wss://rdv.example.org/tunnel/LKLAFA151NA774655",
     ServerURL(True, "rdv.example.org", 443, "/tunnel/LKLAFA151NA774655"), "rdv.example.org"),
    ("ws://127.0.0.1:8080/tunnel/a", ServerURL(False, "127.0.0.1", 8080, "/tunnel/a"),
     "127.0.0.1:8080"),
    ("WSS://[::1]:8443/forward_to_me/x?v=1#frag",
     ServerURL(True, "::1", 8443, "/forward_to_me/x?v=1"), "[::1]:8443"),
    ("wss://[::1]/tunnel/x", ServerURL(True, "::1", 443, "/tunnel/x"), "[::1]"),
    ("ws://host:80/t/x", ServerURL(False, "host", 80, "/t/x"), "host"),
])
def test_server_urls(text, expected, host_header):
    url = parse_server_url(text)
    assert url == expected
    assert url.host_header == host_header


def test_a_url_prints_without_its_default_port():
    assert str(parse_server_url("wss://h:443/tunnel/a")) == "wss://h/tunnel/a"
    assert str(parse_server_url("ws://[::1]:81/tunnel/a")) == "ws://[::1]:81/tunnel/a"


@pytest.mark.parametrize("text, message", [
    ("https://h/tunnel/a", "must be a ws:// or wss:// URL"),
    ("h/tunnel/a", "must be a ws:// or wss:// URL"),
    ("ws://h", "has no path"),
    ("ws://h/", "has no path"),
    ("ws://h?x=1", "has no path"),
    ("ws://user:pw@h/tunnel/a", "credentials in the URL"),
    ("ws://h:0/tunnel/a", "out of range"),
    ("ws://h:x/tunnel/a", "bad port"),
    ("ws://:80/tunnel/a", "bad host"),
])
def test_bad_server_urls(text, message):
    with pytest.raises(UsageError, match=message):
        parse_server_url(text)


BASE = ["--service", "127.0.0.1:5900", "--server", "wss://h/tunnel/a"]


def test_defaults():
    config = parse_args(BASE + ["--token-stdin"])
    assert config.service == ("127.0.0.1", 5900)
    assert (config.connect_timeout, config.ping_interval, config.dead_after,
            config.max_retry_delay) == (10.0, 15.0, 45.0, 30.0)
    assert config.token_stdin and config.token_file is None
    assert parse_args(["--service", "[::1]:22", "--server", "ws://h/t/a",
                       "--token-file", "f"]).service == ("::1", 22)


def test_a_client_certificate_is_credentials_enough():
    config = parse_args(BASE + ["--client-cert", "c.pem"])
    assert config.client_cert == "c.pem" and config.client_key is None


@pytest.mark.parametrize("extra, message", [
    ([], "needs credentials"),
    (["--token-stdin", "--client-key", "k"], "--client-key needs --client-cert"),
])
def test_bad_combinations(extra, message):
    with pytest.raises(UsageError, match=message):
        parse_args(BASE + extra)


def test_tls_options_need_wss():
    with pytest.raises(UsageError, match="need a wss://"):
        parse_args(["--service", "h:1", "--server", "ws://h/t/a", "--token-stdin",
                    "--ca-cert", "ca.pem"])


@pytest.mark.parametrize("sizes", [[0], [1, 125], [126, 65535], [65536, 3], [70000]])
def test_masked_messages_parse_back_with_a_key_each(sizes):
    import os
    from websockify.agent.transport import mask_messages
    from websockify.protocol.frames import FrameParser
    messages = [os.urandom(n) for n in sizes]
    got, current, keys = [], bytearray(), []

    def on_data(chunk, opcode):
        assert opcode == 2
        current.extend(chunk)

    def on_end(opcode):
        got.append(bytes(current))
        current.clear()
    parser = FrameParser(on_data, lambda *a: None, on_message_end=on_end)
    # Each message in up to three parts (bytes and views), as message_parts gives them.
    parts = [[m[:n // 3], memoryview(m)[n // 3:n // 2], m[n // 2:]] for m, n in
             zip(messages, sizes)]
    prefix = b"\x8a\x80" + bytes(4)          # an already masked, empty pong first
    wire = bytes(mask_messages([(p, len(m)) for p, m in zip(parts, messages)], prefix))
    assert wire.startswith(prefix)
    wire = wire[len(prefix):]
    parser.feed(wire)
    assert got == messages
    # Every frame is masked, each with a key of its own.
    pos = 0
    for message in messages:
        length = wire[pos + 1] & 0x7F
        assert wire[pos] == 0x82 and wire[pos + 1] & 0x80
        size = {126: 4, 127: 10}.get(length, 2)
        keys.append(wire[pos + size:pos + size + 4])
        pos += size + 4 + len(message)
    assert pos == len(wire)
    assert len(set(keys)) == len(keys)


def test_masked_messages_reuse_the_writers_buffer():
    import os
    from websockify.agent.transport import mask_messages
    from websockify.protocol.frames import FrameParser
    buffer = bytearray()
    for sizes in ([70000], [10, 20], [200000, 5]):
        messages = [os.urandom(n) for n in sizes]
        got, current = [], bytearray()
        parser = FrameParser(lambda chunk, op: current.extend(chunk), lambda *a: None,
                             on_message_end=lambda op: (got.append(bytes(current)),
                                                        current.clear()))
        wire = mask_messages([([m], len(m)) for m in messages], b"", buffer)
        parser.feed(bytes(wire))
        wire.release()
        assert got == messages
    # The buffer grew to the largest batch and was written in place since.
    assert len(buffer) == 200000 + 14 + 5 + 6
