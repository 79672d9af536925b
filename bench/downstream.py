"""Downstream answers on the real TASA tasks with a real base (issue 18): every way users combine adapters.

On `--base-model` (default smollm2): one adapter per task, one multi-task adapter on all tasks' data
(the papers' baseline; `--multitask-steps` defaults to steps x tasks, so it sees as many examples of
each task as the per-task adapters do), and the trained routers (classifier + lexical: what `auto`
serves as the ensemble), all with the project's own training functions and their fingerprinted caches
under `--work` (a second run reuses them). The catalog is built from the training split (its task
index from `--index-per-task` samples a task), then `eval generation` runs every mode in pool and
under `--ood` on a held-out split of the train files (`--test-fraction`, seeded), `--limit-per-task`
records a task. The true test split is kept elsewhere.

    .venv/bin/python bench/downstream.py --work /tmp/downstream --tasks fin/sa,legal/jri,med/qa \\
        --steps 10 --limit-per-task 20

Progress on stderr; the last stdout line is one JSON object with both tables and `catalog`, the
catalog it built (adapters, multi-task adapter, routers): run `switchboard eval generation` on it
with other test data.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from routing.base_models import load_tokenizer  # noqa: E402
from routing.catalog import MANIFEST, Catalog  # noqa: E402
from training.adapter import TrainSpec, train_adapters, train_multitask  # noqa: E402
from training.base_model import resolve_base_model  # noqa: E402
from training.catalog_build import build_catalog  # noqa: E402
from training.generation_eval import (InProcessAnswerer, evaluate_generation, format_table,  # noqa: E402
                                      limit_per_task)
from training.records import load_records, split_per_task  # noqa: E402
from training.router_training import train_classifier  # noqa: E402

# ../shared beside the checkout (a worktree sits one level deeper than the main checkout)
TASA = next((p / "shared" / "data" / "tasa" for p in Path(__file__).resolve().parents
             if (p / "shared" / "data" / "tasa").is_dir()), Path("../shared/data/tasa"))
MODES = ("base", "oracle", "routed", "fused", "uniform", "merged", "ties", "multitask")
PROMPT_ROOM = 32
POOL_FREE = ("base", "oracle")   # answers that do not depend on the pool: measured once, shared by both regimes


def log(msg: str) -> None:
    print(f"[downstream] {msg}", file=sys.stderr, flush=True)


def fitting(records: list, base_dir: Path, max_length: int) -> list:
    """The training records whose answer leaves at least PROMPT_ROOM tokens of `max_length` for the prompt
    (training refuses an answer that does not fit); how many each task loses goes to stderr."""
    from collections import Counter

    tokenizer = load_tokenizer(base_dir)
    lengths = [len(ids) + 1 for ids in tokenizer([r.output for r in records], add_special_tokens=False)["input_ids"]]
    kept = [r for r, n in zip(records, lengths) if n <= max_length - PROMPT_ROOM]
    dropped = Counter(r.key for r, n in zip(records, lengths) if n > max_length - PROMPT_ROOM)
    if dropped:
        log(f"training records dropped, answer too long for max_length={max_length}: {dict(sorted(dropped.items()))}")
    return kept


def targets(in_pool: dict, ood: dict) -> dict:
    """Issue 18's targets, each true or false with the figures it compares."""
    m, o = in_pool["macro"], ood["macro"]
    best_baseline = max(m["multitask"], m["merged"], m["ties"])
    return {"routed_ge_0.98_oracle": {"met": m["routed"] >= 0.98 * m["oracle"], "routed": m["routed"],
                                      "oracle": m["oracle"]},
            "routed_above_multitask_and_merged": {"met": m["routed"] > best_baseline, "routed": m["routed"],
                                                  "best_of_multitask_merged_ties": best_baseline},
            "fused_above_multitask_and_merged": {"met": m["fused"] > best_baseline, "fused": m["fused"],
                                                 "best_of_multitask_merged_ties": best_baseline},
            "ood_fused_ge_uniform_plus_3pts": {"met": o["fused"] >= o["uniform"] + 0.03, "fused": o["fused"],
                                               "uniform": o["uniform"]},
            "adapters_beat_base": {"met": m["oracle"] > m["base"], "oracle": m["oracle"], "base": m["base"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=TASA, help="a <domain>/<task>/train.jsonl tree")
    ap.add_argument("--tasks", help="comma-separated task keys (default: every task of --data)")
    ap.add_argument("--base-model", default="smollm2")
    ap.add_argument("--steps", type=int, default=300, help="training steps of each per-task adapter")
    ap.add_argument("--multitask-steps", type=int, help="of the multi-task adapter (default: steps x tasks)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256, help="training prompt + answer tokens")
    ap.add_argument("--test-fraction", type=float, default=0.1)
    ap.add_argument("--limit-per-task", type=int, default=100)
    ap.add_argument("--index-per-task", type=int, default=200, help="samples a task in the catalog's task index")
    ap.add_argument("--router-per-task", type=int, default=300, help="classifier router training samples a task")
    ap.add_argument("--long-answer-tokens", type=int, default=128)
    ap.add_argument("--max-prompt-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(a.threads)
    records = load_records(a.data, "train*.jsonl")
    if a.tasks:
        wanted = a.tasks.split(",")
        unknown = sorted(set(wanted) - {r.key for r in records})
        if unknown:
            raise SystemExit(f"--tasks: {unknown} not in {a.data}")
        records = [r for r in records if r.key in wanted]
    train, held = split_per_task(records, a.test_fraction, seed=0)
    test = limit_per_task(held, a.limit_per_task)
    keys = sorted({r.key for r in records})
    log(f"{len(keys)} tasks {keys}; {len(train)} train / {len(held)} held out, {len(test)} evaluated")
    base_dir = resolve_base_model(a.base_model)
    train = fitting(train, base_dir, a.max_length)
    spec = TrainSpec(max_steps=a.steps, batch_size=a.batch_size, max_length=a.max_length, save_steps=max(10, a.steps))
    multitask_steps = a.multitask_steps or a.steps * len(keys)
    t0 = time.perf_counter()
    train_adapters(base_dir, train, a.work / "adapters", train=spec)
    log(f"per-task adapters: {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    multitask = train_multitask(base_dir, train, a.work / "multitask",
                                train=TrainSpec(**{**spec.__dict__, "max_steps": multitask_steps,
                                                   "save_steps": max(10, multitask_steps)}))
    log(f"multi-task adapter ({multitask_steps} steps): {time.perf_counter() - t0:.0f} s")
    catalog = build_catalog(train, a.work / "catalogs", adapters=a.work / "adapters", base_model=(a.base_model, base_dir),
                            per_task=a.index_per_task, multitask=multitask, versioned=True)
    routed_dir = catalog.root.parent / f"{catalog.version}-routers"
    catalog = (Catalog.load(routed_dir) if (routed_dir / MANIFEST).is_file()
               else train_classifier(catalog, train, routed_dir, per_task=a.router_per_task, epochs=1.0))
    log(f"catalog {catalog.version} at {catalog.root}")
    results = {}
    for ood in (False, True):
        answerer = InProcessAnswerer(catalog, a.work / "eval", ood=ood, long_answer_tokens=a.long_answer_tokens,
                                     max_prompt_tokens=a.max_prompt_tokens)
        shared = results.get("in_pool")

        def answer(mode: str, rows: list, answerer=answerer, shared=shared) -> list[str]:
            return shared["answers"][mode] if shared and mode in POOL_FREE else answerer(mode, rows)

        answers: dict[str, list[str]] = {}

        def recording(mode: str, rows: list) -> list[str]:
            answers[mode] = answer(mode, rows)
            return answers[mode]

        t0 = time.perf_counter()
        result = evaluate_generation(catalog, test, MODES, recording, ood=ood)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        result["answers"] = answers
        regime = "ood" if ood else "in_pool"
        print(f"\n{regime} ({result['seconds']} s)\n{format_table(result)}", file=sys.stderr, flush=True)
        results[regime] = result
    for result in results.values():
        del result["answers"]
    budget = {"base_model": a.base_model, "tasks": keys, "steps": a.steps, "multitask_steps": multitask_steps,
              "batch_size": a.batch_size, "max_length": a.max_length, "limit_per_task": a.limit_per_task,
              "test_fraction": a.test_fraction, "index_per_task": a.index_per_task,
              "router_per_task": a.router_per_task, "long_answer_tokens": a.long_answer_tokens,
              "max_prompt_tokens": a.max_prompt_tokens, "threads": a.threads}
    print(json.dumps({"catalog": str(catalog.root), "budget": budget, **results,
                      "targets": targets(results["in_pool"], results["ood"]),
                      "seconds": round(time.perf_counter() - started, 1)}, ensure_ascii=False))


if __name__ == "__main__":
    main()
