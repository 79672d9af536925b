"""The Router deployment: the catalog's routers, and the canary's side of every request.

During a rollout (`serve_app/canary/`) each request is assigned stable or candidate by the shared
rollout state (sticky on its session key) and routed wholly by that version's routers; its decision
names that version, which the Generator then answers on. In a shadow step a stable request is also
routed by the candidate, in a task of its own after the reply went out, and the two top-1 tasks compared.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from routing.catalog import Catalog
from routing.decision import RouteDecision, RouteRequest
from routing.routers import ROUTERS, ClassifierRouter, Router, make_routers

from .canary.commands import app_store
from .canary.gate import CanaryGate
from .canary.state import CANDIDATE, STABLE, Rollout
from .config import AppArgs, catalog_switch
from .contract import BadRequestError, UnknownRouterError
from .metrics import SERVE_METRICS
from .placement import replica_placement

log = logging.getLogger("ray.serve")


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
        self.versions: dict[str, Served] = {}   # the rollout's catalogs other than self.served, by directory
        self.gate = CanaryGate(app_store(cfg.canary_state))
        self.tasks: set[asyncio.Task] = set()   # shadow routings in flight
        self.syncing: asyncio.Task | None = None
        try:   # a restarted replica resumes the rollout (step, split, shadow) before its first request
            self._load_versions(self.gate.rollout)
        except Exception:  # noqa: BLE001 - a candidate that no longer loads leaves stable serving
            log.exception("canary: the rollout's candidate does not load; stable serves")

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

    def _ensure_sync(self) -> None:
        """Start the sync loop on the replica's event loop (the constructor runs before there is one)."""
        if self.syncing is None:
            self.syncing = asyncio.get_running_loop().create_task(self._sync_forever())

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _sync_forever(self) -> None:
        """About once a second: this replica's canary counts into the shared state, the rollout's catalogs
        loaded (off the event loop, before a request is sent to them). Runs for the replica's life."""
        while True:
            try:
                rollout = await asyncio.to_thread(self.gate.tick)
                await asyncio.to_thread(self._load_versions, rollout)
            except Exception:  # noqa: BLE001 - a bad state file or candidate must not stop stable serving
                log.exception("canary: sync failed; stable keeps serving")
            await asyncio.sleep(self.gate.sync_s)

    def _load_versions(self, rollout: Rollout | None) -> None:
        """Load the rollout's catalogs not loaded yet, and drop those of earlier rollouts (a request that is
        routing on one keeps its own reference)."""
        if rollout is None:
            return
        named = {_dir(getattr(rollout, side)["catalog"]) for side in (STABLE, CANDIDATE)}
        versions = {root: served for root, served in self.versions.items() if root in named}
        for root in named - {_dir(self.served.catalog.root), *versions}:
            versions[root] = self._serve(Catalog.load(root))   # verified: a tampered one raises
            log.info("canary: catalog %s of rollout %s loaded", versions[root].catalog.version, rollout.rollout_id)
        self.versions = versions

    def _side(self, side: str) -> Served | None:
        """What serves `side` of the rollout now; None while its catalog is not loaded (yet, or it failed)."""
        root = self.gate.catalog(side)
        if root is None or _dir(root) == _dir(self.served.catalog.root):
            return self.served
        return self.versions.get(_dir(root))

    def _pick(self, session_key: str | None) -> tuple[str, Served]:
        """The side that answers this request and its version: stable whenever the candidate is not loaded."""
        side = self.gate.assign(session_key)
        served = self._side(side) if side == CANDIDATE else None
        if served is None:
            side = STABLE
            served = self._side(STABLE) or self.served
        return side, served

    async def route(self, request: RouteRequest, router: str, session_key: str | None = None,
                    true_task: str | None = None) -> RouteDecision:
        """Route on the version the canary assigns (stable without a rollout); the decision names it.
        `true_task` (labelled traffic) is checked here and used only to score a shadow routing."""
        self._ensure_sync()
        side, served = self._pick(session_key)   # one version for the whole request, whatever a switch does
        if true_task is not None and true_task not in served.catalog.tasks:
            raise BadRequestError(f"route.true_task {true_task!r} is not a task of catalog {served.catalog.version}")
        decision, request = await self._route_on(served, request, router)
        if side == STABLE and self.gate.shadowing():
            candidate = self._side(CANDIDATE)
            if candidate is not None and candidate is not served:
                self._spawn(self._shadow(candidate, request, router, decision, true_task))
        return decision

    async def _route_on(self, served: Served, request: RouteRequest, router: str) -> tuple[RouteDecision, RouteRequest]:
        """The decision of `served`'s `router`, and the request with its embedding (a shadow reuses it)."""
        if router not in served.names:
            raise UnknownRouterError(f"unknown router {router!r}; this catalog serves {served.names}")
        if router == "selector":
            return await self.selector.route.remote(request, str(served.catalog.root)), request
        chosen = served.routers[router]
        if chosen.needs_embedding and request.embedding is None:   # same encoder on both sides of a rollout
            request = replace(request, embedding=await self.embedder.embed.remote(request.text))
        decision = await self.route_batch(chosen, request)
        if isinstance(decision, Exception):   # this request's error alone, not its batch's
            raise decision
        return decision, request

    async def _shadow(self, candidate: Served, request: RouteRequest, router: str, stable: RouteDecision,
                      true_task: str | None) -> None:
        """The candidate routes what stable answered: agreement of top-1 tasks (and accuracy when labelled)."""
        started = time.perf_counter()
        try:
            decision, _ = await self._route_on(candidate, request, router)
        except Exception:  # noqa: BLE001 - a candidate that cannot route this request disagrees with stable
            decision = None
        agreed = decision is not None and decision.top == stable.top
        correct = None if true_task is None else decision is not None and decision.top == true_task
        self.gate.record(CANDIDATE, ok=decision is not None, latency_ms=1000 * (time.perf_counter() - started),
                         agreed=agreed, correct=correct)
        SERVE_METRICS.shadow(candidate.catalog.version, agreed)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def route_batch(self, routers: list[Router], requests: list[RouteRequest]) -> list:
        return await asyncio.to_thread(route_grouped, routers, requests)

    async def info(self) -> dict:
        """What answers a request without a session key when no split runs: after a promotion, the candidate."""
        self._ensure_sync()
        rollout = self.gate.rollout
        served = (self.served if rollout is None else
                  (self._side(STABLE) or self.served) if rollout.running else self._pick(None)[1])
        c = served.catalog
        return {"version": c.version, "base_model": (c.base_model or {}).get("id", ""), "routers": served.names,
                "tasks": [{"key": k, **t.__dict__} for k, t in c.tasks.items()]}


def _dir(path: str | Path) -> str:
    return str(Path(path).resolve())


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
