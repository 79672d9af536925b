from __future__ import annotations

from dataclasses import replace

import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from routing.catalog import Catalog
from routing.decision import RouteDecision, RouteRequest
from routing.routers import ROUTERS, make_routers

from .config import AppArgs, catalog_switch


class UnknownRouterError(ValueError):
    pass


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class RouterDeployment:
    """Holds the catalog and its routers; asks the Embedder for embeddings when a router needs them."""

    def __init__(self, args: dict, embedder: DeploymentHandle, selector: DeploymentHandle | None = None):
        cfg = AppArgs(**args)
        torch.set_num_threads(cfg.torch_threads)
        self.embedder = embedder
        self.selector = selector  # the selector LM lives on its own deployment
        self._use(Catalog.load(cfg.catalog))

    def reconfigure(self, user_config: dict) -> None:
        """Switch catalog version in place (Serve `user_config: {catalog: DIR}`): later requests route on it."""
        catalog = catalog_switch(user_config, self.catalog)
        if catalog is not None:
            self._use(catalog)

    def _use(self, catalog: Catalog) -> None:
        """Serve `catalog`: its routers, plus the selector (on its own deployment) while the catalog carries
        one and the app deploys it; a switch to a version without one leaves the Selector on its old labels."""
        routers = make_routers(catalog, [n for n in ROUTERS if n != "selector"])
        selector = self.selector is not None and "selector" in catalog.routers
        names = sorted([*routers, *(["selector"] if selector else [])])
        self.catalog, self.routers, self.names = catalog, routers, names   # one assignment: one version per request

    async def route(self, request: RouteRequest, router: str) -> RouteDecision:
        if router not in self.names:
            raise UnknownRouterError(f"unknown router {router!r}; this catalog serves {self.names}")
        if router == "selector":
            return await self.selector.route.remote(request)
        chosen = self.routers[router]
        if chosen.needs_embedding:
            embedding = await self.embedder.embed.remote(request.text)
            request = replace(request, embedding=embedding)
        return chosen.route([request])[0]

    def info(self) -> dict:
        c = self.catalog
        return {"version": c.version, "base_model": (c.base_model or {}).get("id", ""), "routers": self.names,
                "tasks": [{"key": k, **t.__dict__} for k, t in c.tasks.items()]}
