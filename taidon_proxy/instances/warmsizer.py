"""How many spares an automatic warm pool keeps: sized from the recent connect rate.

Sans-IO: the manager reports arrivals (a client asked a recipe for a per-connection
instance) and how long starting one took; this says how many started, unused instances
would let the next client skip the start. By Little's law, while a spare is being made
`rate x start time` clients arrive, so the pool needs that many plus one. A recipe with no
steady stream (fewer than `min_arrivals` in the window) gets none, and its spares go once
the window passes without a client.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable

WINDOW_S = 30.0  # how far back arrivals count
MIN_ARRIVALS = 3  # fewer in the window is not a stream: no spares
START_GUESS_S = 0.1  # a start time to size with before one was measured
EWMA = 0.3  # weight of the newest start time


class WarmSizer:
    def __init__(
        self,
        ceiling: int,
        *,
        window_s: float = WINDOW_S,
        min_arrivals: int = MIN_ARRIVALS,
    ) -> None:
        self.ceiling = ceiling
        self.window_s = window_s
        self.min_arrivals = min_arrivals
        self._arrivals: dict[Hashable, deque[float]] = {}
        self._start_s: dict[Hashable, float] = {}

    def arrived(self, key: Hashable, now: float) -> None:
        q = self._arrivals.setdefault(key, deque())
        q.append(now)
        self._trim(q, now)

    def started(self, key: Hashable, seconds: float) -> None:
        """A start of this key's kind took `seconds` (clone + server + first connect)."""
        old = self._start_s.get(key)
        self._start_s[key] = seconds if old is None else (1 - EWMA) * old + EWMA * seconds

    def rate(self, key: Hashable, now: float) -> float:
        """Arrivals per second over the window (0 when it is not a stream)."""
        q = self._arrivals.get(key)
        if not q:
            return 0.0
        self._trim(q, now)
        if len(q) < self.min_arrivals:
            return 0.0
        # Over the span actually seen, so a stream that began 5 s ago is not diluted by 30.
        span = max(now - q[0], 1.0)
        return len(q) / span

    def target(self, key: Hashable, now: float) -> int:
        rate = self.rate(key, now)
        if rate == 0.0:
            return 0
        need = math.ceil(rate * self._start_s.get(key, START_GUESS_S)) + 1
        return min(self.ceiling, need)

    def forget(self, key: Hashable, now: float) -> bool:
        """True (and the key's history dropped) when no client came within the window."""
        q = self._arrivals.get(key)
        if q is not None:
            self._trim(q, now)
            if q:
                return False
        self._arrivals.pop(key, None)
        self._start_s.pop(key, None)
        return True

    def _trim(self, q: deque[float], now: float) -> None:
        while q and q[0] < now - self.window_s:
            q.popleft()
