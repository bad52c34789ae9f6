"""Live figures of the replies this process streams: how many are in flight, time to first
token and decoding speed over the last hour, what the admin panel's overview shows.

Measured around `PluginContext.converse` (every conversational reply, /ask included), from the
moment the reply was asked for to its first and last piece; a piece is one token on the local
engines. Kept in memory for QUILL's process only: `quill web` on its own has no engine and says so.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

WINDOW_SECONDS = 3600.0


@dataclass(frozen=True)
class Sample:
    """One finished reply."""

    finished: float  # wall-clock time (time.time())
    ttft: float  # seconds from the request to the first piece
    seconds: float  # seconds from the request to the last piece
    pieces: int


@dataclass(frozen=True)
class Live:
    """The overview's engine figures."""

    running: int
    queued: int
    replies: int  # finished in the window
    tokens_per_second: float | None  # decoding speed after the first piece, over the window
    ttft_p50: float | None
    ttft_p95: float | None
    warm_bytes: int | None  # saved conversation states (batched engine), else None


def percentile(values: list[float], share: float) -> float | None:
    """The nearest-rank percentile (`share` 0..1) of `values`, None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered) + 0.5) - 1))]


class ReplyMetrics:
    """Counts replies in flight and keeps a sample per finished reply for WINDOW_SECONDS."""

    def __init__(self, window: float = WINDOW_SECONDS) -> None:
        self.window = window
        self.in_flight = 0
        self.samples: deque[Sample] = deque()

    async def measure(self, pieces: AsyncIterator[str], started: float) -> AsyncIterator[str]:
        """Pass a reply's pieces through, timing them from `started` (time.monotonic())."""
        self.in_flight += 1
        first: float | None = None
        count = 0
        try:
            async for piece in pieces:
                if first is None:
                    first = time.monotonic() - started
                count += 1
                yield piece
        finally:
            self.in_flight -= 1
            if first is not None:
                self.samples.append(Sample(time.time(), first, time.monotonic() - started, count))
            self._trim()

    def _trim(self) -> None:
        oldest = time.time() - self.window
        while self.samples and self.samples[0].finished < oldest:
            self.samples.popleft()

    def recent(self) -> list[Sample]:
        self._trim()
        return list(self.samples)

    def live(self, engine: Any) -> Live:
        """The figures now; `engine`'s own gauges (BatchStats) where it has them."""
        samples = self.recent()
        stats = getattr(engine, "stats", None)
        running = getattr(stats, "running", None)
        if running is None:  # one request at a time (single mode, a server's lock)
            running = min(self.in_flight, 1)
        decoding = sum(max(s.seconds - s.ttft, 0.0) for s in samples)
        pieces = sum(max(s.pieces - 1, 0) for s in samples)
        ttfts = [s.ttft for s in samples]
        return Live(
            running=running,
            queued=max(self.in_flight - running, 0),
            replies=len(samples),
            tokens_per_second=pieces / decoding if decoding > 0 else None,
            ttft_p50=percentile(ttfts, 0.5),
            ttft_p95=percentile(ttfts, 0.95),
            warm_bytes=getattr(stats, "warm_bytes", None),
        )
