from __future__ import annotations

import asyncio
import logging

import torch
from ray import serve

from routing.catalog import Catalog
from routing.decision import RouteDecision, RouteRequest
from routing.routers.selector import SelectorRouter

from .config import AppArgs, catalog_switch
from .placement import replica_placement

log = logging.getLogger("ray.serve")


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
class Selector:
    """The Adapters-Selector LM on its own replicas: it is a whole base model, unlike the other routers."""

    def __init__(self, args: dict):
        cfg = AppArgs(**args)
        torch.set_num_threads(cfg.torch_threads)
        self.placement = replica_placement(cfg, "Selector")  # PlacementError (start-up) for cuda without CUDA
        self.router = SelectorRouter(Catalog.load(cfg.catalog), placement=self.placement)

    async def reconfigure(self, user_config: dict) -> None:
        """Switch catalog version in place (Serve `user_config: {catalog: DIR}`), e.g. to an updated selector.
        A version without a selector leaves this one on its old labels (the Router then stops asking it)."""
        catalog = await asyncio.to_thread(catalog_switch, user_config, self.router.catalog)
        if catalog is None:
            return
        if "selector" not in catalog.routers:
            log.info("selector: catalog %s has no selector; keeping %s", catalog.version, self.router.catalog.version)
            return
        self.router = await asyncio.to_thread(SelectorRouter, catalog, None, self.placement)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def route(self, requests: list[RouteRequest]) -> list[RouteDecision]:
        return await asyncio.to_thread(self.router.route, requests)
