from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from pathlib import Path

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
    """The Adapters-Selector LM on its own replicas: it is a whole base model, unlike the other routers.

    A request names the catalog whose selector routes it (the Router's stable or canary candidate); a
    catalog other than the served one gets its selector loaded on first use and kept while it is one of
    the last `KEEP` such catalogs (a rollout needs one: the candidate), so a canary of an updated
    selector is judged on the candidate's own selector. Each such catalog holds its own base model copy.
    """

    KEEP = 2

    def __init__(self, args: dict):
        cfg = AppArgs(**args)
        torch.set_num_threads(cfg.torch_threads)
        self.placement = replica_placement(cfg, "Selector")  # PlacementError (start-up) for cuda without CUDA
        self.router = SelectorRouter(Catalog.load(cfg.catalog), placement=self.placement)
        self.others: OrderedDict[str, SelectorRouter] = OrderedDict()   # catalog root -> its selector, LRU last
        self.loading = asyncio.Lock()

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

    async def _router_for(self, root: str | None) -> SelectorRouter:
        if root is None or Path(root).resolve() == self.router.catalog.root.resolve():
            return self.router
        key = str(Path(root).resolve())
        async with self.loading:
            if key not in self.others:
                catalog = await asyncio.to_thread(Catalog.load, key)   # verified: a tampered one raises
                self.others[key] = await asyncio.to_thread(SelectorRouter, catalog, None, self.placement)
                log.info("selector: loaded the selector of catalog %s", catalog.version)
                while len(self.others) > self.KEEP:
                    self.others.popitem(last=False)
            self.others.move_to_end(key)
            return self.others[key]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def route(self, requests: list[RouteRequest], catalogs: list[str | None]) -> list[RouteDecision]:
        """Each request on the selector of its catalog (None: the served one), one call per catalog."""
        out: list[RouteDecision | None] = [None] * len(requests)
        for root in dict.fromkeys(catalogs):
            rows = [i for i, c in enumerate(catalogs) if c == root]
            router = await self._router_for(root)
            for i, decision in zip(rows, await asyncio.to_thread(router.route, [requests[i] for i in rows])):
                out[i] = decision
        return out
