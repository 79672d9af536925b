"""The selector's prompt: ours ("Which task is this request for?") vs the AS paper's (App. A: an
instruction and the lists of domains and tasks), trained alike and scored on the validation split.

The cheapest honest budget: the demo corpus and a tiny base, one selection (K-means representatives
of the training split, the same for both), the same steps and seed; top-1 routing accuracy on the
demo's validation split (which neither selector trains on) and on its test split.

    .venv/bin/python bench/selector_prompt.py --work /tmp/prompt [--base-model tiny-test] [--steps 150]

Progress on stderr; one JSON object as the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from routing.decision import RouteRequest  # noqa: E402
from routing.routers import make_router  # noqa: E402
from training.base_model import resolve_base_model  # noqa: E402
from training.catalog_build import build_catalog  # noqa: E402
from training.demo_corpus import demo_records  # noqa: E402
from training.selector import SELECTOR_TRAIN, train_selector  # noqa: E402


def top1(catalog, records) -> float:
    router = make_router("selector", catalog)
    hits = 0
    for lo in range(0, len(records), 32):
        batch = records[lo:lo + 32]
        hits += sum(d.top == r.key for d, r in zip(router.route([RouteRequest(r.input, top_k=1) for r in batch]), batch))
    return round(hits / len(records), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--base-model", default="tiny-test")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--per-task", type=int, default=40)
    a = ap.parse_args()
    started = time.perf_counter()
    base = resolve_base_model(a.base_model, progress=False)
    train, val, test = (demo_records(s) for s in ("train", "val", "test"))
    routing_only = build_catalog(val, a.work / "routing")
    spec = replace(SELECTOR_TRAIN, max_steps=a.steps)
    rows = {}
    for prompt in ("ours", "paper"):
        t0 = time.perf_counter()
        catalog, _ = train_selector(routing_only, train, a.work / prompt, base, per_task=a.per_task, prompt=prompt,
                                    train=spec, progress=False)
        rows[prompt] = {"val_top1": top1(catalog, val), "test_top1": top1(catalog, test),
                        "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{prompt}: {rows[prompt]}", file=sys.stderr, flush=True)
    print(json.dumps({"base_model": a.base_model, "steps": a.steps, "per_task": a.per_task, "n_val": len(val),
                      "n_test": len(test), "prompts": rows, "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
