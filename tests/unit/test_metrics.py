"""--metrics without sockets: the counter layout, folding dead workers, the exposition, answer()."""

import pytest
from hypothesis import given, settings, strategies as st

from websockify.arbiter import scoreboard as sb
from websockify.metrics import counters as c
from websockify.metrics.endpoint import answer
from websockify.metrics.exposition import Snapshot, render

parser = pytest.importorskip("prometheus_client.parser")


def parsed(text: bytes) -> dict:
    samples = {}
    for family in parser.text_string_to_metric_families(text.decode("utf-8")):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


@pytest.fixture
def block():
    saved = c.words
    fresh = c.new_block()
    c.attach(fresh)
    yield fresh
    c.attach(saved)


@pytest.mark.parametrize("code, outcome", [
    (1000, "normal"), (1005, "normal"), (1001, "going_away"), (1002, "protocol_error"),
    (1007, "protocol_error"), (1008, "policy_violation"), (1009, "too_big"),
    (1011, "server_error"), (1006, "abnormal"), (None, "abnormal"), (4000, "other"),
])
def test_outcomes_by_close_code(code, outcome):
    assert c.outcome_of(code) == outcome


def test_histogram_buckets_are_cumulative_and_the_sum_in_microseconds(block):
    for seconds in (0.0005, 0.001, 0.003, 0.2, 11.0):
        c.handshake_done(seconds)
    pairs = c.HANDSHAKE.buckets(block)
    assert pairs[0] == (0.001, 2)          # le is inclusive: 0.001 is in the first bucket
    assert dict(pairs)[0.005] == 3
    assert dict(pairs)[0.25] == 4
    assert dict(pairs)[10.0] == 4
    assert pairs[-1] == (float("inf"), 5)
    assert block[c.HANDSHAKE.count] == 5
    assert block[c.HANDSHAKE.sum] == 500 + 1000 + 3000 + 200000 + 11000000


def test_a_session_moves_from_open_to_its_outcome(block):
    c.session_opened()
    c.session_opened()
    assert block[c.SESSIONS_OPEN] == 2
    c.session_closed(1000, 2.0)
    c.session_closed(None, 0.05)
    assert block[c.SESSIONS_OPEN] == 0
    assert block[c.SESSIONS["normal"]] == 1
    assert block[c.SESSIONS["abnormal"]] == 1
    assert block[c.SESSION.count] == 2


def test_refusals_outside_the_list_are_other(block):
    c.refused(404)
    c.refused(418)
    assert block[c.REFUSALS["404"]] == 1
    assert block[c.REFUSALS["other"]] == 1


def test_a_released_slot_is_folded_and_its_gauges_dropped():
    pool = sb.SlotPool(2)
    first, second = pool.allocate(), pool.allocate()
    first.token_plugin = second.token_plugin = "TokenFile"
    for slot, sessions in ((first, 3), (second, 4)):
        words = slot.counters()
        words[c.SESSIONS["normal"]] = sessions
        words[c.SESSIONS_OPEN] = 2
        words[c.LOOKUPS["found"]] = sessions * 10
    total, lookups = pool.totals.sum(pool.live_counters())
    assert total[c.SESSIONS["normal"]] == 7
    assert total[c.SESSIONS_OPEN] == 4
    assert lookups == {"TokenFile": [70, 0, 0, 0, 0, 0, 0]}
    pool.release(first)                       # its worker exited
    total, lookups = pool.totals.sum(pool.live_counters())
    assert total[c.SESSIONS["normal"]] == 7   # kept
    assert total[c.SESSIONS_OPEN] == 2        # only the live worker's
    assert lookups["TokenFile"][0] == 70
    again = pool.allocate()                   # the same slot, for a new worker
    assert again is first
    assert list(again.counters()) == [0] * c.BLOCK_WORDS
    again.token_plugin = "TokenRedis"         # a reload changed the plugin
    again.counters()[c.LOOKUPS["not_found"]] = 5
    total, lookups = pool.totals.sum(pool.live_counters())
    assert lookups == {"TokenFile": [70, 0, 0, 0, 0, 0, 0], "TokenRedis": [0, 5, 0, 0, 0, 0, 0]}


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1000)), max_size=40))
def test_sums_never_go_backwards_whatever_workers_count_and_die(events):
    """Any sequence of counting and exiting: every counter's sum only grows."""
    pool = sb.SlotPool(2)
    live = [pool.allocate() for _ in range(2)]
    previous = pool.totals.sum(pool.live_counters())[0]
    for who, amount in events:
        if who == 3:
            pool.release(live.pop(0))
            live.append(pool.allocate())
        else:
            words = live[who % len(live)].counters()
            words[c.BYTES_TO_CLIENT] += amount
            words[c.SESSIONS["normal"]] += 1
        now = pool.totals.sum(pool.live_counters())[0]
        gauges = set(c.LAYOUT.gauges)
        assert all(now[i] >= previous[i] for i in range(c.BLOCK_WORDS) if i not in gauges)
        previous = now


def test_the_exposition_parses_back_to_the_snapshot():
    words = [0] * c.BLOCK_WORDS
    words[c.SESSIONS["normal"]] = 12
    words[c.SESSIONS_OPEN] = 3
    words[c.REFUSALS["403"]] = 2
    words[c.BYTES_FROM_CLIENT] = 1 << 40
    words[c.TLS_HANDSHAKES], words[c.TLS_FAILURES] = 9, 1
    c.SESSION.observe(words, 30.0)
    text = render(Snapshot(words=words, lookups={'Token"Odd\\': [4, 1, 0, 0, 0, 0, 0]},
                           workers_serving=2, worker_restarts=1, reloads=3,
                           start_time=1700000000.5, tunnels=(5, 17)))
    samples = parsed(text)
    assert samples[("websockify_sessions_total", (("outcome", "normal"),))] == 12
    assert samples[("websockify_sessions_open", ())] == 3
    assert samples[("websockify_refusals_total", (("status", "403"),))] == 2
    assert samples[("websockify_bytes_total", (("direction", "from_client"),))] == 1 << 40
    assert samples[("websockify_tls_handshakes_total", ())] == 9
    assert samples[("websockify_tls_handshake_failures_total", ())] == 1
    assert samples[("websockify_token_lookups_total",
                    (("plugin", 'Token"Odd\\'), ("result", "found")))] == 4
    assert samples[("websockify_session_duration_seconds_bucket", (("le", "10.0"),))] == 0
    assert samples[("websockify_session_duration_seconds_bucket", (("le", "60.0"),))] == 1
    assert samples[("websockify_session_duration_seconds_sum", ())] == 30.0
    assert samples[("websockify_workers", ())] == 2
    assert samples[("websockify_worker_restarts_total", ())] == 1
    assert samples[("websockify_reloads_total", ())] == 3
    assert samples[("websockify_tunnel_agents_connected", ())] == 5
    assert samples[("websockify_tunnel_streams_open", ())] == 17
    assert samples[("websockify_start_time_seconds", ())] == 1700000000.5


def test_without_tunnels_their_families_are_absent():
    text = render(Snapshot(words=[0] * c.BLOCK_WORDS))
    assert b"websockify_tunnel" not in text
    assert b"websockify_token_lookups_total" in text    # the family, with no samples


def _ok():
    return True


def _metrics():
    return b"metrics body\n"


@pytest.mark.parametrize("head, status", [
    (b"GET /metrics HTTP/1.1\r\nHost: x", 200),
    (b"GET /metrics?name=x HTTP/1.0", 200),
    (b"HEAD /metrics HTTP/1.1", 200),
    (b"GET /healthz HTTP/1.1", 200),
    (b"GET / HTTP/1.1", 404),
    (b"GET /metricsx HTTP/1.1", 404),
    (b"GET /metrics HTTP/1.1\r\nUpgrade: websocket", 404),
    (b"DELETE /metrics HTTP/1.1", 405),
    (b"GET /metrics", 400),
    (b"GET /metrics SPDY/3", 400),
    (b"GET /metrics HTTP/1.1\r\nno colon here", 400),
])
def test_answer(head, status):
    got, reply = answer(head, _ok, _metrics)
    assert got == status
    assert reply.startswith(b"HTTP/1.1 %d " % status)
    assert b"\r\nConnection: close\r\n" in reply


def test_answer_bodies():
    assert answer(b"GET /metrics HTTP/1.1", _ok, _metrics)[1].endswith(b"\r\n\r\nmetrics body\n")
    head_only = answer(b"HEAD /metrics HTTP/1.1", _ok, _metrics)[1]
    assert head_only.endswith(b"\r\n\r\n") and b"Content-Length: 13\r\n" in head_only
    status, reply = answer(b"GET /healthz HTTP/1.1", lambda: False, _metrics)
    assert status == 503 and reply.endswith(b"no worker is serving\n")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_answer_never_fails_on_any_bytes(head):
    status, reply = answer(head, _ok, _metrics)
    assert status in (200, 400, 404, 405)
    assert reply.startswith(b"HTTP/1.1 %d " % status)
