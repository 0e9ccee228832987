"""
Prometheus metrics, on a registry owned by the service rather than the global one.

Each capability registers its own collectors on the registry it is given, so tests
can build as many services as they like in one process.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

#: Methods that get their own label value; anything else is counted as "other".
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

#: Buckets (seconds) sized for an API whose answers take milliseconds.
LATENCY_BUCKETS = (
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


class HttpMetrics:
    """Request counts, durations and in-flight requests, labelled cheaply."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._requests = Counter(
            "optiinfra_http_requests",
            "HTTP requests answered, by method, route template and status.",
            ("method", "route", "status"),
            registry=registry,
        )
        self._duration = Histogram(
            "optiinfra_http_request_duration_seconds",
            "Time from the request line to the last byte handed to the transport.",
            ("method", "route"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "optiinfra_http_requests_in_flight",
            "Requests received and not yet answered.",
            registry=registry,
        )
        # labels() takes a lock and builds a tuple each call; the hot path keeps
        # the children it has already made.
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        if method not in KNOWN_METHODS:
            method = "other"
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = (
                self._requests.labels(method, route, str(status)),
                self._duration.labels(method, route),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)
