"""Routing under LoRAuter's three regimes on FLAN-48 (default: centroid and lexical routers), no leak.

Fold 0 of `bench/routing_quality.py`'s FLAN protocol (each task's 20 samples in a seeded order; 16 build
the index and train the lexical router, 4 are queries). non-OOD and semi-OOD route alike (the task is
still represented; semi-OOD changes only the adapter served); OOD removes each query's task: for the
centroid router its index rows (exact), for a trained router (lexical, classifier, ensemble) a fold of
tasks, retrained without them (`training.ood_evaluation`). Scored: top-1 task (non-OOD) and top-1 domain (all regimes).

    .venv/bin/python bench/ood_regimes.py --flan ../shared/data/flan48/validation.jsonl --work /tmp/ood [--folds 4] \
        [--routers centroid,lexical,ensemble,selector] [--selector-steps 150 --selector-embed base-embeddings ...]

The selector (AS, on `--selector-base`) is trained once on every task, then retrained per OOD fold with the
same recipe (`training.ood_evaluation.retrain`): one SmolLM2 LoRA training per fold.

Progress on stderr; one JSON object as the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from routing.encoder import shared_encoder  # noqa: E402
from training.catalog_build import build_catalog  # noqa: E402
from training.ood_evaluation import evaluate_regime  # noqa: E402
from training.records import group_by_task, load_records  # noqa: E402
from training.base_model import resolve_base_model  # noqa: E402
from training.router_training import train_classifier, train_lexical  # noqa: E402
from training.selector import SELECTOR_TRAIN, train_selector  # noqa: E402

HELD_OUT = 4   # per task, as bench/routing_quality.py's FLAN folds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flan", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--folds", type=int, default=4, help="task folds a trained router is retrained without")
    ap.add_argument("--routers", default="centroid,lexical", help="comma-separated: centroid, lexical, classifier, "
                                                                   "ensemble, selector")
    ap.add_argument("--selector-base", default="smollm2", help="the selector's base model")
    ap.add_argument("--selector-steps", type=int, default=150)
    ap.add_argument("--selector-batch-size", type=int, default=SELECTOR_TRAIN.batch_size)
    ap.add_argument("--selector-max-length", type=int, default=SELECTOR_TRAIN.max_length,
                    help="its training and scoring window (prompt + label tokens)")
    ap.add_argument("--selector-per-task", type=int, default=16, help="K-means representatives a task")
    ap.add_argument("--selector-embed", default="encoder", choices=["encoder", "base-embeddings"])
    ap.add_argument("--selector-metric", default="cos", choices=["l2", "ip", "cos"])
    a = ap.parse_args()
    started = time.perf_counter()
    groups = {k: list(v) for k, v in group_by_task(load_records(a.flan)).items()}
    for key, rows in groups.items():
        random.Random(f"0:{key}").shuffle(rows)
    train = [r for rows in groups.values() for r in rows[HELD_OUT:]]
    test = [r for rows in groups.values() for r in rows[:HELD_OUT]]
    routers = a.routers.split(",")
    catalog = build_catalog(train, a.work / "catalog")
    if {"classifier", "ensemble"} & set(routers):
        catalog = train_classifier(catalog, train, a.work / "trained", progress=False)
    elif "lexical" in routers:
        catalog = train_lexical(catalog, train, a.work / "trained", progress=False)
    if "selector" in routers:   # each OOD fold retrains it with this recipe, without the fold's tasks
        base = resolve_base_model(a.selector_base)
        catalog, _ = train_selector(catalog, train, a.work / "selector", base, per_task=a.selector_per_task,
                                    embed=a.selector_embed, metric=a.selector_metric,
                                    train=replace(SELECTOR_TRAIN, max_steps=a.selector_steps,
                                                  batch_size=a.selector_batch_size,
                                                  max_length=a.selector_max_length), progress=False)
    texts, keys = [r.input for r in test], [r.key for r in test]
    embed = shared_encoder().encode
    rows = {}
    for router in routers:
        for regime in ("non-ood", "ood"):   # semi-OOD routes as non-OOD does (only the adapter served differs)
            res = evaluate_regime(catalog, router, texts, keys, regime, embed=embed, train_records=train,
                                  folds=a.folds)
            rows.setdefault(router, {})[regime] = {"top1": res.get("top1_task_acc") if regime != "ood" else None,
                                                   "domain": round(res["domain_acc"], 4), "n": res["n"]}
            print(f"{router} {regime}: {rows[router][regime]}", file=sys.stderr, flush=True)
        rows[router]["semi-ood"] = rows[router]["non-ood"]
    print(json.dumps({"tasks": len(groups), "queries": len(test), "folds": a.folds, "routers": rows,
                      "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
