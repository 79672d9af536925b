"""Routing accuracy on labelled queries: the numbers `switchboard eval routing` prints."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable

import numpy as np

from .decision import RouteRequest
from .routers import Router

BATCH = 256


def evaluate_routing(router: Router, texts: list[str], keys: list[str], *, top_k: int = 3,
                     embed: Callable[[list[str]], np.ndarray] | None = None, ood: bool = False,
                     progress: Callable[[int], None] | None = None) -> dict:
    """Route every text and score the decisions against its true task key.

    `ood` leaves each query's own task out of the pool; then only `domain_acc` (of the top-1 task)
    is meaningful. Timing covers embedding and routing, batched as the Serve path batches them.
    """
    if router.name == "fixed":
        raise ValueError("the fixed router is told the task; there is nothing to evaluate")
    if len(texts) != len(keys) or not texts:
        raise ValueError("need one task key per text, and at least one text")
    top1, top3, domain = [], [], []
    per_task: dict[str, list[float]] = defaultdict(list)
    started = time.perf_counter()
    for lo in range(0, len(texts), BATCH):
        batch_t, batch_k = texts[lo: lo + BATCH], keys[lo: lo + BATCH]
        emb = embed(batch_t) if router.needs_embedding else [None] * len(batch_t)
        requests = [RouteRequest(t, top_k=top_k, embedding=e, exclude=k if ood else None)
                    for t, k, e in zip(batch_t, batch_k, emb)]
        for truth, decision in zip(batch_k, router.route(requests)):
            ranked = [k for k, _ in decision.tasks]
            hit = float(ranked[0] == truth)
            top1.append(hit)
            top3.append(float(truth in ranked[:3]))
            domain.append(float(ranked[0].split("/")[0] == truth.split("/")[0]))
            per_task[truth].append(hit)
        if progress:
            progress(len(batch_t))
    elapsed = time.perf_counter() - started
    return {"n": len(texts), "router": router.name, "catalog_version": router.catalog.version, "ood": ood,
            "top1_task_acc": float(np.mean(top1)), "top3_task_acc": float(np.mean(top3)),
            "domain_acc": float(np.mean(domain)),
            "per_task": {k: float(np.mean(v)) for k, v in sorted(per_task.items())},
            "ms_per_query": 1000 * elapsed / len(texts)}
