from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from ray import serve

from routing.base_models import load_causal_lm, locate_base_model
from routing.catalog import Catalog, CatalogError
from routing.engine import Engine, EngineConfig, Event, NeverFitsError, QueueFullError, SamplingParams
from routing.lora import AdapterStore, FusedLoraModel
from routing.templates import render

from .canary.commands import app_store
from .canary.state import CANDIDATE, STABLE
from .config import AppArgs, catalog_switch
from .contract import (Answer, BadRequestError, CatalogChangedError, Delta, GenerationJob, NoAdapterError,
                       OverloadedError, PromptTooLongError)
from .engine_loop import EngineLoop
from .metrics import SERVE_METRICS
from .placement import replica_placement

log = logging.getLogger("ray.serve")


# Above max_num_seqs + max_queued_requests: requests reach the engine, whose bounded queue answers
# RESOURCE_EXHAUSTED, instead of waiting in Serve's unbounded one.
@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=512)
class Generator:
    """Base model + the catalog's adapters in fused multi-LoRA layers, run by a continuous-batching engine,
    on the replica's GPU in bf16 when Ray assigned one (`device`/`dtype` args), else the CPU in fp32.

    Every request becomes a sequence of the engine: it joins the running batch at the next step, on
    its own adapters (one, a K-way fusion, or none), and its tokens stream out as they are made.

    Adapters are keyed by catalog version and task, so a request routed on version v is answered on
    v's adapters even while a switch brings in v+1: versions stay loaded while requests use them.
    During a canary rollout the Router routes some requests on the candidate: the first such request
    loads the candidate catalog named in the rollout state, and both versions stay loaded (`pinned`).
    """

    def __init__(self, args: dict):
        cfg = AppArgs(**args)
        torch.set_num_threads(cfg.torch_threads)
        catalog = Catalog.load(cfg.catalog)
        if catalog.base_model is None:
            raise CatalogError(f"catalog {catalog.version} is routing-only (no adapters): nothing to generate with")
        placement = replica_placement(cfg, "Generator")   # PlacementError (start-up) for cuda without CUDA
        model, self.tokenizer = load_causal_lm(locate_base_model(catalog.base_model["id"], cfg.base_model),
                                               dtype=placement.dtype, device=placement.device)
        self.max_rank = cfg.max_lora_rank or _max_rank(catalog)
        fused = FusedLoraModel(model, max_loras=cfg.max_loras, max_rank=self.max_rank)
        self.catalogs = {catalog.version: catalog}   # every version a request may still be answered on
        self.current = catalog.version
        self.pinned: set[str] = set()   # the versions of the last rollout seen: kept while no request uses them
        self.canary = app_store(cfg.canary_state)
        self.loading = asyncio.Lock()
        self.reporting: asyncio.Task | None = None   # adapter residency and loads, as metrics (every few seconds)
        self.store = AdapterStore(fused, _adapter_paths(catalog))
        engine = Engine(fused, self.tokenizer, self.store,
                        EngineConfig(max_num_seqs=cfg.max_num_seqs, kv_cache_tokens=cfg.kv_cache_tokens,
                                     prefill_chunk_tokens=cfg.prefill_chunk_tokens,
                                     max_waiting=cfg.max_queued_requests, admission=cfg.batching),
                        context=getattr(model.config, "max_position_embeddings", None))
        self.loop = EngineLoop(engine)

    @property
    def catalog(self) -> Catalog:
        return self.catalogs[self.current]

    async def reconfigure(self, user_config: dict) -> None:
        """Switch to another catalog version in place (Serve `user_config: {catalog: DIR}`; see
        `serve_app.launch.switch_catalog`): no restart, the base model stays loaded.

        New requests are routed and answered on the new version; requests routed on the old one still
        finish on it. Versions no request uses any more are dropped (their adapters evicted).
        """
        catalog = await asyncio.to_thread(catalog_switch, user_config, self.catalog)
        if catalog is None:
            return
        if _max_rank(catalog) > self.max_rank:
            raise ValueError(f"catalog {catalog.version} has rank-{_max_rank(catalog)} adapters; this Generator takes "
                             f"rank <= {self.max_rank} (set args.max_lora_rank and redeploy)")
        await self.loop.call(lambda: self._switch(catalog))
        log.info("generator: now serving catalog %s", catalog.version)

    def _switch(self, catalog: Catalog) -> None:
        """On the engine thread, between steps."""
        self.catalogs[catalog.version] = catalog
        self.current = catalog.version
        self._prune()

    def _prune(self) -> None:
        """On the engine thread: drop the versions other than the current one that no queued or running
        request uses, and their adapters."""
        sched = self.loop.engine.scheduler
        used = {k.split(":", 1)[0] for s in (*sched.waiting, *sched.running) for k in s.adapters}
        self.catalogs = {v: c for v, c in self.catalogs.items() if v == self.current or v in used | self.pinned}
        paths: dict[str, Path] = {}
        for c in self.catalogs.values():
            paths |= _adapter_paths(c)
        self.store.swap_catalog(paths)

    async def _rollout_version(self, version: str) -> None:
        """Load catalog `version` if the rollout state names it (stable or candidate) and it is not loaded;
        any other unknown version is left to `_request` to refuse (UNAVAILABLE, retry)."""
        if version in self.catalogs:
            return
        async with self.loading:
            rollout = await asyncio.to_thread(self.canary.load)
            if version in self.catalogs or rollout is None:
                return
            roots = {getattr(rollout, side)["version"]: getattr(rollout, side)["catalog"] for side in (STABLE, CANDIDATE)}
            if version not in roots:
                return
            catalog = await asyncio.to_thread(Catalog.load, roots[version])   # verified: a tampered one raises
            if _max_rank(catalog) > self.max_rank:
                raise NoAdapterError(f"catalog {version} has rank-{_max_rank(catalog)} adapters; this Generator "
                                     f"takes rank <= {self.max_rank}")

            def add() -> None:
                self.pinned = set(roots)
                self.catalogs[version] = catalog
                self._prune()

            await self.loop.call(add)
            log.info("generator: loaded catalog %s of rollout %s", version, rollout.rollout_id)

    def _request(self, job: GenerationJob) -> dict:
        """The engine request for `job`: prompt tokens on the template of the routed task and the route's
        adapters, weights renormalised over the routed tasks that have one."""
        catalog = self.catalogs.get(job.decision.catalog_version)
        if catalog is None or any(k not in catalog.tasks for k, _ in job.decision.tasks):
            raise CatalogChangedError(f"route decision from catalog {job.decision.catalog_version}, which this "
                                      f"replica no longer serves (now {self.current}); retry")
        routes = [] if job.base_only else [(k, w) for k, w in job.decision.tasks if catalog.tasks[k].adapter]
        if job.decision.tasks and not job.base_only and not routes:
            raise NoAdapterError(f"the routed tasks {[k for k, _ in job.decision.tasks]} have no adapter in catalog "
                                 f"{catalog.version}; send base_only to answer with the bare base model")
        total = sum(w for _, w in routes)
        try:
            sampling = SamplingParams(job.temperature, job.top_p, job.seed)
        except ValueError as e:
            raise BadRequestError(str(e)) from None
        prompt = self._prompt(job, catalog)
        return dict(prompt=prompt, routes=[(_key(catalog, k), w / total) for k, w in routes],
                    max_new_tokens=job.max_new_tokens, stop=job.stop, sampling=sampling)

    def _prompt(self, job: GenerationJob, catalog: Catalog) -> list[int]:
        """A chat on the base model's chat template when its tokenizer has one; anything else on the routed
        task's template (the format its adapter was trained on)."""
        if job.messages is not None and self.tokenizer.chat_template:
            chat = [{"role": role, "content": content} for role, content in job.messages]
            text = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False).input_ids
        return self.tokenizer(render(catalog.tasks[job.decision.top].template, job.text)).input_ids

    async def stream(self, job: GenerationJob) -> AsyncIterator[Delta | Answer]:
        """The answer as it is made: `Delta`s of new text, then the `Answer`. A client that goes away
        (cancellation, or closing the stream) frees its sequence's slot at the engine's next step."""
        started = time.perf_counter()
        if self.reporting is None:
            self.reporting = asyncio.get_running_loop().create_task(self._report_adapters())
        await self._rollout_version(job.decision.catalog_version)
        request = await asyncio.to_thread(self._request, job)
        events = self.loop.submit(job.request_id, **request)
        text, first, ended = [], None, False
        try:
            while True:
                event, pending = await _coalesced(events)
                ended = isinstance(event, BaseException) or event.done
                if isinstance(event, BaseException):
                    raise _refusal(event)
                if event.error is not None:
                    raise event.error
                if first is None and event.new_tokens:
                    first = time.perf_counter()
                if pending:
                    text.append(pending)
                    yield Delta(pending)
                if ended:
                    if len(self.catalogs) > 1:
                        await self.loop.call(self._prune)
                    yield _answer(event, "".join(text), len(request["prompt"]), started, first)
                    return
        finally:
            if not ended:
                self.loop.abort(job.request_id)

    async def _report_adapters(self, every_s: float = 5.0) -> None:
        """Resident adapters per catalog version, and loads and evictions since the last report."""
        seen = (0, 0)

        def snapshot() -> tuple[dict[str, int], int, int]:
            resident: dict[str, int] = {v: 0 for v in self.catalogs}
            for key in self.store.resident:
                version = key.split(":", 1)[0]
                resident[version] = resident.get(version, 0) + 1
            return resident, self.store.loads, self.store.evictions

        while True:
            try:
                resident, loads, evictions = await self.loop.call(snapshot)
                SERVE_METRICS.adapters(resident, loads - seen[0], evictions - seen[1])
                seen = (loads, evictions)
            except Exception:  # noqa: BLE001 - metrics must never stop serving
                log.exception("generator: adapter metrics failed")
            await asyncio.sleep(every_s)

    async def generate(self, job: GenerationJob) -> Answer:
        async for item in self.stream(job):
            if isinstance(item, Answer):
                return item
        raise RuntimeError("the engine ended a request without an answer")

    async def info(self) -> dict:
        """The catalog version served (and others still finishing), resident adapters (LRU first), the
        replica's process, the engine's queue and KV state, and how many requests their clients abandoned."""
        engine = self.loop.engine

        def snapshot() -> dict:
            sched = engine.scheduler
            return {"version": self.current, "versions": sorted(self.catalogs), "pid": os.getpid(),
                    "resident": [k.split(":", 1)[1] for k in self.store.resident],
                    "running": len(sched.running), "waiting": len(sched.waiting),
                    "kv_blocks_free": sched.blocks.free, "kv_blocks": sched.blocks.num_blocks,
                    "kv_bytes": engine.runner.kv_bytes, "aborted": self.loop.aborted}
        return await self.loop.call(snapshot)


async def _coalesced(events: asyncio.Queue) -> tuple[Event | BaseException, str]:
    """The next event and the text of every event queued up to it, as one: a client (or Serve) that falls
    behind the engine gets fewer, longer chunks instead of a backlog of one-token ones."""
    event = await events.get()
    text = [] if isinstance(event, BaseException) else [event.text]
    while not events.empty() and not (isinstance(event, BaseException) or event.done):
        event = events.get_nowait()
        if not isinstance(event, BaseException):
            text.append(event.text)
    return event, "".join(text)


def _refusal(error: BaseException) -> BaseException:
    """The engine's refusal of a request, as the error the Ingress maps to a status code."""
    if isinstance(error, NeverFitsError):
        cls = PromptTooLongError if "context" in str(error) else BadRequestError
        return cls(str(error))
    if isinstance(error, QueueFullError):
        return OverloadedError(str(error))
    if isinstance(error, KeyError):   # an adapter of a version dropped between routing and admission
        return CatalogChangedError(f"{error.args[0]}; retry")
    return error


def _answer(event: Event, text: str, prompt_tokens: int, started: float, first: float | None) -> Answer:
    now = time.perf_counter()
    return Answer(text=text, new_tokens=event.new_tokens, finish_reason=event.finish_reason,
                  prompt_tokens=prompt_tokens, ttft_ms=1000 * ((first or now) - started),
                  total_ms=1000 * (now - started))


def _key(catalog: Catalog, task: str) -> str:
    return f"{catalog.version}:{task}"


def _adapter_paths(catalog: Catalog) -> dict[str, Path]:
    return {_key(catalog, k): catalog.adapter_path(k) for k, t in catalog.tasks.items() if t.adapter is not None}


def _max_rank(catalog: Catalog) -> int:
    return max((t.lora["r"] for t in catalog.tasks.values() if t.lora), default=1)
