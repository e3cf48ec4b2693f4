"""Prometheus metrics of one proxy, in a registry of its own (several proxies share a process)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from taidon_proxy.net.session import ClientSession
    from taidon_proxy.services import Services

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Builds take seconds to minutes; clones milliseconds (CoW) to seconds (plain copy).
BUILD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
CLONE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _Live(Collector):
    """Gauges read from the services at scrape time (never stale, nothing to update)."""

    def __init__(self, services: Services) -> None:
        self._services = services

    def collect(self) -> Iterator[Metric]:
        s = self._services
        sessions = s.listener.sessions
        yield GaugeMetricFamily(
            "taidon_connections_open", "Client connections open now", value=len(sessions)
        )
        inst = GaugeMetricFamily(
            "taidon_instances_running", "Instances running now", labels=["isolation"]
        )
        counts = {"shared": 0, "connection": 0}
        for i in s.instances.instances.values():
            counts[i.isolation] = counts.get(i.isolation, 0) + 1
        for isolation, n in sorted(counts.items()):
            inst.add_metric([isolation], n)
        yield inst
        yield CounterMetricFamily(
            "taidon_server_connections_reused",
            "Client connections served on a kept server connection (no new backend)",
            value=s.listener.servers_reused,
        )
        stats = s.evictor.stats
        yield CounterMetricFamily(
            "taidon_evictions",
            "States evicted from the cache",
            value=stats.evicted_states if stats else 0,
        )
        yield CounterMetricFamily(
            "taidon_evicted_bytes",
            "Bytes freed by evicting states",
            value=stats.evicted_bytes if stats else 0,
        )


class Metrics:
    """Counters and histograms fed by the proxy's hooks, plus live gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Counter("taidon_connections", "Client connections accepted", registry=r)
        self.bytes = Counter(
            "taidon_relayed_bytes",
            "Bytes relayed between clients and instances",
            ["direction"],
            registry=r,
        )
        self.builds = Counter("taidon_builds", "Recipe builds finished", ["outcome"], registry=r)
        self.build_seconds = Histogram(
            "taidon_build_seconds", "Duration of recipe builds", buckets=BUILD_BUCKETS, registry=r
        )
        self.cache_hits = Counter(
            "taidon_cache_hits", "Recipe resolutions served from the state cache", registry=r
        )
        self.cache_misses = Counter(
            "taidon_cache_misses", "Recipe resolutions that needed a build", registry=r
        )
        self.clone_seconds = Histogram(
            "taidon_clone_seconds",
            "Duration of snapshot clones",
            ["purpose"],
            buckets=CLONE_BUCKETS,
            registry=r,
        )

    def watch(self, services: Services) -> None:
        """Add the live gauges, read from these services at each scrape."""
        self.registry.register(_Live(services))

    # --- hooks (plain callbacks: the core does not import this module) ----------------------

    def session_opened(self, _session: ClientSession) -> None:
        self.connections.inc()

    def session_closed(self, session: ClientSession) -> None:
        self.bytes.labels("client_to_instance").inc(session.bytes_from_client)
        self.bytes.labels("instance_to_client").inc(session.bytes_to_client)

    def resolved(self, _alias: str, hit: bool) -> None:
        (self.cache_hits if hit else self.cache_misses).inc()

    def built(self, _alias: str, outcome: str, seconds: float) -> None:
        self.builds.labels(outcome).inc()
        self.build_seconds.observe(seconds)

    def cloned(self, prefix: str, seconds: float) -> None:
        purpose = {"i": "instance", "b": "build"}.get(prefix, prefix)
        self.clone_seconds.labels(purpose).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
