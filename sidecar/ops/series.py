"""Metric series as plain numbers, turned into Prometheus families at scrape time (no web layer here).

Components count in plain Python numbers (no locks, no label lookups: prometheus_client's own metric objects
cost several microseconds per update) and give `sidecar.ops.metrics.Metrics` a collector that yields these
families; leases, the writer, the upstream pool and the rest depend on this module only.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0)


class Hist:
    """A histogram as plain numbers: one count per bucket (the last is +Inf), a sum and a count."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, float(running)))
        return out


def counter(name: str, doc: str, labels: tuple[str, ...], values: dict[tuple[str, ...], float]) -> Metric:
    """A counter family from plain numbers, for components' own collectors."""
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, n in values.items():
        family.add_metric(key, n)
    return family


def gauge(name: str, doc: str, labels: tuple[str, ...], values: dict[tuple[str, ...], float]) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for key, n in values.items():
        family.add_metric(key, n)
    return family


def histogram(name: str, doc: str, hist: Hist) -> Metric:
    """A histogram family without labels, from a `Hist`."""
    family = HistogramMetricFamily(name, doc, labels=())
    family.add_metric((), hist.buckets(), hist.total)
    return family


def histograms(name: str, doc: str, labels: tuple[str, ...], hists: dict[tuple[str, ...], Hist]) -> Metric:
    """A histogram family with labels, one `Hist` per label set."""
    family = HistogramMetricFamily(name, doc, labels=labels)
    for key, hist in hists.items():
        family.add_metric(key, hist.buckets(), hist.total)
    return family
