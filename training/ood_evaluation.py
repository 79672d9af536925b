"""Routing under LoRAuter's three regimes (§4.1, App. B), trained routers retrained without the held-out tasks.

    non-OOD   the query's task: validation samples (task representation) and adapter both available.
    semi-OOD  its validation samples available, its adapter removed from the pool: routing is the same
              as non-OOD (its task is still represented); only the adapter served for that task
              changes, so this regime differs in answers, not in routes.
    OOD       its validation samples and its adapter both removed.

For OOD, the training-free centroid router drops each query's own task from the pool (`exclude`: its
index rows are its only knowledge of the task, so this is exactly the regime). A trained router learned
the task in training, so dropping it at inference leaks; instead the catalog's tasks are split into
`folds` groups, and for each group a catalog without those tasks (index rows and adapters gone, the
calibration refitted) gets the router retrained on the remaining tasks' training records only, and
routes the group's queries. That is stricter than LoRAuter (the other tasks of the group are missing
too), never looser: no router has seen a held-out task. A route cannot be right under OOD; what is scored is whether the
top task is in the query's domain, and LoRAuter scores answers (normalised by the oracle) for the rest.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from routing.catalog import Catalog, derive_catalog
from routing.evaluation import evaluate_routing
from routing.routers import ROUTERS, best_router, make_router
from routing.task_index import TaskIndex

from .records import Record

Regime = Literal["non-ood", "semi-ood", "ood"]
REGIMES: tuple[Regime, ...] = ("non-ood", "semi-ood", "ood")


def task_folds(keys: list[str], folds: int, seed: int = 0) -> list[list[str]]:
    """`keys` shuffled (seeded) and dealt into `folds` groups of near-equal size."""
    if not 2 <= folds <= len(keys):
        raise ValueError(f"need 2 <= folds <= {len(keys)} tasks, got {folds}")
    order = sorted(keys)
    random.Random(seed).shuffle(order)
    return [sorted(order[i::folds]) for i in range(folds)]


def without_tasks(catalog: Catalog, held_out: list[str], out: Path) -> Catalog:
    """`catalog` minus `held_out`: their index rows, adapters and the routers trained with them gone."""
    tasks = {k: t for k, t in catalog.tasks.items() if k not in held_out}
    index = catalog.index
    keep = np.array([index.keys[label] not in held_out for label in index.labels])
    sub = TaskIndex.from_embeddings(index.embeddings[keep], [index.keys[label] for label in index.labels[keep]])
    return derive_catalog(catalog, out, tasks=tasks, index=sub)


def retrain(router: str, catalog: Catalog, records: list[Record], out: Path, text_mode: str,
            recipe: Catalog | None = None) -> Catalog:
    """`catalog` with `router` trained on `records` (of its tasks only), as `train router` would. The
    selector is retrained with the recipe of the one in `recipe` (the full catalog's): its base model,
    selection (per task, embedding, metric, prompt), LoRA and schedule."""
    from . import router_training

    if router in ("ensemble", "classifier"):
        return router_training.train_classifier(catalog, records, out, text_mode=text_mode, progress=False)
    if router == "lexical":
        return router_training.train_lexical(catalog, records, out, text_mode=text_mode, progress=False)
    if router == "selector":
        if recipe is None:
            raise ValueError("retraining the selector needs `recipe`: the catalog whose selector it copies")
        return _retrain_selector(recipe.router_path("selector"), catalog, records, out)
    raise ValueError(f"retraining the {router!r} router per OOD fold is not supported here; use centroid, "
                     f"lexical, classifier, ensemble or selector")


def _retrain_selector(trained: Path, catalog: Catalog, records: list[Record], out: Path) -> Catalog:
    from .selector import train_selector, trained_recipe

    base, lora, train, how = trained_recipe(trained)
    return train_selector(catalog, records, out, base, per_task=how["per_task"], embed=how["embed"],
                          metric=how["metric"], text_mode=how["text_mode"], prompt=how["prompt"], lora=lora,
                          train=train, progress=False)[0]


def evaluate_regime(catalog: Catalog, router: str, texts: list[str], keys: list[str], regime: Regime, *,
                    embed: Callable[[list[str]], np.ndarray], train_records: list[Record] = (), folds: int = 3,
                    text_mode: str = "input", seed: int = 0, top_k: int = 3) -> dict:
    """Route `texts` (true tasks `keys`) under `regime`; see the module docstring."""
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; use one of {', '.join(REGIMES)}")
    name = best_router(catalog) if router == "auto" else router
    if regime != "ood":
        result = evaluate_routing(make_router(name, catalog), texts, keys, top_k=top_k, embed=embed)
        return {**result, "regime": regime}
    trained = bool(ROUTERS[name].artefacts) if name in ROUTERS else False
    if not trained:
        result = evaluate_routing(make_router(name, catalog), texts, keys, top_k=top_k, embed=embed, ood=True)
        return {**result, "regime": "ood", "retrained": False}
    if not train_records:
        raise ValueError(f"the OOD regime retrains the {name} router without each held-out task: give its "
                         f"training records (--train)")
    domain: list[float] = []
    per_fold = []
    with tempfile.TemporaryDirectory(prefix="sb-ood-") as tmp:
        for f, held in enumerate(task_folds(catalog.keys, folds, seed)):
            rows = [i for i, k in enumerate(keys) if k in held]
            if not rows:
                continue
            sub = without_tasks(catalog, held, Path(tmp) / f"fold{f}")
            sub = retrain(name, sub, [r for r in train_records if r.key not in held], Path(tmp) / f"fold{f}-r",
                          text_mode, recipe=catalog)
            result = evaluate_routing(make_router(name, sub), [texts[i] for i in rows], [keys[i] for i in rows],
                                      top_k=min(top_k, len(sub.keys)), embed=embed)
            domain += [result["domain_acc"]] * len(rows)
            per_fold.append({"held_out": held, "n": len(rows), "domain_acc": result["domain_acc"]})
    return {"regime": "ood", "router": name, "n": len(domain), "folds": per_fold,
            "domain_acc": float(np.mean(domain)), "retrained": True}
