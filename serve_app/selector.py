from __future__ import annotations

import asyncio

import torch
from ray import serve

from routing.catalog import Catalog
from routing.decision import RouteDecision, RouteRequest
from routing.routers.selector import SelectorRouter

from .config import AppArgs


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class Selector:
    """The Adapters-Selector LM on its own replicas: it is a whole base model, unlike the other routers."""

    def __init__(self, args: dict):
        cfg = AppArgs(**args)
        torch.set_num_threads(cfg.torch_threads)
        self.router = SelectorRouter(Catalog.load(cfg.catalog))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def route(self, requests: list[RouteRequest]) -> list[RouteDecision]:
        return await asyncio.to_thread(self.router.route, requests)
