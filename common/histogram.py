"""Histograms as Prometheus keeps them, as plain data that travels between processes."""

from __future__ import annotations

from collections.abc import Iterable

#: Buckets (seconds) of the put-with-callback completion and the flush duration histograms.
PUT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
FLUSH_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Cumulative bucket counts and a sum, as Prometheus keeps them; plain data, so it
    travels in a PONG (``as_dict``) and is rebuilt on the other side (``from_dict``)."""

    def __init__(self, buckets: Iterable[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one: +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def as_dict(self) -> dict:
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.total}

    @classmethod
    def from_dict(cls, data) -> Histogram | None:
        """The histogram ``data`` describes, or None when it does not fit."""
        try:
            hist = cls(float(b) for b in data["buckets"])
            counts = [int(c) for c in data["counts"]]
            total = float(data["sum"])
        except (KeyError, TypeError, ValueError):
            return None
        if len(counts) != len(hist.counts):
            return None
        hist.counts, hist.total = counts, total
        return hist

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, count of values at or below it), as prometheus_client wants them."""
        out, running = [], 0
        for bound, n in zip((*map(str, self.buckets), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out
