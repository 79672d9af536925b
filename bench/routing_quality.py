"""Routing quality: every router on TASA and FLAN-48, trained and measured side by side in one run.

    .venv/bin/python bench/routing_quality.py --tasa ../shared/data/tasa --flan ../shared/data/flan48/validation.jsonl
    .venv/bin/python bench/routing_quality.py --tasa ../shared/data/tasa --flan ../shared/data/flan48/validation.jsonl --quick

Protocol (all splits seeded, nothing tuned on the held-out parts):
  TASA     our own held-out split: `split_per_task(records, 0.1, seed=0)`. The routing-only catalog
           indexes 200 samples per task of the other 90% (LoRAuter's budget); trained routers learn
           from that 90%. Two columns: queries and training texts are the input alone, or the
           instruction + input (the catalog and the classifier are built in that text mode).
           TASA repeats many inputs word for word (fin/ha, fin/sa: half their rows), so a random
           split puts copies of 45% of the held-out inputs in the training part; the "new text"
           columns score only the held-out queries whose text the training part does not contain.
  FLAN-48  48 tasks x 20 samples: 5 folds over each task's 20 (seeded order); per fold 16 build the
           index / train the routers and 4 are held out. Pooled over folds: top-1, top-3, domain of
           top-1, and, for the training-free centroid router only, OOD domain (each query's own task
           removed from the pool: exactly LoRAuter's OOD regime for a router whose only knowledge of a
           task is its index rows; a trained router learned the task in training, so for it the same
           exclusion leaks and is not reported).
  unseen   LoRAuter's OOD regime for every router: 12 FLAN tasks removed from the index *and* from
           the routers' training (retrained without them), their queries scored on their domain.
  --split-seed N draws another TASA split and FLAN fold order (0, the default, is the recorded one).
  --tasa-test / --flan-test: measure on a given test split instead (TASA also when the tree has
           test*.jsonl files beside its train*.jsonl): the routers then learn from all the training data.
  ms_per_query: mean over the in-pool evaluations, batches of 256 as Serve batches them: routing +
           the encoder's embedding time (measured once per query set) for routers that need it.
--quick: 20 held-out TASA queries per task, 64 index/training samples per task and one epoch on
TASA, one FLAN fold with 3 epochs (plus the unseen split). Indicative only; the full run is the result.

Rows: centroid (training-free), and from one classifier training (which also fits the lexical
model on every non-calibration record): lexical, classifier, ensemble (the two summed in log space).
Adding a router: a row in ROUTERS, `label: (registered router name, artefact label or None)`, and
for a trained artefact a function in TRAINERS, `(catalog, train records, out dir, Setting) ->
derived catalog`. `--selector BASE` adds the AS selector that way: a LoRA selector on that base
model (e.g. smollm2), trained on the cell's K-means selection (`Setting.per_task` per task out of a
seeded pool of 8x that; all of FLAN's 16) for `--selector-steps` steps. --ablation adds a row for
the classifier trained without domain smoothing.
Progress goes to stderr, the table to stdout, and the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

# Run as `python bench/routing_quality.py`, bench/ comes first on sys.path: the repository must win
# (a bench/training.py would otherwise shadow the training package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from routing.catalog import Catalog  # noqa: E402
from routing.encoder import shared_encoder  # noqa: E402
from routing.evaluation import evaluate_routing  # noqa: E402
from routing.routers import ROUTERS as REGISTERED, Router  # noqa: E402
from routing.routers.probabilistic import ProbabilisticRouter  # noqa: E402
from training.accelerator import use_cpu_deepspeed_without_cuda  # noqa: E402
from training.catalog_build import build_catalog  # noqa: E402
from training.records import (Record, group_by_task, has_test_split, load_records,  # noqa: E402
                              train_test_records)
from training.router_training import train_classifier  # noqa: E402


@dataclass(frozen=True)
class Setting:
    """How a trainer is asked to train for one benchmark cell."""
    text_mode: str
    per_task: int | None
    epochs: float
    calibration_per_task: int
    max_length: int = 128
    domain_smoothing: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class Scale:
    tasa_eval_per_task: int | None   # held-out TASA queries per task (None: the whole 10%)
    tasa_index_per_task: int         # centroid samples per task in the TASA catalog
    tasa: Setting
    flan_folds: int                  # of 5
    flan: Setting
    flan_unseen: bool = True         # the unseen-task split (one more training)
    split_seed: int = 0              # TASA's held-out split and FLAN's fold order (0: the recorded results)


# TASA texts are short (median 25 tokens): 64 with head+tail truncation; FLAN prompts run longer.
FULL = Scale(None, 200, Setting("input", 300, 2.0, 50, max_length=64, domain_smoothing=0.1), 5,
             Setting("input", None, 3.0, 2, max_length=128, domain_smoothing=0.1))
QUICK = Scale(20, 64, Setting("input", 64, 1.0, 10, max_length=64, domain_smoothing=0.1), 1,
              Setting("input", None, 3.0, 2, max_length=128, domain_smoothing=0.1))
FLAN_FOLDS, FLAN_HELD_OUT, FLAN_UNSEEN_TASKS = 5, 4, 12
POOL_PER_REP = 8  # selector: K-means candidates per representative kept

Trainer = Callable[[Catalog, list[Record], Path, Setting], Catalog]


def _classifier(catalog: Catalog, records: list[Record], out: Path, s: Setting) -> Catalog:
    return train_classifier(catalog, records, out, text_mode=s.text_mode, per_task=s.per_task, epochs=s.epochs,
                            seed=s.seed, calibration_per_task=s.calibration_per_task, max_length=s.max_length,
                            domain_smoothing=s.domain_smoothing, progress=True)


# Trained artefacts: label -> trainer.  Rows: label -> (router name, artefact its catalog needs; None: training-free).
TRAINERS: dict[str, Trainer] = {"classifier": _classifier}
# The classifier's catalog also carries the lexical router (fitted alongside it), so three rows share one training.
ROUTERS: dict[str, tuple[str, str | None]] = {
    "centroid": ("centroid", None), "lexical": ("lexical", "classifier"), "classifier": ("classifier", "classifier"),
    "ensemble": ("ensemble", "classifier")}
ABLATION_TRAINERS: dict[str, Trainer] = {
    "classifier-ds0": lambda cat, recs, out, s: _classifier(cat, recs, out, replace(s, domain_smoothing=0.0))}
ABLATION_ROUTERS: dict[str, tuple[str, str | None]] = {"classifier-ds0": ("classifier", "classifier-ds0")}
COLUMNS = [("tasa_input_top1", "TASA in"), ("tasa_input_novel_top1", "in, new text"),
           ("tasa_instruction_top1", "TASA ins+in"), ("tasa_instruction_novel_top1", "ins+in, new"),
           ("flan_top1", "FLAN top1"),
           ("flan_top3", "FLAN top3"), ("flan_domain", "FLAN dom"), ("flan_ood_domain", "OOD dom ctr"),
           ("flan_unseen_domain", "OOD unseen"), ("ms_per_query", "ms/query")]
TARGETS = {"tasa_input_top1": 0.92, "tasa_instruction_top1": 0.97, "flan_top1": 0.80, "flan_top3": 0.95,
           "flan_domain": 0.95, "flan_ood_domain": 0.80}


def log(msg: str) -> None:
    print(f"[routing-quality] {msg}", file=sys.stderr, flush=True)


class CachedEmbedder:
    """Encodes a query set once; `embed` then looks rows up, and `ms_per_query` is the encoding cost."""

    def __init__(self, texts: list[str]):
        started = time.perf_counter()
        emb = shared_encoder().encode(texts, progress=True)
        self.ms_per_query = 1000 * (time.perf_counter() - started) / len(texts)
        self.rows = {t: e for t, e in zip(texts, emb)}

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.rows[t] for t in texts])


def _memoize_logits(router: Router) -> None:
    """After the timed pass, OOD re-routing reuses the logits (they do not depend on the pool)."""
    if not isinstance(router, ProbabilisticRouter) or hasattr(router, "_memo"):
        return
    router._memo, compute = {}, router.logits

    def logits(texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in router._memo]
        if missing:
            router._memo.update(zip(missing, compute(missing)))
        return np.stack([router._memo[t] for t in texts])

    router.logits = logits


def run_split(name: str, train: list[Record], test: list[Record], work: Path, setting: Setting,
              index_per_task: int | None, ood: bool, train_s: dict) -> dict[str, dict]:
    """Build the catalog, train what ROUTERS need, evaluate every router on `test`."""
    log(f"{name}: {len(train)} training records, {len(test)} queries ({setting.text_mode})")
    base = build_catalog(train, work / f"{name}-base", text_mode=setting.text_mode, per_task=index_per_task,
                         seed=setting.seed)
    catalogs: dict[str | None, Catalog] = {None: base}
    for artefact in dict.fromkeys(a for _, a in ROUTERS.values() if a is not None):
        started = time.perf_counter()
        catalogs[artefact] = TRAINERS[artefact](base, train, work / f"{name}-{artefact}", setting)
        train_s.setdefault(artefact, []).append(time.perf_counter() - started)
    texts, keys = [r.text(setting.text_mode) for r in test], [r.key for r in test]
    embedder = CachedEmbedder(texts)
    seen = {r.text(setting.text_mode) for r in train}
    novel = [i for i, t in enumerate(texts) if t not in seen]
    out = {}
    for label, (router_name, artefact) in ROUTERS.items():
        router = REGISTERED[router_name](catalogs[artefact])
        res = evaluate_routing(router, texts, keys, embed=embedder.embed)
        res["ms_per_query"] += embedder.ms_per_query if router.needs_embedding else 0.0
        if novel:
            res["novel"] = {"n": len(novel), "top1_task_acc": evaluate_routing(
                router, [texts[i] for i in novel], [keys[i] for i in novel], embed=embedder.embed)["top1_task_acc"]}
        if ood and artefact is None:   # trained routers saw the task: their exclusion proxy would leak
            _memoize_logits(router)
            res["ood_domain_acc"] = evaluate_routing(router, texts, keys, embed=embedder.embed, ood=True)["domain_acc"]
        log(f"{name} {label}: top1 {res['top1_task_acc']:.3f} top3 {res['top3_task_acc']:.3f} "
            f"domain {res['domain_acc']:.3f}"
            + (f" ood-domain {res['ood_domain_acc']:.3f}" if "ood_domain_acc" in res else "")
            + f" ({res['ms_per_query']:.1f} ms/query)")
        out[label] = res
    return out


def tasa(path: Path, scale: Scale, work: Path, train_s: dict, test: Path | None = None) -> dict[str, dict]:
    train, held = train_test_records(path, test, 0.1, seed=scale.split_seed)
    if scale.tasa_eval_per_task is not None:
        held = [r for key, rows in group_by_task(held).items()
                for r in random.Random(f"eval:{key}").sample(rows, min(scale.tasa_eval_per_task, len(rows)))]
    results = {}
    for mode, column in (("input", "tasa_input"), ("instruction+input", "tasa_instruction")):
        split = run_split(column, train, held, work, replace(scale.tasa, text_mode=mode), scale.tasa_index_per_task,
                          ood=False, train_s=train_s)
        for router, res in split.items():
            results.setdefault(router, {})[column] = res
    return results


def flan_folds(path: Path, groups: dict[str, list[Record]], scale: Scale,
               test: Path | None) -> list[tuple[list[Record], list[Record]]]:
    """(training, held-out) per fold: all 20 samples per task against `--flan-test`, else our 5 folds."""
    if test is not None:
        return [train_test_records(path, test)]
    folds = []
    for fold in range(scale.flan_folds):
        lo, hi = fold * FLAN_HELD_OUT, (fold + 1) * FLAN_HELD_OUT
        folds.append(([r for rows in groups.values() for r in rows[:lo] + rows[hi:]],
                      [r for rows in groups.values() for r in rows[lo:hi]]))
    return folds


def flan(path: Path, scale: Scale, work: Path, train_s: dict, test: Path | None = None) -> dict[str, dict]:
    groups = {k: list(v) for k, v in group_by_task(load_records(path)).items()}
    for key, rows in groups.items():
        random.Random(f"{scale.split_seed}:{key}").shuffle(rows)
    per_fold: dict[str, list[dict]] = {}
    for fold, (train, held) in enumerate(flan_folds(path, groups, scale, test)):
        split = run_split(f"flan-fold{fold}", train, held, work, replace(scale.flan, seed=fold), None, ood=True,
                          train_s=train_s)
        for router, res in split.items():
            per_fold.setdefault(router, []).append(res)
    out = {}
    for router, folds in per_fold.items():
        n = np.array([f["n"] for f in folds])
        pooled = {k: float(np.average([f[k] for f in folds], weights=n))
                  for k in ("top1_task_acc", "top3_task_acc", "domain_acc", "ood_domain_acc", "ms_per_query")
                  if all(k in f for f in folds)}
        out[router] = {"flan": {**pooled, "n": int(n.sum()), "folds": len(folds),
                                "per_fold_top1": [f["top1_task_acc"] for f in folds]}}
    if scale.flan_unseen and len(groups) <= FLAN_UNSEEN_TASKS:
        log(f"no unseen-task split: {len(groups)} tasks leave none in the pool once {FLAN_UNSEEN_TASKS} are unseen")
    elif scale.flan_unseen:
        keys = sorted(groups)
        random.Random("unseen-tasks").shuffle(keys)
        unseen = set(keys[:FLAN_UNSEEN_TASKS])
        train = [r for k, rows in groups.items() if k not in unseen for r in rows[FLAN_HELD_OUT:]]
        pool_domains = {r.domain for r in train}
        queries = [r for k in sorted(unseen) for r in groups[k] if r.domain in pool_domains]
        split = run_split("flan-unseen", train, queries, work, scale.flan, None, ood=False, train_s=train_s)
        for router, res in split.items():
            out[router]["flan_unseen"] = {"domain_acc": res["domain_acc"], "n": res["n"], "tasks": sorted(unseen),
                                          "ms_per_query": res["ms_per_query"]}
    return out


def summarise(results: dict[str, dict]) -> dict[str, dict]:
    rows = {}
    for router, cells in results.items():
        row, ms, n = {}, 0.0, 0
        for column in ("tasa_input", "tasa_instruction"):
            if column in cells:
                row[f"{column}_top1"] = cells[column]["top1_task_acc"]
                row[f"{column}_novel_top1"] = cells[column].get("novel", {}).get("top1_task_acc")
        if "flan" in cells:
            f = cells["flan"]
            row.update({"flan_top1": f["top1_task_acc"], "flan_top3": f["top3_task_acc"],
                        "flan_domain": f["domain_acc"], "flan_ood_domain": f.get("ood_domain_acc")})
        if "flan_unseen" in cells:
            row["flan_unseen_domain"] = cells["flan_unseen"]["domain_acc"]
        for name, cell in cells.items():
            if name == "flan_unseen":
                continue
            ms += cell["ms_per_query"] * cell["n"]
            n += cell["n"]
        row["ms_per_query"] = ms / n if n else None
        rows[router] = row
    return rows


def table(rows: dict[str, dict]) -> str:
    lines = ["router      " + "".join(f"{title:>14}" for _, title in COLUMNS)]
    for router, row in rows.items():
        cells = []
        for key, _ in COLUMNS:
            v = row.get(key)
            cells.append(f"{'-':>14}" if v is None else f"{v:>14.1f}" if key == "ms_per_query" else f"{v:>14.3f}")
        lines.append(f"{router:<12}" + "".join(cells))
    lines.append("target      " + "".join(f"{TARGETS[k]:>14.2f}" if k in TARGETS else f"{'':>14}" for k, _ in COLUMNS))
    return "\n".join(lines)


def add_selector(base_model: str, steps: int) -> None:
    """The AS selector row: a selector LoRA on `base_model`, scored over the catalog's labels."""
    from training.adapter import TrainSpec
    from training.base_model import resolve_base_model
    from training.selector import train_selector

    base = resolve_base_model(base_model)

    def trainer(catalog: Catalog, records: list[Record], out: Path, s: Setting) -> Catalog:
        per_task = s.per_task or FLAN_FOLDS * FLAN_HELD_OUT
        # K-means over a seeded pool of POOL_PER_REP x per_task samples per task, not all of TASA's
        # ~2,700: the representatives stay spread over the task, the embedding costs minutes less.
        pool = [r for rows in group_by_task(records).values()
                for r in random.Random(f"pool:{s.seed}").sample(rows, min(len(rows), POOL_PER_REP * per_task))]
        return train_selector(catalog, pool, out, base, per_task=per_task, text_mode=s.text_mode, seed=s.seed,
                              train=TrainSpec(max_steps=steps, max_length=s.max_length, seed=s.seed))[0]

    TRAINERS["selector"] = trainer
    ROUTERS["selector"] = ("selector", "selector")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasa", type=Path, default=Path("../shared/data/tasa"), help="TASA tree <domain>/<task>/*.jsonl")
    ap.add_argument("--flan", type=Path, default=Path("../shared/data/flan48/validation.jsonl"), help="FLAN-48 JSONL")
    ap.add_argument("--tasa-test", type=Path, help="a TASA test split (tree or file) to measure on instead of our "
                    "10%%; a test*.jsonl beside each train*.jsonl in --tasa is used the same way")
    ap.add_argument("--flan-test", type=Path, help="FLAN-48 test queries to measure on (the routers then learn from "
                    "all of --flan) instead of the 5 folds")
    ap.add_argument("--quick", action="store_true", help="fewer samples, one epoch, one FLAN fold (minutes)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (this machine has 2 cores)")
    ap.add_argument("--work", type=Path, default=None, help="keep the catalogs here (default: a temp dir)")
    ap.add_argument("--ablation", action="store_true", help="also the classifier without domain smoothing")
    ap.add_argument("--selector", metavar="BASE", help="also the AS selector on this base model (tiny | smollm2 | DIR)")
    ap.add_argument("--selector-steps", type=int, default=150, help="selector training steps per cell")
    ap.add_argument("--split-seed", type=int, default=0,
                    help="another held-out split / fold order, to see how much the split alone moves the figures")
    ap.add_argument("--flan-folds", type=int, default=None, help="override the number of FLAN folds (1..5)")
    args = ap.parse_args(argv)
    use_cpu_deepspeed_without_cuda()
    if args.ablation:
        TRAINERS.update(ABLATION_TRAINERS)
        ROUTERS.update(ABLATION_ROUTERS)
    if args.selector:
        add_selector(args.selector, args.selector_steps)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    scale = QUICK if args.quick else FULL
    scale = replace(scale, split_seed=args.split_seed)
    if args.flan_folds is not None:
        scale = replace(scale, flan_folds=max(1, min(FLAN_FOLDS, args.flan_folds)))
    present = {name: p for name, p in (("tasa", args.tasa), ("flan", args.flan)) if p.exists()}
    for name, p in (("tasa", args.tasa), ("flan", args.flan)):
        if name not in present:
            log(f"skipping {name}: {p} not found")
    if not present:
        summary = {"skipped": "no data: pass --tasa DIR and/or --flan FILE"}
        print(json.dumps(summary))
        return summary
    started = time.perf_counter()
    results: dict[str, dict] = {}
    train_s: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="sb-routing-quality-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name, fn, test in (("tasa", tasa, args.tasa_test), ("flan", flan, args.flan_test)):
            if name in present:
                for router, cells in fn(present[name], scale, work, train_s, test).items():
                    results.setdefault(router, {}).update(cells)
    rows = summarise(results)
    print(table(rows))
    summary = {"bench": "routing_quality", "quick": args.quick, "scale": asdict(scale), "routers": rows,
               "rows": {label: {"router": r, "artefact": a} for label, (r, a) in ROUTERS.items()},
               "train_seconds": {k: round(float(np.mean(v)), 1) for k, v in train_s.items()},
               "per_task": {r: {c: cell.get("per_task") for c, cell in cells.items() if "per_task" in cell}
                            for r, cells in results.items()},
               "held_out": {"tasa": str(args.tasa_test or (args.tasa if has_test_split(args.tasa) else
                                                          "our 10% split")),
                            "flan": str(args.flan_test or "our 5 folds")},
               "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
