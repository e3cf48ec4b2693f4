"""Prometheus metrics of one proxy, in a registry of its own (several proxies share a process)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
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
# A build waits in the queue not at all (most), or as long as the builds ahead of it take.
QUEUE_BUCKETS = (0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
NO_TEAM = "-"  # the team label of what no team asked for (no teams:, the admin token)
OTHER_TEAM = "(other)"  # a team no longer in the config: one label, not one per old name


def team_label(team: str | None, known: Collection[str]) -> str:
    """A bounded label: a configured team's name, `-` for none, `(other)` for the rest."""
    if team is None or team == NO_TEAM:
        return NO_TEAM
    return team if team in known else OTHER_TEAM


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
        teams = set(s.config.teams)
        conns: dict[str, int] = dict.fromkeys(sorted(teams), 0)
        for session in sessions:
            slot = session.admission.slot if session.admission is not None else None
            label = team_label(slot.team if slot is not None else None, teams)
            conns[label] = conns.get(label, 0) + 1
        yield _by_team(
            "taidon_team_connections_open", "Client connections open now, per team", conns
        )
        held = {t: 0 for t in sorted(teams)}
        for team, n in s.team.quotas.held_by_team().items():
            held[team_label(team, teams)] = held.get(team_label(team, teams), 0) + n
        yield _by_team(
            "taidon_team_instances", "Instances held now, per team (as the quota counts)", held
        )
        running = dict.fromkeys(sorted(teams), 0)
        queued = dict.fromkeys(sorted(teams), 0)
        for entry in s.builder.queue.entries.values():
            into = running if entry.running else queued
            label = team_label(entry.team, teams)
            into[label] = into.get(label, 0) + 1
        yield _by_team("taidon_team_builds_running", "Builds running now, per team", running)
        yield _by_team("taidon_team_builds_queued", "Builds waiting in the queue, per team", queued)
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


def _by_team(name: str, doc: str, values: dict[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["team"])
    for team, n in sorted(values.items()):
        family.add_metric([team], n)
    return family


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

        self.team_builds = Counter(
            "taidon_team_builds", "Recipe builds finished, per team", ["team", "outcome"],
            registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "taidon_build_queue_wait_seconds",
            "Time builds waited in the build queue for a slot, per team",
            ["team"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.quota_refusals = Counter(
            "taidon_quota_refusals",
            "Connections refused by a quota (53300), per team and quota",
            ["team", "quota"],
            registry=r,
        )
        self._teams: Callable[[], Collection[str]] = tuple

    def watch(self, services: Services) -> None:
        """Add the live gauges, read from these services at each scrape."""
        self.registry.register(_Live(services))
        self._teams = lambda: services.config.teams

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

    def team_built(self, team: str | None, outcome: str) -> None:
        self.team_builds.labels(team_label(team, self._teams()), outcome).inc()

    def queue_waited(self, team: str | None, seconds: float) -> None:
        self.queue_wait.labels(team_label(team, self._teams())).observe(seconds)

    def quota_refused(self, team: str | None, quota: str) -> None:
        self.quota_refusals.labels(team_label(team, self._teams()), quota).inc()

    def cloned(self, prefix: str, seconds: float) -> None:
        purpose = {"i": "instance", "b": "build"}.get(prefix, prefix)
        self.clone_seconds.labels(purpose).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
