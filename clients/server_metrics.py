"""Read ``dispider-serve``'s ``GET /metrics`` (Prometheus text): counters, gauges and histogram quantiles.

A scrape is a :class:`MetricsSnapshot`; the difference of two histograms covers what happened between the
scrapes, and its quantiles are interpolated within buckets as Prometheus' ``histogram_quantile`` does (so they
are estimates, as fine as the buckets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

# The server's histograms this package reads (see serve/metrics.py).
DECISION_LATENCY = "dispider_decision_latency_seconds"
PERCEPTION_LATENCY = "dispider_perception_latency_seconds"
TIME_TO_FIRST_TOKEN = "dispider_reaction_time_to_first_token_seconds"
QUEUE_WAIT = "dispider_reaction_queue_wait_seconds"


@dataclass(frozen=True)
class Histogram:
    buckets: tuple[tuple[float, float], ...]  # (upper bound, cumulative count), ascending, ending at +inf
    count: float
    total: float  # the sum of observations

    def minus(self, earlier: Histogram | None) -> Histogram:
        if earlier is None:
            return self
        before = dict(earlier.buckets)
        return Histogram(tuple((le, n - before.get(le, 0.0)) for le, n in self.buckets),
                         self.count - earlier.count, self.total - earlier.total)

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count > 0 else None

    def quantile(self, q: float) -> float | None:
        """Estimate (linear within the bucket); None without observations. Beyond the last finite bound: that bound."""
        if self.count <= 0:
            return None
        rank, lower, below = q * self.count, 0.0, 0.0
        for upper, cumulative in self.buckets:
            if cumulative >= rank:
                if math.isinf(upper):
                    return lower
                inside = cumulative - below
                return lower + (upper - lower) * ((rank - below) / inside if inside > 0 else 1.0)
            lower, below = upper, cumulative
        return lower

    def summary(self) -> dict:
        return {"count": int(self.count), "mean": _round(self.mean), "p50": _round(self.quantile(0.5)),
                "p90": _round(self.quantile(0.9)), "p99": _round(self.quantile(0.99))}


@dataclass(frozen=True)
class MetricsSnapshot:
    samples: tuple[tuple[str, dict, float], ...]  # (sample name, labels, value)

    @classmethod
    def parse(cls, text: str) -> MetricsSnapshot:
        return cls(tuple((s.name, dict(s.labels), float(s.value))
                         for family in text_string_to_metric_families(text) for s in family.samples))

    def value(self, name: str, **labels: str) -> float | None:
        """The sum of the samples named ``name`` whose labels include ``labels``; None when there is none."""
        found = [v for n, lab, v in self.samples if n == name and all(lab.get(k) == x for k, x in labels.items())]
        return sum(found) if found else None

    def histogram(self, name: str) -> Histogram | None:
        buckets: dict[float, float] = {}
        for sample_name, labels, value in self.samples:
            if sample_name == name + "_bucket":
                bound = float(labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + value
        if not buckets:
            return None
        return Histogram(tuple(sorted(buckets.items())), self.value(name + "_count") or 0.0,
                         self.value(name + "_sum") or 0.0)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def decision_gate_delta(before: MetricsSnapshot | None, after: MetricsSnapshot) -> dict | None:
    """The decision gate between two scrapes (a server run with ``--decision-gate-ms``): the sidecar's holds, the
    reaction steps that looked at it and that waited, and their seconds waited; None on a server without the gate."""
    if after.value("dispider_decision_gate_checks_total") is None:
        return None

    def counted(counter: str) -> float:
        name = f"dispider_decision_gate_{counter}_total"
        return (after.value(name) or 0) - ((before.value(name) or 0) if before else 0)

    return {"holds": int(counted("holds")), "checks": int(counted("checks")), "waits": int(counted("waits")),
            "wait_seconds": round(counted("wait_seconds"), 3)}
