"""When the agent dials again: exponential back-off with full jitter (pure).

After the n-th failure in a row the agent waits a random time in
``[0, min(cap, base * 2**n))`` ("full jitter": agents that lost the same
server do not come back in step).  A connection that stayed up for
``reset_after`` seconds starts the ladder again; a server that refused the
agent's credentials (401/403) is asked again only after ``cap``, since a
new token or certificate takes a human or a parent process.

No clock and no sleeping here: the caller says how long it was connected
and sleeps the delay it gets; the random source is a parameter.
"""

import random as _random
from typing import Callable

BASE = 0.5
CAP = 30.0
RESET_AFTER = 30.0


class Backoff:
    """The delay before the next connection attempt, from what became of the last."""

    def __init__(self, base: float = BASE, cap: float = CAP, reset_after: float = RESET_AFTER,
                 random: Callable[[], float] = _random.random):
        if not 0 < base <= cap:
            raise ValueError("back-off needs 0 < base <= cap")
        self.base = base
        self.cap = cap
        self.reset_after = reset_after
        self.random = random        # uniform in [0, 1)
        self.failures = 0           # failed attempts since the last good connection

    def ceiling(self) -> float:
        """The most the next failure may wait: base doubled per failure, at most cap."""
        # The exponent is bounded so that a long outage cannot overflow it.
        return min(self.cap, self.base * 2.0 ** min(self.failures, 64))

    def failed(self) -> float:
        """A connection attempt failed (or a session ended early): the delay to wait."""
        delay = self.random() * self.ceiling()
        self.failures += 1
        return delay

    def refused(self) -> float:
        """The server refused the credentials (401/403): wait the cap."""
        self.failures += 1
        return self.cap

    def disconnected(self, connected_for: float) -> float:
        """A session that had been connected for ``connected_for`` seconds ended."""
        if connected_for >= self.reset_after:
            self.reset()
        return self.failed()

    def reset(self) -> None:
        self.failures = 0
