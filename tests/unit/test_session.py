"""The session state machine (protocol.session), driven by events alone."""

from hypothesis import given, strategies as st

from websockify.protocol.session import (CLOSED, CLOSING_BY_PEER, CLOSING_BY_US, OPEN,
                                         SessionState)


def test_open_session_reads_both_ways_and_answers_pings():
    state = SessionState()
    assert state.state == OPEN and state.is_open and state.client_readable
    assert not state.closing and not state.exchanged and state.close_code is None


def test_peer_closes_first_its_code_is_echoed_and_logged():
    state = SessionState()
    assert state.peer_closed(4000, "bye") == (4000, "")
    assert state.state == CLOSING_BY_PEER
    assert not state.client_readable and not state.is_open
    assert state.exchanged                         # our reply is queued: hang up once flushed
    assert (state.close_code, state.close_reason) == (4000, "bye")
    # Anything later changes nothing.
    assert state.close(1000, "Target closed") is None
    assert (state.close_code, state.close_reason) == (4000, "bye")


def test_peer_close_without_a_code_is_logged_1005_and_echoed_empty():
    state = SessionState()
    assert state.peer_closed(None, "") == (None, "")
    assert state.close_code == 1005


def test_we_close_first_then_wait_for_the_reply():
    state = SessionState()
    assert state.close(1000, "Target closed") == (1000, "Target closed")
    assert state.state == CLOSING_BY_US
    assert state.client_readable                   # the client's reply is still read
    assert not state.is_open and not state.exchanged
    assert state.peer_closed(1000, "") is None     # no second close frame
    assert state.state == CLOSED and state.exchanged and not state.client_readable
    assert (state.close_code, state.close_reason) == (1000, "Target closed")


def test_second_close_of_ours_sends_nothing():
    state = SessionState()
    state.close(1001, "Server shutting down")
    assert state.close(1011, "Target connection lost") is None
    assert state.close_code == 1001


def test_codec_without_close_reply_is_closed_once_ours_is_queued():
    state = SessionState(awaits_close_reply=False)
    assert state.close(1000, "Target closed") == (1000, "Target closed")
    assert state.state == CLOSED and state.exchanged and not state.client_readable


def test_protocol_error_closes_and_stops_reading_at_once():
    state = SessionState()
    assert state.fail(1002, "unmasked frame") == (1002, "unmasked frame")
    assert state.state == CLOSED and not state.client_readable and state.exchanged
    assert state.close_code == 1002


def test_protocol_error_while_closing_keeps_the_first_reason():
    state = SessionState()
    state.close(1001, "Server shutting down")
    assert state.fail(1009, "too big") is None
    assert state.state == CLOSED and not state.client_readable
    assert (state.close_code, state.close_reason) == (1001, "Server shutting down")


def test_abort_is_1006_unless_a_close_came_first():
    state = SessionState()
    state.abort("client closed the connection without a close frame")
    assert state.state == CLOSED and state.close_code == 1006
    other = SessionState()
    other.peer_closed(1000, "")
    other.abort("reset")
    assert other.close_code == 1000


EVENTS = st.lists(st.sampled_from(["close", "fail", "peer", "abort"]), max_size=8)


@given(EVENTS, st.booleans())
def test_any_event_order_keeps_the_rules(events, awaits_reply):
    state = SessionState(awaits_reply)
    frames = []
    codes = []
    for event in events:
        before = state.state
        if event == "close":
            frame = state.close(1000, "x")
        elif event == "fail":
            frame = state.fail(1002, "y")
        elif event == "peer":
            frame = state.peer_closed(4001, "z")
        else:
            frame = state.abort("gone")
            assert state.state == CLOSED
        if frame is not None:
            assert before == OPEN          # only an open session sends a close frame
            frames.append(frame)
        assert state.state != OPEN         # never reopens
        codes.append(state.close_code)
    assert len(frames) <= 1
    assert len(set(codes)) <= 1            # the first closer's code is the session's
    if {"fail", "peer", "abort"} & set(events) or (events and not awaits_reply):
        assert not state.client_readable
    assert (state.state == OPEN) == (not events)
