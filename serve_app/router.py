from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from routing.catalog import Catalog
from routing.decision import RouteDecision, RouteRequest
from routing.routers import ROUTERS, ClassifierRouter, Router, make_routers

from .config import AppArgs, catalog_switch
from .contract import UnknownRouterError
from .placement import replica_placement


@dataclass(frozen=True)
class Served:
    """One catalog version and its routers: swapped whole on a switch, read once per request."""
    catalog: Catalog
    routers: dict[str, Router]
    names: list[str]   # what requests may name: the routers, plus "selector" when the Selector serves it


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=128)
class RouterDeployment:
    """Holds the catalog and its routers; asks the Embedder for embeddings when a router needs them.
    Concurrent requests are routed in batches, off the event loop."""

    def __init__(self, args: dict, embedder: DeploymentHandle, selector: DeploymentHandle | None = None):
        cfg = AppArgs(**args)
        torch.set_num_threads(cfg.torch_threads)
        self.embedder = embedder
        self.selector = selector  # the selector LM lives on its own deployment
        self.device = replica_placement(cfg, "Router").device  # the classifier's (and ensemble's) encoder
        self.served = self._serve(Catalog.load(cfg.catalog))

    async def reconfigure(self, user_config: dict) -> None:
        """Switch catalog version in place (Serve `user_config: {catalog: DIR}`): later requests route on it."""
        catalog = await asyncio.to_thread(catalog_switch, user_config, self.served.catalog)
        if catalog is not None:
            self.served = await asyncio.to_thread(self._serve, catalog)

    def _serve(self, catalog: Catalog) -> Served:
        """`catalog`'s routers, plus the selector (on its own deployment) while the catalog carries one and
        the app deploys it; a switch to a version without one leaves the Selector on its old labels."""
        routers = make_routers(catalog, [n for n in ROUTERS if n != "selector"])
        for router in routers.values():
            if isinstance(router, ClassifierRouter):  # the ensemble holds this same instance
                router.to(self.device)
        selector = self.selector is not None and "selector" in catalog.routers
        return Served(catalog, routers, sorted([*routers, *(["selector"] if selector else [])]))

    async def route(self, request: RouteRequest, router: str) -> RouteDecision:
        served = self.served   # one version for the whole request, whatever a switch does meanwhile
        if router not in served.names:
            raise UnknownRouterError(f"unknown router {router!r}; this catalog serves {served.names}")
        if router == "selector":
            return await self.selector.route.remote(request)
        chosen = served.routers[router]
        if chosen.needs_embedding:
            request = replace(request, embedding=await self.embedder.embed.remote(request.text))
        decision = await self.route_batch(chosen, request)
        if isinstance(decision, Exception):   # this request's error alone, not its batch's
            raise decision
        return decision

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def route_batch(self, routers: list[Router], requests: list[RouteRequest]) -> list:
        return await asyncio.to_thread(route_grouped, routers, requests)

    def info(self) -> dict:
        served = self.served
        c = served.catalog
        return {"version": c.version, "base_model": (c.base_model or {}).get("id", ""), "routers": served.names,
                "tasks": [{"key": k, **t.__dict__} for k, t in c.tasks.items()]}


def route_grouped(routers: list[Router], requests: list[RouteRequest]) -> list[RouteDecision | Exception]:
    """Route request i with routers[i], one `route` call per router; a failing call is retried row by
    row, so an error (e.g. the fixed router's unknown task) is returned for its own request only."""
    out: list[RouteDecision | Exception | None] = [None] * len(requests)
    groups: dict[int, list[int]] = {}
    for i, router in enumerate(routers):
        groups.setdefault(id(router), []).append(i)
    for rows in groups.values():
        router = routers[rows[0]]
        try:
            done = router.route([requests[i] for i in rows])
        except Exception:   # noqa: BLE001 - find the request at fault
            done = [_route_one(router, requests[i]) for i in rows]
        for i, d in zip(rows, done):
            out[i] = d
    return out


def _route_one(router: Router, request: RouteRequest) -> RouteDecision | Exception:
    try:
        return router.route([request])[0]
    except Exception as e:   # noqa: BLE001 - returned to that request alone
        return e
