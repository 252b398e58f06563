"""The per-worker counters behind --metrics: their layout and the worker's ways to bump them.

Every worker owns one block of 8-byte words in a region the master maps
before forking (arbiter/scoreboard.py); only that worker writes it, the
master reads every block and, when a worker exits, folds its block into
a retired total (``Totals``) so that no counter ever goes backwards.  Until
a worker attaches its block (and in a library caller's own process, or in
tests without a master) the counters live in a private buffer.

Counting is one add into a memoryview: cheap enough for the relay's data
path.  Durations are kept as whole microseconds, histograms as one count
per bucket (made cumulative by the exposition).
"""

import bisect
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

WORD = 8

#: Outcomes of a session, by the close code its state ended with.
OUTCOMES = ("normal", "going_away", "protocol_error", "policy_violation", "too_big",
            "server_error", "abnormal", "other")
_OUTCOME_BY_CODE = {1000: "normal", 1005: "normal", 1001: "going_away",
                    1002: "protocol_error", 1003: "protocol_error", 1007: "protocol_error",
                    1010: "protocol_error", 1008: "policy_violation", 1009: "too_big",
                    1011: "server_error", 1012: "server_error", 1013: "server_error",
                    1014: "server_error", 1006: "abnormal", None: "abnormal"}

#: HTTP statuses a refusal is counted under; any other is "other".
STATUSES = ("400", "401", "403", "404", "405", "408", "409", "413", "426", "429", "431",
            "500", "502", "503", "504", "other")

#: Token lookups by result (plugins/tokens: each refusal class is one result).
LOOKUP_RESULTS = ("found", "not_found", "missing", "refused", "bad_target", "unavailable",
                  "failed")

#: Histogram upper bounds, in seconds (+Inf is the last bucket).
HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0)
SESSION_BUCKETS = (0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 14400.0, 86400.0)


class Layout:
    """Names -> word indexes in one worker's block, fixed at import."""

    def __init__(self) -> None:
        self.size = 0
        #: Words that are gauges: a dead worker's are not folded (it holds nothing now).
        self.gauges: List[int] = []

    def word(self, gauge: bool = False) -> int:
        index = self.size
        self.size += 1
        if gauge:
            self.gauges.append(index)
        return index

    def words(self, names: Sequence[str]) -> Dict[str, int]:
        return {name: self.word() for name in names}

    def histogram(self, bounds: Sequence[float]) -> "HistogramWords":
        first = self.size
        self.size += len(bounds) + 1 + 2      # buckets, +Inf, count, sum (µs)
        return HistogramWords(first, tuple(bounds))


class HistogramWords:
    """Where one histogram lives in a block: a word per bucket, then count and sum."""

    __slots__ = ("first", "bounds", "count", "sum")

    def __init__(self, first: int, bounds: Tuple[float, ...]):
        self.first = first
        self.bounds = bounds
        self.count = first + len(bounds) + 1
        self.sum = self.count + 1

    def observe(self, words, seconds: float) -> None:
        words[self.first + bisect.bisect_left(self.bounds, seconds)] += 1
        words[self.count] += 1
        words[self.sum] += int(seconds * 1_000_000)

    def buckets(self, words) -> List[Tuple[float, int]]:
        """(upper bound, cumulative count) pairs, +Inf last."""
        running, pairs = 0, []
        for offset, bound in enumerate(self.bounds + (float("inf"),)):
            running += words[self.first + offset]
            pairs.append((bound, running))
        return pairs


LAYOUT = Layout()
SESSIONS_OPEN = LAYOUT.word(gauge=True)
SESSIONS = LAYOUT.words(OUTCOMES)
REFUSALS = LAYOUT.words(STATUSES)
LOOKUPS = LAYOUT.words(LOOKUP_RESULTS)
CONNECTIONS = LAYOUT.word()
TLS_HANDSHAKES = LAYOUT.word()
TLS_FAILURES = LAYOUT.word()
BYTES_FROM_CLIENT = LAYOUT.word()
BYTES_TO_CLIENT = LAYOUT.word()
HANDSHAKE = LAYOUT.histogram(HANDSHAKE_BUCKETS)
SESSION = LAYOUT.histogram(SESSION_BUCKETS)
BLOCK_WORDS = LAYOUT.size
BLOCK_SIZE = BLOCK_WORDS * WORD


def outcome_of(close_code: Optional[int]) -> str:
    return _OUTCOME_BY_CODE.get(close_code, "other")


def new_block() -> memoryview:
    """A private block (no master): counting works, nobody reads it."""
    return memoryview(bytearray(BLOCK_SIZE)).cast("q")


#: This process's block; a worker replaces it with its slot's (attach()).
words: memoryview = new_block()


def attach(block: memoryview) -> None:
    """Count into ``block`` from now on (a worker, after fork: its scoreboard slot)."""
    global words
    words = block


# -- the worker's ways to count ------------------------------------------------------
# Each reads the module's current block, so code holding none of these stays right
# after attach().

def connection_accepted() -> None:
    words[CONNECTIONS] += 1


def refused(status: int) -> None:
    words[REFUSALS.get(str(status), REFUSALS["other"])] += 1


def handshake_done(seconds: float) -> None:
    HANDSHAKE.observe(words, seconds)


def tls_handshake(ok: bool) -> None:
    block = words
    block[TLS_HANDSHAKES] += 1
    if not ok:
        block[TLS_FAILURES] += 1


def token_lookup(result: str) -> None:
    words[LOOKUPS[result]] += 1


def session_opened() -> None:
    words[SESSIONS_OPEN] += 1


def session_closed(close_code: Optional[int], seconds: float) -> None:
    block = words
    block[SESSIONS_OPEN] -= 1
    block[SESSIONS[outcome_of(close_code)]] += 1
    SESSION.observe(block, seconds)


class Totals:
    """Blocks summed: the retired workers' folded counters plus the live ones.

    Token lookups are kept per plugin name (a reload may change the plugin:
    each worker's lookups stay under the plugin it was started with).
    """

    def __init__(self) -> None:
        self.retired: List[int] = [0] * BLOCK_WORDS
        self.retired_lookups: Dict[str, List[int]] = {}

    def fold(self, block: Sequence[int], plugin: str = "") -> None:
        """A worker exited: keep what it counted (its gauges die with it)."""
        retired, gauges = self.retired, set(LAYOUT.gauges)
        for index in range(BLOCK_WORDS):
            if index not in gauges:
                retired[index] += block[index]
        if plugin:
            _add_lookups(self.retired_lookups, plugin, block)

    def sum(self, live: Iterable[Tuple[str, Sequence[int]]]
            ) -> Tuple[List[int], Dict[str, List[int]]]:
        """(every word summed, lookups per plugin) over the retired and ``live`` blocks."""
        total = list(self.retired)
        lookups = {plugin: list(counts) for plugin, counts in self.retired_lookups.items()}
        for plugin, block in live:
            for index in range(BLOCK_WORDS):
                total[index] += block[index]
            if plugin:
                _add_lookups(lookups, plugin, block)
        return total, lookups


def _add_lookups(by_plugin: Dict[str, List[int]], plugin: str, block: Sequence[int]) -> None:
    """Add ``block``'s token lookups, in LOOKUP_RESULTS order, to ``plugin``'s counts."""
    counts = by_plugin.setdefault(plugin, [0] * len(LOOKUP_RESULTS))
    for position, result in enumerate(LOOKUP_RESULTS):
        counts[position] += block[LOOKUPS[result]]
