"""`switchboard pair`: give every catalog task the best adapter out of a larger pool.

Each task runs Successive Halving (routing.pairing) over the pool, scoring candidates by the task's
metric on greedy answers to its validation samples. All survivors of a round are evaluated in one
mixed multi-adapter batch through the fused LoRA layers; tasks run in parallel as Ray tasks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from routing.base_models import load_causal_lm, locate_base_model
from routing.catalog import Catalog, CatalogError, TaskEntry, check_new_catalog_dir, derive_catalog
from routing.lora import FusedLoraModel, generate, read_adapter_config
from routing.metrics import score as metric_score
from routing.pairing import HalvingConfig, HalvingResult, successive_halving
from routing.templates import render

from .catalog_build import lora_summary
from .records import Record, group_by_task

MAX_NEW_TOKENS = 24


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

    def score(candidates: list[str], sample: list[int]) -> dict[str, float]:
        rows = [(c, i) for c in candidates for i in sample]
        answers = generate(fused, tokenizer, [prompts[i] for _, i in rows], [[(c, 1.0)] for c, _ in rows],
                           max_new_tokens=MAX_NEW_TOKENS, stop=[["\n"]] * len(rows))
        per = {c: [] for c in candidates}
        for (c, i), a in zip(rows, answers):
            per[c].append(metric_score(metric, a.text, records[i].output))
        return {c: float(np.mean(v)) for c, v in per.items()}

    return successive_halving(list(pool), len(records), score, config)


def pair_catalog(catalog: Catalog, pool_dir: str | Path, records: list[Record], out: str | Path, *,
                 config: HalvingConfig = HalvingConfig(), parallel: bool = True) -> tuple[Catalog, dict]:
    """A new catalog version whose task adapters are each task's Successive-Halving winner."""
    check_new_catalog_dir(out)
    if catalog.base_model is None:
        raise CatalogError(f"catalog {catalog.root} is routing-only: pairing needs one with a base model")
    base_dir = locate_base_model(catalog.base_model["id"])
    pool = adapter_pool(pool_dir, catalog.base_model["id"])
    groups = group_by_task(records)
    missing = sorted(set(catalog.tasks) - set(groups))
    if missing:
        raise CatalogError(f"no validation records for task(s) {missing}")
    jobs = {k: (base_dir, pool, groups[k], catalog.tasks[k].template, catalog.tasks[k].metric,
                catalog.encoder["text_mode"], config) for k in catalog.keys}
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
    tasks = {k: TaskEntry(**{**t.__dict__, "lora": lora_summary(pool[results[k].winner])})
             for k, t in catalog.tasks.items()}
    paired = derive_catalog(catalog, out, tasks=tasks, adapter_dirs={k: pool[r.winner] for k, r in results.items()})
    uniform = {k: len(pool) * len(groups[k]) for k in results}
    report = {"catalog": str(paired.root), "version": paired.version, "pool": sorted(pool),
              "tasks": {k: {**r.to_dict(), "uniform_evaluations": uniform[k]} for k, r in results.items()}}
    return paired, report
