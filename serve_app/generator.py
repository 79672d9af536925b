from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from ray import serve

from routing.base_models import load_causal_lm, locate_base_model
from routing.catalog import Catalog, CatalogError
from routing.lora import AdapterStore, FusedLoraModel, Generation, generate, plan_batches
from routing.templates import render

from .config import AppArgs, catalog_switch
from .contract import CatalogChangedError, GenerationJob, PromptTooLongError

log = logging.getLogger("ray.serve")


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
class Generator:
    """Base model + every catalog adapter in fused multi-LoRA layers.

    Requests with different route decisions (one adapter, a K-way fusion, or none) share one
    batched `generate` call; adapters are loaded on demand into at most `max_loras` slots.
    """

    def __init__(self, args: dict):
        cfg = AppArgs(**args)
        torch.set_num_threads(cfg.torch_threads)
        catalog = Catalog.load(cfg.catalog)
        if catalog.base_model is None:
            raise CatalogError(f"catalog {catalog.version} is routing-only (no adapters): nothing to generate with")
        model, self.tokenizer = load_causal_lm(locate_base_model(catalog.base_model["id"], cfg.base_model))
        self.fused = FusedLoraModel(model, max_loras=cfg.max_loras, max_rank=cfg.max_lora_rank or _max_rank(catalog))
        self.context = getattr(model.config, "max_position_embeddings", None)   # None: no limit known
        self.catalog = catalog
        self.store = AdapterStore(self.fused, _adapter_paths(catalog))
        self.lock = threading.Lock()
        self.running: set[str] = set()     # request ids of the batch being answered
        self.abandoned: set[str] = set()   # of those, the ones whose client has gone
        self.abandoned_rows = 0
        self.generate_batch.set_max_batch_size(cfg.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    async def reconfigure(self, user_config: dict) -> None:
        """Switch to another catalog version in place (Serve `user_config: {catalog: DIR}`; see
        `serve_app.launch.switch_catalog`): no restart, the base model stays loaded.

        Dropped adapters are evicted and new ones load on demand. The swap takes the batch lock, so
        the batch running now finishes on the old version and every later batch runs on the new one.
        """
        catalog = await asyncio.to_thread(catalog_switch, user_config, self.catalog)
        if catalog is None:
            return
        if _max_rank(catalog) > self.fused.max_rank:
            raise ValueError(f"catalog {catalog.version} has rank-{_max_rank(catalog)} adapters; this Generator takes "
                             f"rank <= {self.fused.max_rank} (set args.max_lora_rank and redeploy)")
        await asyncio.to_thread(self._switch, catalog)

    def _switch(self, catalog: Catalog) -> None:
        with self.lock:
            self.store.swap_catalog(_adapter_paths(catalog))
            self.catalog = catalog
        log.info("generator: now serving catalog %s", catalog.version)

    def _routes(self, job: GenerationJob) -> list[tuple[str, float]]:
        if job.base_only:
            return []
        return [(k, w) for k, w in job.decision.tasks if self.catalog.tasks[k].adapter is not None]

    def _answers(self, jobs: list[GenerationJob]) -> Iterator[dict[int, Generation | Exception]]:
        """Answers by row: first the rows refused up front, then each planned `generate` call's as soon
        as it returns (`plan_batches` runs the short prompts first). An error stays with the request at
        fault; a request abandoned by its client before its call starts is left out of that call."""
        with self.lock:  # the store, the catalog and the layers' routing state serve one batch at a time
            ids = {j.request_id for j in jobs}
            self.running |= ids
            try:
                yield from self._answer_rows(jobs)
            finally:
                self.running -= ids
                self.abandoned -= ids

    def _answer_rows(self, jobs: list[GenerationJob]) -> Iterator[dict[int, Generation | Exception]]:
        rows: dict[int, _Row] = {}
        refused: dict[int, Exception] = {}
        for i, j in enumerate(jobs):
            if any(k not in self.catalog.tasks for k, _ in j.decision.tasks):
                refused[i] = CatalogChangedError(f"route decision from catalog {j.decision.catalog_version} names "
                                                 f"tasks that catalog {self.catalog.version} no longer has; retry")
                continue
            prompt = render(self.catalog.tasks[j.decision.top].template, j.text)
            length = len(self.tokenizer(prompt).input_ids)
            if self.context is not None and length >= self.context:
                refused[i] = PromptTooLongError(f"the prompt is {length} tokens; the base model's context is "
                                                f"{self.context}")
                continue
            budget = j.max_new_tokens if self.context is None else min(j.max_new_tokens, self.context - length)
            rows[i] = _Row(prompt, length, self._routes(j), budget, j.stop)   # the answer stops at the context
        if refused:
            yield refused
        live = list(rows)
        plan = plan_batches([{k for k, _ in rows[i].routes} for i in live], [rows[i].length for i in live],
                            self.store.capacity)
        for group in plan:
            call = [live[g] for g in group]
            gone = {i for i in call if jobs[i].request_id in self.abandoned}
            if gone:
                self.abandoned_rows += len(gone)
                yield {i: RequestAbandonedError(jobs[i].request_id) for i in gone}
                call = [i for i in call if i not in gone]
            if not call:
                continue
            try:
                done = self._generate([rows[i] for i in call])
            except Exception as e:   # noqa: BLE001 - the error goes to the request at fault alone
                if len(call) == 1:
                    done = [e]
                else:
                    log.warning("generator: a batch of %d failed (%s); running its rows one by one", len(call), e)
                    done = [self._generate_one(rows[i]) for i in call]
            yield dict(zip(call, done))

    def _generate_one(self, row: _Row) -> Generation | Exception:
        try:
            return self._generate([row])[0]
        except Exception as e:   # noqa: BLE001 - returned to that request alone
            return e

    def _generate(self, rows: list[_Row]) -> list[Generation]:
        self.store.ensure(sorted({k for r in rows for k, _ in r.routes}))
        return generate(self.fused, self.tokenizer, [r.prompt for r in rows], [r.routes for r in rows],
                        max_new_tokens=[r.budget for r in rows], stop=[list(r.stop) for r in rows])

    def info(self) -> dict:
        """The catalog version served, the resident adapters (LRU first), the replica's process, and how
        many rows were left out of their call because their client had gone."""
        return {"version": self.catalog.version, "resident": self.store.resident, "pid": os.getpid(),
                "abandoned_rows": self.abandoned_rows}

    async def generate(self, job: GenerationJob) -> Generation:
        answer = None
        try:
            async for out in self.generate_batch(job):   # ends right after this request's own answer
                if out is not None:   # None: another call of the batch answered
                    answer = out
        except asyncio.CancelledError:   # the client gave up (its deadline passed): skip its row's call
            if job.request_id in self.running:
                self.abandoned.add(job.request_id)
            raise
        if isinstance(answer, Exception):  # one request's error, not its whole batch's
            raise answer
        return answer

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def generate_batch(self, jobs: list[GenerationJob]) -> AsyncIterator[list]:
        """Streams the batch's answers call by call, so a short request does not wait for a long one's call.

        Serve's streaming batch protocol: each yield is one item per request, here its answer (a
        `Generation` or the error that is its alone), None (not yet), or StopIteration (that request is
        done). `_answers` runs off the event loop, so the replica keeps accepting (and batching) requests.
        """
        loop = asyncio.get_running_loop()
        answers: asyncio.Queue[dict[int, Generation | Exception] | None] = asyncio.Queue()

        def work() -> None:
            try:
                for answered in self._answers(jobs):
                    loop.call_soon_threadsafe(answers.put_nowait, answered)
            finally:
                loop.call_soon_threadsafe(answers.put_nowait, None)

        worker = asyncio.ensure_future(asyncio.to_thread(work))
        while (answered := await answers.get()) is not None:
            yield [answered.get(i) for i in range(len(jobs))]
            yield [StopIteration if i in answered else None for i in range(len(jobs))]
        await worker   # what it raised fails the requests still open


class RequestAbandonedError(RuntimeError):
    """Answers a row whose client had gone before its `generate` call started (nobody reads it)."""


@dataclass(frozen=True)
class _Row:
    """One request of a batch, ready for a `generate` call."""
    prompt: str
    length: int                       # prompt tokens
    routes: list[tuple[str, float]]   # (adapter, weight); [] = the bare base
    budget: int                       # new tokens: the request's, cut to what the context has left
    stop: tuple[str, ...]


def _adapter_paths(catalog: Catalog) -> dict[str, Path]:
    return {k: catalog.adapter_path(k) for k, t in catalog.tasks.items() if t.adapter is not None}


def _max_rank(catalog: Catalog) -> int:
    return max((t.lora["r"] for t in catalog.tasks.values() if t.lora), default=1)
