"""Prometheus metrics (`mount --metrics ADDRESS:PORT`), with the prometheus_client library.

The HTTP server runs in a thread of its own.  The engine belongs to the event loop, so a scrape
asks the loop for one snapshot of it and of the request counts (plain data, made between two
requests: consistent) and renders that.  The request path only adds to plain counters of its
own: no lock, a few microseconds at most.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import trio
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ..engine import Engine, collector
from ..engine.css import Report

# Request latencies: FUSE requests take about 0.1 ms to 1 ms; a slow one, a disk's fsync.
BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0)


@dataclass
class Snapshot:
    """The engine as a scrape shows it."""

    capacity: list[tuple[str, int, int]]  # type, capacity, used
    # cgroup, controller, and what the controller reports of its css there
    resources: list[tuple[str, str, Report]]
    cgroups: int
    members: int
    restarts: int
    requests: dict[tuple[str, str], tuple[int, float, list[int]]]  # see RequestMetrics


def take_snapshot(engine: Engine, restarts: int, requests: RequestMetrics) -> Snapshot:
    with collector.paused():
        return _take_snapshot(engine, restarts, requests)


def _take_snapshot(engine: Engine, restarts: int, requests: RequestMetrics) -> Snapshot:
    h, types = engine.hierarchy, engine.types
    charged = engine.allocator.controllers
    capacity = [(name, types.capacity[t], charged[0].used(t) if charged else 0)
                for t, name in enumerate(types.names)]
    # Only copies (reports are made afresh): the loop waits for this, the scrape's thread
    # renders it.
    resources = []
    for cg, path in h.subtree_paths(h.root):
        for controller in h.controllers:
            css = cg.css[controller.ssid]
            if css is not None:
                resources.append((path, controller.name, controller.report(css, False)))
    return Snapshot(capacity, resources, len(h.by_id), len(h.procs.members),
                    restarts,
                    {key: (count, total, list(buckets))
                     for key, (count, total, buckets) in requests.stats.items()})


class EngineCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator:
        snap = self._snapshot()
        capacity = GaugeMetricFamily("encidfs_capacity", "IDs the host has, by type",
                                     labels=["type"])
        used = GaugeMetricFamily("encidfs_used", "IDs in use, by type", labels=["type"])
        for name, total, in_use in snap.capacity:
            capacity.add_metric([name], total)
            used.add_metric([name], in_use)
        labels = ["cgroup", "controller", "type"]
        current = GaugeMetricFamily("encidfs_cgroup_current",
                                    "IDs charged to the cgroup and below", labels=labels)
        limit = GaugeMetricFamily("encidfs_cgroup_max", "the cgroup's limit (+Inf: max)",
                                  labels=labels)
        peak = GaugeMetricFamily("encidfs_cgroup_peak", "the highest current reached",
                                 labels=labels)
        events = CounterMetricFamily("encidfs_cgroup_refusals",
                                     "charges refused by this limit or one below",
                                     labels=labels)
        # A controller's figures by these names are exported, whatever else it reports.
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "current": current, "max": limit, "peak": peak, "events": events}
        for path, controller, report in snap.resources:
            for name, figures in report.items():
                key = [path, controller, name]
                for figure, family in families.items():
                    value = figures.get(figure)
                    if value is not None:
                        family.add_metric(key, math.inf if value == "max" else float(value))
        yield from (capacity, used, current, limit, peak, events)
        yield GaugeMetricFamily("encidfs_cgroups", "live cgroups, the root included",
                                value=snap.cgroups)
        yield GaugeMetricFamily("encidfs_member_processes",
                                "processes in cgroups other than the root", value=snap.members)
        yield CounterMetricFamily("encidfs_daemon_restarts",
                                  "times the supervisor mounted again after the daemon died",
                                  value=snap.restarts)
        labels = ["interface", "kind"]
        served = CounterMetricFamily("encidfs_requests", "requests served", labels=labels)
        latency = HistogramMetricFamily("encidfs_request_duration_seconds",
                                        "how long requests took", labels=labels)
        for request, (count, seconds, buckets) in sorted(snap.requests.items()):
            served.add_metric(list(request), count)
            cumulative, below = [], 0
            for bound, n in zip([*map(str, BUCKETS), "+Inf"], buckets):
                below += n
                cumulative.append((bound, below))
            latency.add_metric(list(request), cumulative, sum_value=seconds)
        yield served
        yield latency


class RequestMetrics:
    """Requests served, by interface (fuse, control) and kind (the FUSE operation, the
    control op), and how long they took: (interface, kind) -> [count, seconds in all, count
    per bucket (the last: above every bound)].  Only the event loop touches it."""

    def __init__(self) -> None:
        self.stats: dict[tuple[str, str], list] = {}

    def observe(self, interface: str, kind: str, seconds: float) -> None:
        stats = self.stats.get((interface, kind))
        if stats is None:
            stats = self.stats[interface, kind] = [0, 0.0, [0] * (len(BUCKETS) + 1)]
        stats[0] += 1
        stats[1] += seconds
        stats[2][bisect.bisect_left(BUCKETS, seconds)] += 1


class MetricsError(Exception):
    """The exporter cannot listen; the message is for the user."""


def serve(address: str, port: int, engine: Engine, restarts: int) -> RequestMetrics:
    """Start the exporter (from the event loop); return what the request path records into."""
    token = trio.lowlevel.current_trio_token()
    requests = RequestMetrics()
    registry = CollectorRegistry()
    registry.register(EngineCollector(lambda: trio.from_thread.run_sync(
        take_snapshot, engine, restarts, requests, trio_token=token)))
    try:
        start_http_server(port, address, registry=registry)
    except OSError as error:
        raise MetricsError(f"cannot serve metrics on {address}:{port}: "
                           f"{error.strerror or error}") from None
    return requests
