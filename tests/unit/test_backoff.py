"""The agent's reconnect delays: full jitter from 0.5 s to 30 s, reset, refusals."""

import pytest
from hypothesis import given, strategies as st

from websockify.agent.backoff import Backoff


class Fixed:
    """A random source that answers the values it was given, in turn."""

    def __init__(self, *values):
        self.values = list(values)

    def __call__(self):
        return self.values.pop(0)


def test_ceilings_double_from_half_a_second_to_the_cap():
    backoff = Backoff(random=lambda: 1.0)
    delays = [backoff.failed() for _ in range(9)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_full_jitter_scales_the_ceiling():
    backoff = Backoff(random=Fixed(0.5, 0.25, 0.0, 0.75))
    assert [backoff.failed() for _ in range(4)] == [0.25, 0.25, 0.0, 3.0]
    assert backoff.failures == 4


def test_a_long_connection_resets_the_ladder():
    backoff = Backoff(random=lambda: 1.0)
    for _ in range(5):
        backoff.failed()
    assert backoff.ceiling() == 16.0
    assert backoff.disconnected(30.0) == 0.5
    assert backoff.failures == 1


def test_a_short_connection_keeps_climbing():
    backoff = Backoff(random=lambda: 1.0)
    assert backoff.failed() == 0.5
    assert backoff.disconnected(29.9) == 1.0
    assert backoff.disconnected(0.0) == 2.0


def test_a_refusal_waits_the_cap_without_jitter():
    backoff = Backoff(random=lambda: 0.1)
    assert backoff.refused() == 30.0
    assert backoff.refused() == 30.0
    assert backoff.failed() == pytest.approx(0.1 * 2.0)


def test_other_bounds():
    backoff = Backoff(base=1.0, cap=5.0, reset_after=2.0, random=lambda: 1.0)
    assert [backoff.failed() for _ in range(4)] == [1.0, 2.0, 4.0, 5.0]
    assert backoff.disconnected(2.0) == 1.0


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError):
        Backoff(base=0.0)
    with pytest.raises(ValueError):
        Backoff(base=31.0, cap=30.0)


def test_a_long_outage_cannot_overflow():
    backoff = Backoff(random=lambda: 1.0)
    backoff.failures = 10 ** 6
    assert backoff.failed() == 30.0


@given(st.lists(st.tuples(st.sampled_from(["failed", "refused", "disconnected"]),
                          st.floats(0, 1, exclude_max=True), st.floats(0, 100))))
def test_delays_stay_within_zero_and_the_cap(steps):
    values = [value for _, value, _ in steps]
    backoff = Backoff(random=lambda: values.pop(0))
    for kind, _, connected_for in steps:
        if kind == "failed":
            delay = backoff.failed()
        elif kind == "refused":
            delay = backoff.refused()
            values.pop(0)
        else:
            delay = backoff.disconnected(connected_for)
        assert 0.0 <= delay <= 30.0
