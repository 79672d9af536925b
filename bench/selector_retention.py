"""Adapters-Selector updates: how much old data an `add` must retain so old tasks are not forgotten.

    .venv/bin/python bench/selector_retention.py                          # demo corpus, tiny base (minutes)
    .venv/bin/python bench/selector_retention.py --base-model smollm2     # the real pretrained base
    .venv/bin/python bench/selector_retention.py --tasa ../shared/data/tasa --base-model smollm2 --per-task 32 \
        --steps 60 --max-length 64 --eval-per-task 15

The AS paper's retention experiment: train the selector on the old tasks, then add new tasks by a
second fine-tuning of that selector on the new tasks' data mixed with a fraction R of the old
selection data (`switchboard selector update --op add --ratio R`). For each R it reports top-1
task accuracy on held-out queries of the old tasks and of the new tasks, next to the selector
before the update (old tasks only). New tasks: the last task of each domain (or `--new`).

Data: the demo corpus's train/test splits, or with `--tasa` that tree's test*.jsonl if it has them,
else a fixed 10%-per-task held-out split of it (seed 0); `--eval-per-task` queries per task,
representatives picked from a seeded pool of 8 x `--per-task` training rows per task. Progress goes
to stderr, the table to stdout, and the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, not bench/, wins imports

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from routing.evaluation import evaluate_routing  # noqa: E402
from routing.routers import make_router  # noqa: E402
from training.accelerator import use_cpu_deepspeed_without_cuda  # noqa: E402
from training.adapter import TrainSpec  # noqa: E402
from training.base_model import resolve_base_model  # noqa: E402
from training.catalog_build import build_catalog  # noqa: E402
from training.demo_corpus import demo_records  # noqa: E402
from training.records import Record, group_by_task, train_test_records  # noqa: E402
from training.selector import train_selector, update_selector  # noqa: E402


def log(msg: str) -> None:
    print(f"[retention] {msg}", file=sys.stderr, flush=True)


def load_data(tasa: Path | None, eval_per_task: int, pool_per_task: int) -> tuple[list[Record], list[Record]]:
    """(train, held-out queries). TASA's train side is a seeded pool of `pool_per_task` rows per task
    (K-means picks the representatives from it; embedding all ~2,700 per task costs minutes more)."""
    if tasa is None:
        return demo_records("train"), demo_records("test")
    train, test = train_test_records(tasa)
    rng = random.Random(0)
    sample = lambda rows, n: rng.sample(rows, min(n, len(rows)))  # noqa: E731
    return ([r for rows in group_by_task(train).values() for r in sample(rows, pool_per_task)],
            [r for rows in group_by_task(test).values() for r in sample(rows, eval_per_task)])


def accuracy(catalog, queries: list[Record], groups: dict[str, set[str]]) -> dict[str, float]:
    """Top-1 accuracy over the queries of each named group of tasks (one routing pass for all)."""
    rows = [r for r in queries if r.key in catalog.tasks]
    res = evaluate_routing(make_router("selector", catalog), [r.text() for r in rows], [r.key for r in rows])
    count = Counter(r.key for r in rows)
    return {name: round(sum(res["per_task"][k] * count[k] for k in keys) / sum(count[k] for k in keys), 4)
            for name, keys in groups.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--base-model", default="tiny", help="tiny | smollm2 | a Hugging Face model directory")
    ap.add_argument("--tasa", type=Path, help="the AS paper's <domain>/<task>/train.jsonl tree (default: demo corpus)")
    ap.add_argument("--new", action="append", help="a task key to add in the update (repeatable)")
    ap.add_argument("--ratios", default="0,0.1,0.3,1", help="retained fractions of the old selection data")
    ap.add_argument("--per-task", type=int, default=40, help="K-means representatives per task")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps of each (re)training")
    ap.add_argument("--max-length", type=int, default=128, help="selector prompt + label tokens")
    ap.add_argument("--eval-per-task", type=int, default=50, help="--tasa: held-out queries per task")
    ap.add_argument("--work", type=Path, help="keep catalogs here (default: a temp dir)")
    a = ap.parse_args(argv)
    use_cpu_deepspeed_without_cuda()
    started = time.perf_counter()
    base = resolve_base_model(a.base_model)
    train, test = load_data(a.tasa, a.eval_per_task, 8 * a.per_task)
    groups = group_by_task(train)
    keys = sorted(groups)
    new = set(a.new or [[k for k in keys if k.split("/")[0] == d][-1] for d in sorted({k.split("/")[0] for k in keys})])
    if new - set(keys):
        raise SystemExit(f"--new names unknown tasks {sorted(new - set(keys))}; tasks: {keys}")
    old = set(keys) - new
    spec = TrainSpec(max_steps=a.steps, max_length=a.max_length)
    log(f"base {a.base_model}; old tasks {sorted(old)}; new tasks {sorted(new)}; {len(test)} queries")
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        old_train = [r for r in train if r.key in old]
        routing_only = build_catalog(old_train, work / "old-routing", per_task=200)
        v1, _ = train_selector(routing_only, old_train, work / "v1", base, per_task=a.per_task, train=spec)
        before = accuracy(v1, test, {"old": old})["old"]
        log(f"before the update: old-task top-1 {before}")
        rows = []
        for ratio in [float(x) for x in a.ratios.split(",")]:
            t0 = time.perf_counter()
            v2 = update_selector(v1, "add", work / f"v2-r{ratio}", base, ratio=ratio,
                                 new_records=[r for r in train if r.key in new], per_task=a.per_task, train=spec,
                                 routing_only=True)   # a routing-only bench: no adapters to bring
            acc = accuracy(v2, test, {"old": old, "new": new, "all": set(keys)})
            row = {"ratio": ratio, "old_top1": acc["old"], "new_top1": acc["new"], "all_top1": acc["all"],
                   "seconds": round(time.perf_counter() - t0, 1)}
            log(f"ratio {ratio}: {row}")
            rows.append(row)
    print(f"{'ratio':>6} {'old tasks':>10} {'new tasks':>10} {'all':>6}")
    print(f"{'before':>6} {before:>10.3f} {'-':>10} {'-':>6}")
    for r in rows:
        print(f"{r['ratio']:>6} {r['old_top1']:>10.3f} {r['new_top1']:>10.3f} {r['all_top1']:>6.3f}")
    summary = {"bench": "selector_retention", "base_model": a.base_model, "data": str(a.tasa or "demo"),
               "old_tasks": sorted(old), "new_tasks": sorted(new), "per_task": a.per_task, "steps": a.steps,
               "before_old_top1": before, "rows": rows, "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
