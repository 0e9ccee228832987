"""
Prometheus metrics, on a registry owned by the service rather than the global one.

Each capability registers its own collectors on the registry it is given, so tests
can build as many services as they like in one process.  The per-request HTTP
figures are kept in plain Python numbers and turned into metric families only
when scraped: prometheus-client's own counters take a lock per increment, five
times per request, which is too dear on the hottest path.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

#: Methods that get their own label value; anything else is counted as "other".
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

#: Buckets (seconds) sized for an API whose answers take milliseconds.
LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


def new_registry() -> CollectorRegistry:
    """A registry with the process and platform collectors on it."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class _Series:
    """One (method, route) histogram and its counts by status."""

    __slots__ = ("buckets", "by_status", "total")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0
        self.by_status: dict[int, int] = {}


class HttpMetrics:
    """
    Request counts by method, route template and status; durations by method
    and route; requests in flight; open connections, and what the server
    refused before routing (by reason).
    """

    def __init__(
        self, registry: CollectorRegistry, in_flight: Callable[[], int] = lambda: 0
    ) -> None:
        self._series: dict[tuple[str, str], _Series] = {}
        self._refusals: dict[str, int] = {}
        self.in_flight = in_flight
        self.open_connections: Callable[[], int] = lambda: 0
        registry.register(self)

    def refused(self, reason: str) -> None:
        """Count a request or connection refused before routing."""
        self._refusals[reason] = self._refusals.get(reason, 0) + 1

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        if method not in KNOWN_METHODS:
            method = "other"
        series = self._series.get((method, route))
        if series is None:
            series = self._series[(method, route)] = _Series()
        series.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        series.total += seconds
        series.by_status[status] = series.by_status.get(status, 0) + 1

    def describe(self) -> Iterator[Metric]:
        return iter(())  # collected lazily; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "optiinfra_http_requests",
            "HTTP requests answered, by method, route template and status.",
            labels=("method", "route", "status"),
        )
        duration = HistogramMetricFamily(
            "optiinfra_http_request_duration_seconds",
            "Time from the request line to the last byte handed to the transport.",
            labels=("method", "route"),
        )
        for (method, route), series in sorted(self._series.items()):
            for status, count in sorted(series.by_status.items()):
                requests.add_metric((method, route, str(status)), count)
            cumulative, buckets = 0, []
            for bound, count in zip(
                (*map(str, LATENCY_BUCKETS), "+Inf"), series.buckets, strict=True
            ):
                cumulative += count
                buckets.append((bound, cumulative))
            duration.add_metric((method, route), buckets, series.total)
        yield requests
        yield duration
        yield GaugeMetricFamily(
            "optiinfra_http_requests_in_flight",
            "Requests received and not yet answered.",
            value=self.in_flight(),
        )
        yield GaugeMetricFamily(
            "optiinfra_http_open_connections",
            "Client connections open now.",
            value=self.open_connections(),
        )
        refused = CounterMetricFamily(
            "optiinfra_http_refused",
            "Requests and connections refused before routing, by reason:"
            " too_many_connections, header_timeout, body_too_slow, bad_request,"
            " request_line_too_long, header_too_large, body_too_large.",
            labels=("reason",),
        )
        for reason, count in sorted(self._refusals.items()):
            refused.add_metric((reason,), count)
        yield refused
