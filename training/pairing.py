"""`switchboard pair`: give every catalog task the best adapter out of a larger pool.

Each task runs Successive Halving (routing.pairing) over the pool, scoring candidates by the task's
metric (`routing.metrics`) on greedy answers to its validation samples. Short-answer metrics stop an
answer at its first newline; ROUGE / BLEU see whole answers, up to a length set by the task's own
references. All survivors of a round are evaluated in one mixed multi-adapter batch through the fused
LoRA layers; tasks run in parallel as Ray tasks.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from routing.base_models import load_causal_lm, locate_base_model
from routing.catalog import Catalog, CatalogError, TaskEntry, check_new_catalog_dir, derive_catalog
from routing.lora import FusedLoraModel, generate, read_adapter_config
from routing.metrics import get_metric
from routing.pairing import HalvingConfig, HalvingResult, successive_halving
from routing.templates import render

from .catalog_build import lora_summary
from .records import Record, group_by_task

SHORT_ANSWER_TOKENS = 24     # labels, option letters, short spans: read off the first line
MAX_ANSWER_TOKENS = 512      # the cap for long (ROUGE / BLEU) answers


def answer_tokens(tokenizer, references: list[str], short: bool) -> int:
    """How many new tokens a candidate may generate: enough for the longest reference, with a quarter
    to spare, so a long-answer metric is not scored on answers cut short."""
    if short:
        return SHORT_ANSWER_TOKENS
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
    return min(MAX_ANSWER_TOKENS, max(SHORT_ANSWER_TOKENS, math.ceil(1.25 * longest) + 8))


def adapter_pool(pool: str | Path, base_id: str) -> dict[str, Path]:
    """Every adapter directory directly under `pool` (any name), by directory name.

    Each is checked here, in the driver, before any Ray task loads a model: that the fused layers
    serve it (`read_adapter_config`) and that it was trained on the catalog's base `base_id`.
    """
    if not Path(pool).is_dir():
        raise CatalogError(f"{pool}: not a directory of adapters")
    found = {p.name: p for p in sorted(Path(pool).iterdir()) if (p / "adapter_config.json").is_file()}
    if not found:
        raise CatalogError(f"{pool}: no adapters (directories with adapter_config.json)")
    for name, path in found.items():
        trained_on = read_adapter_config(path, name).get("base_model_name_or_path")
        if trained_on != base_id:
            raise CatalogError(f"adapter {name!r} ({path}) was trained on base model {trained_on!r}, "
                               f"but the catalog serves {base_id!r}")
    return found


def pair_task(base_dir: Path, pool: dict[str, Path], records: list[Record], template: str, metric: str,
              text_mode: str, config: HalvingConfig) -> HalvingResult:
    """Successive Halving for one task; one fused model holds the whole pool. Prompts are built as the
    Generator builds them: the template filled with what a client sends (`text_mode`)."""
    import torch

    torch.set_num_threads(1)
    model, tokenizer = load_causal_lm(base_dir)
    ranks = [max([cfg.get("r", 8), *(cfg.get("rank_pattern") or {}).values()])
             for cfg in (read_adapter_config(p, n) for n, p in pool.items())]
    fused = FusedLoraModel(model, max_loras=len(pool), max_rank=max(ranks))
    for name, path in pool.items():
        fused.load_adapter(name, path)
    prompts = [render(template, r.text(text_mode)) for r in records]
    scorer = get_metric(metric)
    max_new_tokens = answer_tokens(tokenizer, [r.output for r in records], scorer.short)

    def score(candidates: list[str], sample: list[int]) -> dict[str, float]:
        rows = [(c, i) for c in candidates for i in sample]
        answers = generate(fused, tokenizer, [prompts[i] for _, i in rows], [[(c, 1.0)] for c, _ in rows],
                           max_new_tokens=max_new_tokens, stop=[["\n"] if scorer.short else []] * len(rows))
        per = {c: [] for c in candidates}
        for (c, i), a in zip(rows, answers):
            per[c].append(scorer.fn(a.text, records[i].output))
        return {c: float(np.mean(v)) for c, v in per.items()}

    return successive_halving(list(pool), len(records), score, config)


def pair_tasks(base_dir: Path, pool: dict[str, Path], groups: dict[str, list[Record]], tasks: dict[str, TaskEntry],
               text_mode: str, config: HalvingConfig, parallel: bool = True) -> dict[str, HalvingResult]:
    """Successive Halving for every task in `tasks` on its validation records `groups[task]`, in
    parallel as Ray tasks (one CPU each) unless `parallel` is off; progress and ties on stderr."""
    jobs = {k: (base_dir, pool, groups[k], t.template, t.metric, text_mode, config) for k, t in tasks.items()}
    if parallel:
        import ray

        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        remote = ray.remote(num_cpus=1)(pair_task)
        refs = {k: remote.remote(*args) for k, args in jobs.items()}
        results = {k: ray.get(ref) for k, ref in refs.items()}
    else:
        results = {k: pair_task(*args) for k, args in jobs.items()}
    for k, res in results.items():
        print(f"  {k}: {res.winner} ({res.evaluations} evaluations over {len(res.rounds)} rounds)", file=sys.stderr)
        if res.tied:
            print(f"  warning: {k}: candidates tied with the best {tasks[k].metric!r} at a cut; {res.winner} won "
                  f"by pool order, not by score (more samples, or another metric?)", file=sys.stderr)
    return results


def check_ties(results: dict[str, HalvingResult], strict: bool) -> list[str]:
    """The tasks whose pairing was decided by pool order; with `strict`, an error naming them."""
    tied = sorted(k for k, r in results.items() if r.tied)
    if strict and tied:
        raise IndistinguishableError(
            f"candidates could not be told apart for task(s) {tied} (tied scores at a cut: "
            + "; ".join(f"{k}: {results[k].rounds[-1]['scores']}" for k in tied) + "); no catalog written")
    return tied


class IndistinguishableError(CatalogError):
    """`strict` pairing found tasks whose candidates tied at a cut: no catalog is written."""


def pair_catalog(catalog: Catalog, pool_dir: str | Path, records: list[Record], out: str | Path, *,
                 config: HalvingConfig = HalvingConfig(), parallel: bool = True,
                 strict: bool = False) -> tuple[Catalog, dict]:
    """A new catalog version whose task adapters are each task's Successive-Halving winner.

    A task whose candidates tied at a cut is warned about on stderr and listed in the report's
    `tied`; with `strict` it is an error instead, raised before any catalog is written."""
    check_new_catalog_dir(out)
    if catalog.base_model is None:
        raise CatalogError(f"catalog {catalog.root} is routing-only: pairing needs one with a base model")
    base_dir = locate_base_model(catalog.base_model["id"])
    pool = adapter_pool(pool_dir, catalog.base_model["id"])
    groups = group_by_task(records)
    missing = sorted(set(catalog.tasks) - set(groups))
    if missing:
        raise CatalogError(f"no validation records for task(s) {missing}")
    results = pair_tasks(base_dir, pool, groups, catalog.tasks, catalog.encoder["text_mode"], config, parallel)
    tied = check_ties(results, strict)
    tasks = {k: TaskEntry(**{**t.__dict__, "lora": lora_summary(pool[results[k].winner])})
             for k, t in catalog.tasks.items()}
    paired = derive_catalog(catalog, out, tasks=tasks, adapter_dirs={k: pool[r.winner] for k, r in results.items()})
    uniform = {k: len(pool) * len(groups[k]) for k in results}
    report = {"catalog": str(paired.root), "version": paired.version, "pool": sorted(pool),
              "config": config.__dict__, "tied": tied,
              "tasks": {k: {**r.to_dict(), "metric": catalog.tasks[k].metric, "uniform_evaluations": uniform[k]}
                        for k, r in results.items()}}
    return paired, report
