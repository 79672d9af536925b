from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import torch
from ray import serve

from routing.base_models import load_causal_lm, locate_base_model
from routing.catalog import Catalog, CatalogError
from routing.decision import RouteDecision
from routing.lora import AdapterStore, FusedLoraModel, Generation, generate
from routing.templates import render

from .config import AppArgs


@dataclass(frozen=True)
class GenerationJob:
    text: str
    decision: RouteDecision
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    base_only: bool = False


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class Generator:
    """Base model + every catalog adapter in fused multi-LoRA layers.

    Requests with different route decisions (one adapter, a K-way fusion, or none) share one
    batched `generate` call; adapters are loaded on demand into at most `max_loras` slots.
    """

    def __init__(self, args: dict):
        cfg = AppArgs(**args)
        torch.set_num_threads(cfg.torch_threads)
        self.catalog = Catalog.load(cfg.catalog)
        if self.catalog.base_model is None:
            raise CatalogError(f"catalog {self.catalog.version} is routing-only (no adapters): nothing to generate with")
        model, self.tokenizer = load_causal_lm(locate_base_model(self.catalog.base_model["id"], cfg.base_model))
        ranks = [t.lora["r"] for t in self.catalog.tasks.values() if t.lora]
        self.fused = FusedLoraModel(model, max_loras=cfg.max_loras, max_rank=max(ranks, default=1))
        self.store = AdapterStore(self.fused, {k: self.catalog.adapter_path(k) for k, t in self.catalog.tasks.items()
                                               if t.adapter is not None})
        self.lock = threading.Lock()
        self.generate_batch.set_max_batch_size(cfg.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    def _routes(self, job: GenerationJob) -> list[tuple[str, float]]:
        if job.base_only:
            return []
        return [(k, w) for k, w in job.decision.tasks if self.catalog.tasks[k].adapter is not None]

    def _sub_batches(self, routes: list[list[tuple[str, float]]]) -> list[list[int]]:
        """Row groups whose distinct adapters fit the resident slots (K-way fusions can overflow them)."""
        groups: list[tuple[list[int], set[str]]] = []
        for row, route in enumerate(routes):
            need = {k for k, _ in route}
            for rows, names in groups:
                if len(names | need) <= self.store.capacity:
                    rows.append(row)
                    names |= need
                    break
            else:
                groups.append(([row], need))
        return [rows for rows, _ in groups]

    def _run(self, jobs: list[GenerationJob]) -> list[Generation]:
        prompts = [render(self.catalog.tasks[j.decision.top].template, j.text) for j in jobs]
        routes = [self._routes(j) for j in jobs]
        out: list[Generation | None] = [None] * len(jobs)
        with self.lock:  # the store and the layers' routing state serve one batch at a time
            for rows in self._sub_batches(routes):
                self.store.ensure(sorted({k for i in rows for k, _ in routes[i]}))
                done = generate(self.fused, self.tokenizer, [prompts[i] for i in rows], [routes[i] for i in rows],
                                max_new_tokens=[jobs[i].max_new_tokens for i in rows],
                                stop=[list(jobs[i].stop) for i in rows])
                for i, g in zip(rows, done):
                    out[i] = g
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def generate_batch(self, jobs: list[GenerationJob]) -> list[Generation]:
        # Off the event loop, so the replica keeps accepting (and batching) requests meanwhile.
        return await asyncio.to_thread(self._run, jobs)
