"""Training and updating the Adapters-Selector router (AS paper §3.2-3.3).

The selector is a LoRA on the base LM trained on K-means representatives of every task to write the
task's label. Its artefact keeps the selection it was trained on (`selection.jsonl`), so an update
(add / balance / delete tasks) can mix a retained fraction of the old data with the new, as the
paper's update experiments do. Each training or update produces a new catalog version.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np

from routing.base_models import locate_base_model
from routing.catalog import LABELS_FILE, Catalog, CatalogError, TaskEntry, check_new_catalog_dir, derive_catalog
from routing.encoder import shared_encoder
from routing.selector_model import SELECTOR_TEMPLATE, label_text
from routing.task_index import TaskIndex
from routing.templates import template_for

from .adapter import DONE_MARKER, LoraSpec, TrainSpec, train_adapter
from .records import Record, TextMode, group_by_task, load_records, write_jsonl
from .selection import select_representatives

SELECTION_FILE = "selection.jsonl"
UpdateOp = Literal["add", "balance", "delete"]


def _as_selector_examples(records: list[Record], text_mode: TextMode) -> list[Record]:
    """Request text in, task label out: what the selector learns."""
    return [Record("", r.text(text_mode), label_text(r.key), r.domain, r.task) for r in records]


def _train(selection: list[Record], labels: list[str], base_model_path: Path, text_mode: TextMode,
           lora: LoraSpec, train: TrainSpec, progress: bool, workdir: Path, init: Path | None = None) -> Path:
    artefact = train_adapter(base_model_path, _as_selector_examples(selection, text_mode), SELECTOR_TEMPLATE,
                             workdir / "selector", lora=lora, train=train, progress=progress, init_adapter=init)
    (artefact / LABELS_FILE).write_text(json.dumps(labels))
    write_jsonl(selection, artefact / SELECTION_FILE)
    return artefact


def train_selector(catalog: Catalog, records: list[Record], out: str | Path, base_model_path: Path, *,
                   per_task: int = 100, embed: str = "encoder", metric: str = "cos", text_mode: TextMode = "input",
                   lora: LoraSpec = LoraSpec(r=8, alpha=16), train: TrainSpec = TrainSpec(max_steps=300),
                   seed: int = 0, progress: bool = True) -> tuple[Catalog, dict]:
    """Select representatives per task, train the selector, return the new catalog and the selection report."""
    check_new_catalog_dir(out)
    unknown = sorted({r.key for r in records} - set(catalog.tasks))
    if unknown:
        raise CatalogError(f"records name tasks the catalog does not have: {unknown}")
    selection, report = select_representatives(records, per_task, how=embed, metric=metric, text_mode=text_mode,
                                               seed=seed, base_model_path=base_model_path, progress=progress)
    with tempfile.TemporaryDirectory() as tmp:
        artefact = _train(selection, catalog.keys, base_model_path, text_mode, lora, train, progress, Path(tmp))
        return derive_catalog(catalog, out, router_dirs={"selector": artefact}), report


def retained(selection: list[Record], ratio: float, keep: set[str], seed: int = 0) -> list[Record]:
    """A fraction `ratio` of each kept task's old selection data (at least one row when ratio > 0)."""
    out = []
    for key, rows in group_by_task(selection).items():
        if key in keep and ratio > 0:
            n = max(1, round(len(rows) * ratio))
            out += random.Random(f"{seed}:{key}").sample(rows, min(n, len(rows)))
    return out


def update_selector(catalog: Catalog, op: UpdateOp, out: str | Path, base_model_path: Path | None = None, *,
                    ratio: float, new_records: list[Record] = (), delete: list[str] = (), per_task: int = 100,
                    text_mode: TextMode = "input", train: TrainSpec = TrainSpec(max_steps=300), seed: int = 0,
                    progress: bool = True) -> Catalog:
    """Second fine-tuning of the selector (from its trained weights, on the base it was trained on:
    `base_model_path` or else the cached one of that id) on new data mixed with `ratio` of the old
    selection: the AS paper's update, where `ratio` trades forgetting old tasks for cost.

    add:     `new_records` bring new tasks (added to the task index too);
    balance: `new_records` bring more data for existing, poorly separated tasks;
    delete:  tasks in `delete` leave the catalog, the rest keep `ratio` of their data.
    """
    check_new_catalog_dir(out)
    if not 0 <= ratio <= 1:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    selector = catalog.router_path("selector")
    trained_on = json.loads((selector / "adapter_config.json").read_text())["base_model_name_or_path"]
    base_model_path = locate_base_model(trained_on, base_model_path)
    lora = json.loads((selector / DONE_MARKER).read_text())["lora"]   # recorded as what it is: its rank, ...
    lora = LoraSpec(**{**lora, "target_modules": tuple(lora["target_modules"])})
    old = load_records(selector / SELECTION_FILE)
    new_keys = {r.key for r in new_records}
    keys = set(catalog.keys)
    if op == "add":
        if not new_records:
            raise ValueError("add needs records of the new tasks (--tasks)")
        if new_keys & keys:
            raise ValueError(f"add needs records of new tasks; already in the catalog: {sorted(new_keys & keys)}")
        keys |= new_keys
    elif op == "balance":
        if not new_records:
            raise ValueError("balance needs more records of existing tasks (--tasks)")
        if new_keys - keys:
            raise ValueError(f"balance needs more records of existing tasks; unknown: {sorted(new_keys - keys)}")
    elif op == "delete":
        if not delete:
            raise ValueError("delete needs the task keys to delete (--delete)")
        if new_records:
            raise ValueError("delete takes no records (--tasks): it only trains on the kept tasks' old data")
        if set(delete) - keys:
            raise ValueError(f"delete needs existing task keys; unknown: {sorted(set(delete) - keys)}")
        keys -= set(delete)
    else:
        raise ValueError(f"unknown update op {op!r}; use add, balance or delete")
    fresh = select_representatives(list(new_records), per_task, text_mode=text_mode, seed=seed,
                                   progress=progress)[0] if new_records else []
    selection = retained(old, ratio, keys, seed) + fresh
    labels = sorted(keys)
    tasks, index = _task_set(catalog, labels, new_records, text_mode)
    with tempfile.TemporaryDirectory() as tmp:
        artefact = _train(selection, labels, base_model_path, text_mode, lora, train, progress, Path(tmp),
                          init=selector)
        return derive_catalog(catalog, out, tasks=tasks, index=index, router_dirs={"selector": artefact})


def _task_set(catalog: Catalog, keys: list[str], new_records: list[Record],
              text_mode: TextMode) -> tuple[dict[str, TaskEntry], TaskIndex]:
    """The updated catalog's tasks and index: kept tasks as they were, new tasks from their records."""
    groups = group_by_task(new_records)
    tasks = {k: catalog.tasks[k] if k in catalog.tasks else
             TaskEntry(groups[k][0].domain, groups[k][0].task, template_for((r.instruction for r in groups[k]), text_mode))
             for k in keys}
    old = catalog.index
    position = {k: i for i, k in enumerate(old.keys)}
    keep = [i for i, label in enumerate(old.labels) if old.keys[label] in tasks]
    embeddings = [old.embeddings[keep]] if keep else []
    labels = [old.keys[old.labels[i]] for i in keep]
    added = [r for r in new_records if r.key not in position]
    if added:
        embeddings.append(shared_encoder(catalog.encoder["name"], catalog.encoder["prefix"]).encode(
            [r.text(text_mode) for r in added]))
        labels += [r.key for r in added]
    return tasks, TaskIndex.from_embeddings(np.concatenate(embeddings), labels)
