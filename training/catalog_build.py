"""Records (+ trained adapters) -> a catalog directory."""

from __future__ import annotations

import json
import random
from pathlib import Path

from routing.base_models import base_model_id
from routing.calibration import calibrate
from routing.catalog import Catalog, CatalogError, TaskEntry, check_new_catalog_dir, write_catalog
from routing.encoder import Encoder, encoder_fingerprint, shared_encoder
from routing.metrics import METRICS, infer_metric
from routing.task_index import TaskIndex
from routing.templates import template_for

from .records import Record, TextMode, group_by_task


def adapter_dir(adapters: Path, key: str) -> Path:
    """Where `train adapter` writes and `catalog build` looks for a task's adapter: `<adapters>/<domain>/<task>`."""
    return Path(adapters) / key


def lora_summary(adapter: Path) -> dict:
    """The LoRA facts the catalog lists for an adapter, from its peft config."""
    c = json.loads((adapter / "adapter_config.json").read_text())
    init = c.get("init_lora_weights")
    variant = ("dora" if c.get("use_dora") else "rslora" if c.get("use_rslora")
               else "pissa" if isinstance(init, str) and init.startswith("pissa") else "lora")
    return {"variant": variant, "r": c["r"], "alpha": c["lora_alpha"], "target_modules": sorted(c["target_modules"])}


def build_index(records: list[Record], text_mode: TextMode, per_task: int | None, encoder: Encoder,
                seed: int = 0) -> TaskIndex:
    """Task representations from up to `per_task` samples of each task (seeded sample)."""
    chosen: list[Record] = []
    for key, rows in group_by_task(records).items():
        rows = list(rows)
        if per_task is not None and len(rows) > per_task:
            rows = random.Random(f"{seed}:{key}").sample(rows, per_task)
        chosen += rows
    embeddings = encoder.encode([r.text(text_mode) for r in chosen], progress=len(chosen) > 2000)
    return TaskIndex.from_embeddings(embeddings, [r.key for r in chosen])


def encoder_record(encoder: Encoder, text_mode: TextMode) -> dict:
    """The catalog's `encoder` entry: name (or directory), prefix, text mode, and a directory's fingerprint."""
    record = {"name": encoder.name, "prefix": encoder.prefix, "text_mode": text_mode}
    fingerprint = encoder_fingerprint(encoder.name)
    if fingerprint is not None:   # the default's manifest stays as before (and so its version)
        record["fingerprint"] = fingerprint
    return record


def task_metrics(groups: dict[str, list[Record]], specs: list[str] = ()) -> dict[str, str]:
    """Each task's metric: `specs` are `NAME` (every task) or `domain/task=NAME` (one task, wins over
    NAME); a task no spec names gets `routing.metrics.infer_metric` of its references."""
    every, one = None, {}
    for spec in specs:
        key, _, name = spec.rpartition("=")
        if name not in METRICS:
            raise ValueError(f"--metric {spec!r}: unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")
        if key and key not in groups:
            raise ValueError(f"--metric {spec!r}: no task {key!r} in the records")
        if key:
            one[key] = name
        else:
            every = name
    return {k: one.get(k) or every or infer_metric([r.output for r in rows]) for k, rows in groups.items()}


def build_catalog(records: list[Record], out: str | Path, *, adapters: str | Path | None = None,
                  base_model: tuple[str, Path] | None = None, text_mode: TextMode = "input",
                  per_task: int | None = None, encoder: Encoder | None = None, metrics: list[str] = (),
                  calibrate_tau: bool = True, seed: int = 0, multitask: str | Path | None = None,
                  versioned: bool = False) -> Catalog:
    """Write a catalog for the tasks in `records`.

    Without `adapters` it is routing-only (task index, templates), enough to evaluate routers on
    real data. With it, `adapters/<domain>/<task>` must hold a peft adapter for every task, trained
    on `base_model` = (name, directory). `metrics`: see `task_metrics`. The encoder (default the
    packaged MiniLM; any sentence-transformers directory) is recorded with a fingerprint that
    `Catalog.load` checks. `calibrate_tau`: fit the centroid router's temperature to this index
    (`routing.calibration`); off, τ applies to raw cosines as in LoRAuter. `versioned`: see
    `routing.catalog.write_catalog`. `multitask`: an adapter trained on all the tasks together
    (`training.adapter.train_multitask`), carried for `eval generation`'s `multitask` mode.
    """
    if not versioned:
        check_new_catalog_dir(out)   # before the encoder runs, not after
    groups = group_by_task(records)
    chosen_metrics = task_metrics(groups, metrics)
    encoder = encoder or shared_encoder()
    tasks = {key: TaskEntry(rows[0].domain, rows[0].task, template_for((r.instruction for r in rows), text_mode),
                            metric=chosen_metrics[key])
             for key, rows in groups.items()}
    adapter_dirs, base = None, None
    if multitask is not None and adapters is None:
        raise CatalogError("a multi-task adapter needs --adapters too: a catalog that serves it has a base model")
    if adapters is not None:
        if base_model is None:
            raise CatalogError("a catalog with adapters needs its base model")
        adapter_dirs = {key: adapter_dir(Path(adapters), key) for key in tasks}
        missing = [str(p) for p in adapter_dirs.values() if not (p / "adapter_config.json").is_file()]
        if missing:
            raise CatalogError(f"no trained adapter for {len(missing)} task(s): {missing}")
        tasks = {k: TaskEntry(**{**v.__dict__, "lora": lora_summary(adapter_dirs[k])}) for k, v in tasks.items()}
        base = {"name": base_model[0], "id": base_model_id(base_model[1])}
    index = build_index(records, text_mode, per_task, encoder, seed)
    return write_catalog(out, tasks=tasks, index=index, encoder=encoder_record(encoder, text_mode), base_model=base,
                         adapter_dirs=adapter_dirs, calibration=calibrate(index, calibrate_tau), versioned=versioned,
                         multitask_dir=Path(multitask) if multitask is not None else None)
