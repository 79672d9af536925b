"""Per-version and per-adapter metrics, exported through `ray.serve.metrics` (Prometheus, the Ray dashboard).

Every label takes values from a bounded set: `catalog_version` (the versions a replica served: a few over
its life), `side` (stable | candidate | none), `adapter` (a task key of a served catalog, the top-1 of
the route), `code` (a gRPC status code name), `method` (the RPC), `router` (a catalog's routers).
Request text, ids and session keys are never labels. Serve adds its own tags (application, deployment,
replica). The metrics are made on first use, in the replica that records them (Ray metrics need a
connected worker); Ray's exporter serves them as `ray_switchboard_*` on each node's metrics port.
"""

from __future__ import annotations

from functools import cached_property

from ray.serve import metrics

# Milliseconds: 1 ms .. 100 s, as a latency histogram of Prometheus buckets.
LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 100000]


class ServeMetrics:
    @cached_property
    def requests(self) -> metrics.Counter:
        return metrics.Counter("switchboard_requests", "Requests answered or failed, by the catalog version that "
                               "routed them, its top-1 adapter and the gRPC status code.",
                               tag_keys=("method", "catalog_version", "side", "adapter", "code"))

    @cached_property
    def latency(self) -> metrics.Histogram:
        return metrics.Histogram("switchboard_latency_ms", "End-to-end latency in the Ingress (ms).",
                                 boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("method", "catalog_version", "side"))

    @cached_property
    def route_latency(self) -> metrics.Histogram:
        return metrics.Histogram("switchboard_route_latency_ms", "Routing latency seen by the Ingress (ms).",
                                 boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("catalog_version", "side", "router"))

    @cached_property
    def labelled(self) -> metrics.Counter:
        return metrics.Counter("switchboard_labelled", "Labelled requests (true task in the request or by "
                               "Feedback), by whether the top-1 task was the true one.",
                               tag_keys=("catalog_version", "side", "correct"))

    @cached_property
    def shadow_routings(self) -> metrics.Counter:
        return metrics.Counter("switchboard_canary_shadow", "Shadow routings by the candidate, by whether its "
                               "top-1 task agreed with stable's.", tag_keys=("catalog_version", "agreed"))

    @cached_property
    def resident(self) -> metrics.Gauge:
        return metrics.Gauge("switchboard_adapters_resident", "Adapters resident in a Generator replica, by catalog "
                             "version.", tag_keys=("catalog_version",))

    @cached_property
    def adapter_loads(self) -> metrics.Counter:
        return metrics.Counter("switchboard_adapter_loads", "Adapters loaded into a Generator replica's slots "
                               "(evict: dropped to make room or with their version).", tag_keys=("event",))

    def adapters(self, resident: dict[str, int], loads: int, evictions: int) -> None:
        for version, n in resident.items():
            self.resident.set(n, {"catalog_version": version})
        if loads:
            self.adapter_loads.inc(loads, {"event": "load"})
        if evictions:
            self.adapter_loads.inc(evictions, {"event": "evict"})

    def request(self, method: str, version: str, side: str, adapter: str, code: str, latency_ms: float) -> None:
        self.requests.inc(1, {"method": method, "catalog_version": version, "side": side, "adapter": adapter,
                              "code": code})
        self.latency.observe(latency_ms, {"method": method, "catalog_version": version, "side": side})

    def route(self, version: str, side: str, router: str, latency_ms: float) -> None:
        self.route_latency.observe(latency_ms, {"catalog_version": version, "side": side, "router": router})

    def label(self, version: str, side: str, correct: bool) -> None:
        self.labelled.inc(1, {"catalog_version": version, "side": side, "correct": str(correct).lower()})

    def shadow(self, version: str, agreed: bool) -> None:
        self.shadow_routings.inc(1, {"catalog_version": version, "agreed": str(agreed).lower()})


SERVE_METRICS = ServeMetrics()
