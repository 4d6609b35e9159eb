"""Prometheus metrics of one key broker, in its own registry.

Each broker (and each test) gets its own :class:`CollectorRegistry` rather than the global
one, so two brokers in one process never collide and nothing else's metrics leak into
``/metrics``. Label values come from small fixed sets (KEM names, rule names, route
templates, HTTP methods with anything unusual counted as ``other``), never from key ids or
client input, to keep cardinality bounded. The labelled children are looked up once and
kept, so counting a release costs a dictionary lookup rather than ``labels()`` each time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["BrokerMetrics"]

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class BrokerMetrics:
    """Counters of releases and denials, request latency, and the number of keys."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.releases = Counter(
            "enclaveml_kbs_releases", "Keys released to attested workloads.", ["kem"], registry=self.registry
        )
        self.denials = Counter(
            "enclaveml_kbs_denials",
            "Release requests refused, by the rule that refused them.",
            ["rule"],
            registry=self.registry,
        )
        self.requests = Histogram(
            "enclaveml_kbs_request_seconds",
            "HTTP request latency by route template, method and status.",
            ["route", "method", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.keys = Gauge("enclaveml_kbs_keys", "Keys held by the broker.", registry=self.registry)
        # Labelled children, looked up once: ``labels()`` validates and locks on every call.
        self._children: dict[tuple[object, ...], Any] = {}

    def _child(self, metric: Counter | Histogram, *values: str) -> Any:
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children.setdefault(key, metric.labels(*values))
        return child

    def count_release(self, kem: str) -> None:
        self._child(self.releases, kem).inc()

    def count_denial(self, rule: str) -> None:
        self._child(self.denials, rule).inc()

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        method = method if method in _METHODS else "other"  # clients choose the method token
        self._child(self.requests, route, method, str(status)).observe(seconds)

    def count_keys_with(self, counter: Callable[[], int]) -> None:
        """Read the key count at scrape time (always current, nothing to keep in sync)."""
        self.keys.set_function(lambda: float(counter()))

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
