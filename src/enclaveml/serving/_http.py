"""Prometheus export of the dynamic batchers' counters (per-route HTTP counters: :mod:`enclaveml._web`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from enclaveml.serving._batching import DynamicBatcher

__all__ = ["BatcherCollector"]


class BatcherCollector(Collector):
    """Exports the counters of every live batcher at scrape time (no double bookkeeping)."""

    def __init__(self, batchers: Callable[[], Mapping[str, DynamicBatcher]]) -> None:
        self._batchers = batchers

    def collect(self) -> Iterator[Metric]:
        queued = GaugeMetricFamily(
            "enclaveml_batcher_queued", "requests waiting for a batch", labels=["model"]
        )
        requests = CounterMetricFamily(
            "enclaveml_batcher_requests", "requests by outcome", labels=["model", "outcome"]
        )
        batches = HistogramMetricFamily("enclaveml_batch_rows", "rows per ORT call", labels=["model"])
        for model, batcher in sorted(self._batchers().items()):
            stats = batcher.stats
            queued.add_metric([model], stats.queued)
            for outcome in ("submitted", "completed", "rejected", "timed_out", "cancelled", "failed"):
                requests.add_metric([model, outcome], getattr(stats, outcome))
            sizes = dict(stats.batch_sizes)
            edges = [1, 2, 4, 8, 16, 32, 64, 128]
            buckets = [(str(float(e)), float(sum(n for s, n in sizes.items() if s <= e))) for e in edges]
            buckets.append(("+Inf", float(stats.batches)))
            batches.add_metric([model], buckets, float(stats.rows))
        yield queued
        yield requests
        yield batches
