"""Routing accuracy on labelled queries: the numbers `switchboard eval routing` prints."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path
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
    is meaningful. That is LoRAuter's OOD regime for a training-free router only: a trained one saw
    the task in training (`training.ood_evaluation` retrains it without the task instead). Timing
    covers embedding and routing, batched as the Serve path batches them.
    """
    if router.name == "fixed":
        raise ValueError("the fixed router is told the task; there is nothing to evaluate")
    if len(texts) != len(keys) or not texts:
        raise ValueError("need one task key per text, and at least one text")
    if router.needs_embedding and embed is None:
        raise ValueError(f"the {router.name} router needs query embeddings: pass `embed`")
    top1, top3, domain = [], [], []
    per_task: dict[str, list[float]] = defaultdict(list)
    confusion: dict[str, Counter] = defaultdict(Counter)
    started = time.perf_counter()
    for lo in range(0, len(texts), BATCH):
        batch_t, batch_k = texts[lo: lo + BATCH], keys[lo: lo + BATCH]
        emb = embed(batch_t) if router.needs_embedding else [None] * len(batch_t)
        requests = [RouteRequest(t, top_k=max(top_k, 3), embedding=e, exclude=k if ood else None)   # top-3 needs 3
                    for t, k, e in zip(batch_t, batch_k, emb)]
        for truth, decision in zip(batch_k, router.route(requests)):
            ranked = [k for k, _ in decision.tasks]
            hit = float(ranked[0] == truth)
            top1.append(hit)
            top3.append(float(truth in ranked[:3]))
            domain.append(float(ranked[0].split("/")[0] == truth.split("/")[0]))
            per_task[truth].append(hit)
            confusion[truth][ranked[0]] += 1
        if progress:
            progress(len(batch_t))
    elapsed = time.perf_counter() - started
    return {"n": len(texts), "router": router.name, "catalog_version": router.catalog.version, "ood": ood,
            "top1_task_acc": float(np.mean(top1)), "top3_task_acc": float(np.mean(top3)),
            "domain_acc": float(np.mean(domain)),
            "per_task": {k: float(np.mean(v)) for k, v in sorted(per_task.items())},
            "confusion": {k: dict(sorted(c.items())) for k, c in sorted(confusion.items())},
            "ms_per_query": 1000 * elapsed / len(texts)}


def plot_confusion(result: dict, path: str | Path) -> Path:
    """The confusion matrix of `evaluate_routing`'s result as a PNG: true task (rows) x top-1 task,
    each row normalised to 1, with the counts written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = result["confusion"]
    rows = list(confusion)
    cols = sorted(set(rows) | {k for c in confusion.values() for k in c})
    counts = np.array([[confusion[r].get(c, 0) for c in cols] for r in rows], dtype=float)
    share = counts / counts.sum(1, keepdims=True)
    size = max(4.0, 0.45 * len(cols) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, 0.45 * len(rows) + 2))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel("routed to (top-1)")
    ax.set_ylabel("true task")
    if len(cols) <= 40:
        for i, j in zip(*np.nonzero(counts)):
            ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=6,
                    color="white" if share[i, j] > 0.5 else "black")
    ood = ", own task left out" if result.get("ood") else ""
    ax.set_title(f"{result['router']} router on {result['n']} queries{ood}: top-1 {result['top1_task_acc']:.3f}",
                 fontsize=9)
    return save_figure(fig, ax, image, path)


def save_figure(fig, ax, image, path: str | Path) -> Path:
    """A heatmap's colour bar, layout and PNG at `path` (parents made); the figure is closed."""
    import matplotlib.pyplot as plt

    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
