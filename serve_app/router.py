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
        # One assignment: a request sees one version. The selector runs on its own deployment.
        self.catalog, self.routers = catalog, make_routers(catalog, [n for n in ROUTERS if n != "selector"])

    async def route(self, request: RouteRequest, router: str) -> RouteDecision:
        if router == "selector" and self.selector is not None:
            return await self.selector.route.remote(request)
        if router not in self.routers:
            raise UnknownRouterError(f"unknown router {router!r}; this catalog serves {sorted(self.routers)}")
        chosen = self.routers[router]
        if chosen.needs_embedding:
            embedding = await self.embedder.embed.remote(request.text)
            request = replace(request, embedding=embedding)
        return chosen.route([request])[0]

    def info(self) -> dict:
        c = self.catalog
        return {"version": c.version, "base_model": (c.base_model or {}).get("id", ""), "routers": sorted([*self.routers, *(["selector"] if self.selector else [])]),
                "tasks": [{"key": k, **t.__dict__} for k, t in c.tasks.items()]}
