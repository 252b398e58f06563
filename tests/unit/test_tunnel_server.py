"""The server side's pure pieces: the registry's table, hand-off messages, the status page."""

import dataclasses
import ipaddress
import types

import pytest
from hypothesis import given, strategies as st

from websockify.tunnel.config import AgentEntry, TunnelConfig
from websockify.tunnel.handoff import MAX_MESSAGE, decode_message, encode_message
from websockify.tunnel.registry import Registry
from websockify.tunnel.status import build_document, render_html


def tunnel_config(*agents):
    return TunnelConfig(path="/tunnel/", secrets=(b"s",),
                        agents=types.MappingProxyType({a.agent_id: a for a in agents}),
                        status_allow=(ipaddress.ip_network("127.0.0.1/32"),),
                        source="/etc/tunnels.toml")


# -- registry ------------------------------------------------------------------

def test_registry_claim_release_and_serials(tmp_path):
    registry = Registry(8, str(tmp_path / "lock"))
    assert registry.configure(["A", "B"]) == []
    first = registry.claim("A", 100, 1, "10.0.0.1:5000", 1234.0, refuse=False, now=50.0)
    assert (first.taken, first.serial, first.previous_pid, first.previous_peer) == \
        (True, 1, 0, "")
    assert registry.holder("A") == 100
    assert registry.holder("B") == 0
    second = registry.claim("A", 200, 2, "10.0.0.2:6000", 0.0, refuse=False, now=60.0)
    assert (second.taken, second.serial, second.previous_pid, second.previous_peer) == \
        (True, 2, 100, "10.0.0.1:5000")
    # The replaced link's release must not clear its successor's entry.
    assert registry.release("A", 100, 1) is False
    assert registry.holder("A") == 200
    registry.publish("A", 2, streams=3, bytes_out=10, bytes_in=20)
    row = [r for r in registry.snapshot() if r["id"] == "A"][0]
    assert row == {"id": "A", "open": False, "connected": True, "worker_pid": 200, "worker": 2,
                   "peer": "10.0.0.2:6000", "connected_since": 60.0, "connects": 2,
                   "open_streams": 3, "bytes_to_agent": 10, "bytes_from_agent": 20,
                   "token_expires": None, "viewers": 0, "requests": 0}
    assert registry.release("A", 200, 2) is True
    assert registry.holder("A") == 0


def test_registry_refuse_keeps_the_first(tmp_path):
    registry = Registry(8, str(tmp_path / "lock"))
    registry.configure(["A"])
    registry.claim("A", 100, 1, "p1", 0.0, refuse=True)
    refused = registry.claim("A", 200, 2, "p2", 0.0, refuse=True)
    assert (refused.taken, refused.previous_pid, refused.previous_peer) == (False, 100, "p1")
    assert registry.holder("A") == 100


def test_registry_unknown_and_removed_ids(tmp_path):
    registry = Registry(8, str(tmp_path / "lock"))
    registry.configure(["A", "B"])
    assert registry.claim("C", 1, 1, "p", 0.0, refuse=False).taken is False
    registry.claim("B", 100, 1, "p", 0.0, refuse=False)
    registry.configure(["A", "C"])
    assert registry.removed("B") and not registry.removed("A") and not registry.removed("C")
    assert registry.claim("B", 101, 1, "p", 0.0, refuse=False).taken is False
    # Still held until its worker lets go; then the entry can be reused.
    assert registry.holder("B") == 100
    assert [r["id"] for r in registry.snapshot()] == ["A", "C"]
    registry.release("B", 100, 1)
    registry.configure(["A", "C", "D"])
    assert registry.configured("D") and registry.index_of("D") == 1


def test_registry_dead_worker_entries_cleared(tmp_path):
    registry = Registry(8, str(tmp_path / "lock"))
    registry.configure(["A", "B", "C"])
    registry.claim("A", 100, 1, "p", 0.0, refuse=False)
    registry.claim("B", 200, 2, "p", 0.0, refuse=False)
    registry.claim("C", 100, 1, "p", 0.0, refuse=False)
    assert sorted(registry.worker_exited(100)) == ["A", "C"]
    assert (registry.holder("A"), registry.holder("B"), registry.holder("C")) == (0, 200, 0)


def test_registry_full(tmp_path):
    registry = Registry(2, str(tmp_path / "lock"))
    assert registry.configure(["A", "B", "C"]) == ["C"]
    assert registry.configured("A") and registry.configured("B")
    assert not registry.configured("C")


def test_registry_long_id_and_peer(tmp_path):
    registry = Registry(2, str(tmp_path / "lock"))
    long_id = "x" * 128
    registry.configure([long_id])
    registry.claim(long_id, 7, 1, "[2001:db8::1]:65535" + "9" * 80, 0.0, refuse=False)
    assert registry.holder(long_id) == 7
    assert registry.holder_peer(long_id) == ("[2001:db8::1]:65535" + "9" * 80)[:64]


# -- hand-off messages ----------------------------------------------------------

@given(st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=5),
       st.binary(max_size=2000))
def test_handoff_message_round_trip(header, data):
    assert decode_message(encode_message(header, data)) == (header, data)


def test_handoff_message_limits():
    with pytest.raises(ValueError):
        encode_message({}, b"x" * MAX_MESSAGE)
    for bad in (b"", b"\x00\x00", b"\x00\x00\x00\x09{}", b"\x00\x00\x00\x02[]"):
        with pytest.raises(ValueError):
            decode_message(bad)


# -- the status page --------------------------------------------------------------

def test_status_document_exact():
    config = tunnel_config(AgentEntry("B1", "Bus01", ("127.0.0.1", 39036), True),
                           AgentEntry("A0", ""), AgentEntry("C2", "web", None, False, True))
    rows = [{"id": "B1", "connected": True, "worker_pid": 9, "worker": 2, "peer": "1.2.3.4:5",
             "connected_since": 100.0, "connects": 3, "open_streams": 2,
             "bytes_to_agent": 11, "bytes_from_agent": 22, "token_expires": 999.0},
            {"id": "C2", "connected": False, "connects": 1, "viewers": 3, "requests": 41},
            # An openly registered ID shows only while the file allows open registration.
            {"id": "Z9", "open": True, "connected": True, "connects": 1}]
    document = build_document(config, rows, 200.0)
    assert document == {
        "version": 1, "now": 200.0, "path": "/tunnel/", "http_path": "/t/",
        "agents": [
            {"id": "A0", "nickname": "", "open": False, "connected": False, "peer": None,
             "connected_since": None, "reconnects": 0, "open_streams": 0,
             "bytes_to_agent": 0, "bytes_from_agent": 0, "token_expires": None,
             "worker": None, "listen": None, "bridge": False,
             "faces": {"tcp": None, "bridge": None, "http": None},
             "viewers": 0, "requests": 0},
            {"id": "B1", "nickname": "Bus01", "open": False, "connected": True,
             "peer": "1.2.3.4:5", "connected_since": 100.0, "reconnects": 2,
             "open_streams": 2, "bytes_to_agent": 11, "bytes_from_agent": 22,
             "token_expires": 999.0, "worker": 2, "listen": "127.0.0.1:39036", "bridge": True,
             "faces": {"tcp": "127.0.0.1:39036", "bridge": "?token=B1", "http": None},
             "viewers": 0, "requests": 0},
            {"id": "C2", "nickname": "web", "open": False, "connected": False, "peer": None,
             "connected_since": None, "reconnects": 0, "open_streams": 0,
             "bytes_to_agent": 0, "bytes_from_agent": 0, "token_expires": None,
             "worker": None, "listen": None, "bridge": False,
             "faces": {"tcp": None, "bridge": None, "http": "/t/C2/"},
             "viewers": 3, "requests": 41}]}
    page = render_html(document)
    assert ("<td>Bus01</td><td>-</td><td>tcp 127.0.0.1:39036, bridge ?token=B1</td>"
            "<td>1.2.3.4:5</td><td>1970-01-01 00:01:40 UTC</td><td>2</td>") in page
    assert "<td>http /t/C2/</td>" in page
    assert "3 agent(s), 1 connected" in page
    opened = build_document(dataclasses.replace(config, open=True), rows, 200.0)
    assert [agent["id"] for agent in opened["agents"]] == ["A0", "B1", "C2", "Z9"]
    assert opened["agents"][3]["open"] is True
    assert opened["agents"][3]["faces"] == {"tcp": None, "bridge": None, "http": "/t/Z9/"}


def test_status_html_escapes():
    config = tunnel_config(AgentEntry("X", "<b>&"))
    page = render_html(build_document(config, [], 0.0))
    assert "<td>&lt;b&gt;&amp;</td>" in page


# -- answers the hub and the faces compute ---------------------------------------------

def test_status_allowed_networks():
    from websockify.tunnel.faces import status_allowed
    networks = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"),
                ipaddress.ip_network("10.0.0.0/8"))
    assert status_allowed("127.0.0.1", networks)
    assert status_allowed("::1", networks)
    assert status_allowed("::ffff:10.1.2.3", networks)      # a v4 client on a v6 socket
    assert not status_allowed("127.0.0.2", networks)
    assert not status_allowed("192.168.1.1", networks)
    assert not status_allowed("not an address", networks)


def test_status_response_by_accept():
    from websockify.tunnel.faces import status_response
    document = build_document(tunnel_config(AgentEntry("A", "n")), [], 0.0)
    kind, body = status_response(document, "text/html, application/json;q=0.9")
    assert kind == "application/json" and body.endswith(b"\n")
    import json
    assert json.loads(body) == document
    kind, body = status_response(document, "")
    assert kind == "text/html; charset=utf-8" and body.startswith(b"<!DOCTYPE html>")


def test_agent_response_answers_the_subprotocol():
    from websockify.tunnel.hub import agent_response
    head = agent_response("dGhlIHNhbXBsZSBub25jZQ==")
    assert head == (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
                    b"Sec-WebSocket-Protocol: websockify-tunnel.v1\r\n\r\n")


def test_registry_claims_exclude_each_other_across_processes(tmp_path):
    """Forked processes racing for one ID with refuse: exactly one wins each round."""
    import os
    registry = Registry(4, str(tmp_path / "lock"))
    registry.configure(["race"])
    rounds = 30
    children = []
    for worker in (1, 2, 3):
        pid = os.fork()
        if pid == 0:
            wins = 0
            for number in range(rounds):
                claim = registry.claim("race", os.getpid(), worker, "w%d" % worker, 0.0,
                                       refuse=True)
                if claim.taken:
                    wins += 1
                    registry.release("race", os.getpid(), claim.serial)
            os._exit(min(wins, 250))
        children.append(pid)
    total = 0
    for pid in children:
        _, status = os.waitpid(pid, 0)
        total += os.WEXITSTATUS(status)
    assert registry.holder("race") == 0
    # Every win took a new serial: none was lost to a torn read-modify-write.
    assert registry.serial("race") == total
    assert [r["connects"] for r in registry.snapshot()] == [total]


def test_registry_open_registration_entries(tmp_path):
    registry = Registry(3, str(tmp_path / "lock"))
    assert registry.configure(["A"], keep_open=True) == []
    assert registry.known("X") is False
    assert registry.register_open("X") is True
    assert (registry.known("X"), registry.is_open("X"), registry.configured("X")) == \
        (True, True, False)
    assert registry.is_open("A") is False
    claim = registry.claim("X", 100, 1, "10.0.0.1:5000", 99.0, refuse=False, now=5.0)
    assert claim.taken is True
    row = [r for r in registry.snapshot() if r["id"] == "X"][0]
    assert (row["open"], row["connected"], row["worker_pid"]) == (True, True, 100)
    # A reload keeps open entries while open registration stays on ...
    assert registry.configure(["A", "B"], keep_open=True) == []
    assert registry.removed("X") is False
    assert registry.holder("X") == 100
    # ... and the table is full now (A, X, B): a fourth ID recycles only an
    # open entry whose agent has left.
    assert registry.register_open("Y") is False
    assert registry.release("X", 100, claim.serial) is True
    assert registry.register_open("Y") is True
    assert (registry.known("X"), registry.is_open("Y")) == (False, True)
    # Turning open registration off removes the open entries.
    registry.configure(["A", "B"], keep_open=False)
    assert (registry.removed("Y"), registry.known("Y"), registry.known("A")) == \
        (True, False, True)


# -- the link's shared read buffer -------------------------------------------------

def test_link_keep_copies_only_views_of_the_read_buffer():
    from websockify.tunnel import link
    shared = memoryview(link._receive_buffer)
    shared[:6] = b"abcdef"
    own = bytearray(b"mine")
    whole = b"bytes"
    out = [shared[0:3], whole, memoryview(own)[1:], shared[3:6][1:]]
    link.Link.keep(out)
    assert out == [b"abc", b"bytes", b"ine", b"ef"]
    assert type(out[0]) is bytes and type(out[3]) is bytes
    assert out[1] is whole and type(out[2]) is memoryview and out[2].obj is own
    shared[:6] = b"XXXXXX"              # the next read: what was kept is unchanged
    assert out == [b"abc", b"bytes", b"ine", b"ef"]
    del shared
