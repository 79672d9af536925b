"""`catalog build --pseudo-tasks K`: a catalog for a validation pool without task labels (LoRAuter §4.4, C.1).

The pool's texts are embedded and clustered by spherical K-means into K pseudo-tasks `pseudo/cNN`
(`routing.pseudo_tasks`); each cluster then gets the best adapter of a pool by Successive Halving on
its own samples, scored by the metric its references call for (`routing.metrics.infer_metric`). The
result is an ordinary catalog: pseudo-tasks are routed and served like named tasks. Labels the records
may carry are ignored.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from routing.base_models import base_model_id
from routing.calibration import calibrate
from routing.catalog import Catalog, TaskEntry, check_new_catalog_dir, write_catalog
from routing.encoder import Encoder, shared_encoder
from routing.pairing import HalvingConfig
from routing.pseudo_tasks import pseudo_task_index
from routing.templates import template_for

from .catalog_build import encoder_record, lora_summary, task_metrics
from .pairing import adapter_pool, check_ties, pair_tasks
from .records import Record, TextMode, group_by_task


def build_pseudo_task_catalog(records: list[Record], out: str | Path, k: int, pool_dir: str | Path,
                              base_model: tuple[str, Path], *, text_mode: TextMode = "input",
                              encoder: Encoder | None = None, config: HalvingConfig = HalvingConfig(),
                              calibrate_tau: bool = True, strict: bool = False, seed: int = 0,
                              parallel: bool = True) -> tuple[Catalog, dict]:
    """Cluster `records` into `k` pseudo-tasks, pair each with its best adapter from `pool_dir`, and
    write the catalog. Returns it with a report: cluster sizes and each cluster's pairing."""
    check_new_catalog_dir(out)
    name, base_dir = base_model
    pool = adapter_pool(pool_dir, base_model_id(base_dir))
    encoder = encoder or shared_encoder()
    index = pseudo_task_index(encoder.encode([r.text(text_mode) for r in records], progress=len(records) > 2000),
                              k, seed=seed)
    relabelled = [replace(r, domain="pseudo", task=index.keys[label].split("/", 1)[1])
                  for r, label in zip(records, index.labels)]
    groups = group_by_task(relabelled)
    metrics = task_metrics(groups)
    tasks = {key: TaskEntry("pseudo", key.split("/", 1)[1], template_for((r.instruction for r in rows), text_mode),
                            metric=metrics[key]) for key, rows in groups.items()}
    results = pair_tasks(base_dir, pool, groups, tasks, text_mode, config, parallel)
    tied = check_ties(results, strict)
    tasks = {key: replace(t, lora=lora_summary(pool[results[key].winner])) for key, t in tasks.items()}
    catalog = write_catalog(out, tasks=tasks, index=index, encoder=encoder_record(encoder, text_mode),
                            base_model={"name": name, "id": base_model_id(base_dir)},
                            adapter_dirs={key: pool[r.winner] for key, r in results.items()},
                            calibration=calibrate(index, calibrate_tau))
    report = {"pseudo_tasks": {key: {"size": len(groups[key]), "metric": tasks[key].metric, **results[key].to_dict()}
                               for key in sorted(groups)},
              "pool": sorted(pool), "tied": tied}
    return catalog, report
