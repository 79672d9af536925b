"""Training and updating the Adapters-Selector router (AS paper §3.2-3.3).

The selector is a LoRA on the base LM trained on K-means representatives of every task to write the
task's label. The representatives are chosen as the paper does when asked (`embed="base-embeddings"`:
the base LM's embedding layer, with the L2 / IP / COS `metric`), or with the sentence encoder. Its
artefact keeps the selection it was trained on (`selection.jsonl`) and how it was chosen
(`selection_config.json`), so an update (add / balance / delete tasks) selects new data the same way
and mixes in a retained fraction of the old, as the paper's update experiments do. Each training or
update produces a new catalog version.
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np

from routing.base_models import locate_base_model
from routing.catalog import LABELS_FILE, Catalog, CatalogError, TaskEntry, check_new_catalog_dir, derive_catalog
from routing.encoder import shared_encoder
from routing.selector_model import (PROMPT_KEY, SELECTION_CONFIG, SELECTOR_MAX_LENGTH, WINDOW_KEY, SelectorModel,
                                    label_text, selector_template, trained_window)
from routing.task_index import TaskIndex
from routing.templates import template_for

from .adapter import DONE_MARKER, LoraSpec, TrainSpec
from .catalog_build import adapter_dir, lora_summary, task_metrics
from .distributed import train_one
from .records import Record, TextMode, group_by_task, load_records, write_jsonl
from .selection import select_representatives

SELECTION_FILE = "selection.jsonl"
UPDATE_FILE = "update.json"                  # what an update did: op, ratio, balance's per-task judgement
UpdateOp = Literal["add", "balance", "delete"]
SELECTOR_TRAIN = TrainSpec(max_steps=300, max_length=SELECTOR_MAX_LENGTH)
EASY = 0.95   # balance: a task the selector routes at least this well on validation is "easy"


def selector_examples(records: list[Record], text_mode: TextMode, prompt: str) -> list[Record]:
    """Request text in, task label out: what the selector learns."""
    return [Record("", r.text(text_mode), label_text(r.key, prompt), r.domain, r.task) for r in records]


def selector_job(selection: list[Record], labels: list[str], how: dict) -> tuple[list[Record], str]:
    """What the selector LoRA trains on: the selection as (request text -> task label) examples, and
    its prompt template over `labels`."""
    prompt = how[PROMPT_KEY]
    return selector_examples(selection, how["text_mode"], prompt), selector_template(prompt, labels)


def finish_artefact(artefact: Path, selection: list[Record], labels: list[str], how: dict, window: int) -> Path:
    """Make a trained LoRA directory a selector artefact: the labels it scores, how its data was
    selected and the window it trained on (the one it is scored on too: SelectorModel reads it), and
    the selection itself (what an update retains a fraction of)."""
    (artefact / LABELS_FILE).write_text(json.dumps(labels))
    (artefact / SELECTION_CONFIG).write_text(json.dumps({**how, WINDOW_KEY: window}, sort_keys=True))
    write_jsonl(selection, artefact / SELECTION_FILE)
    return artefact


def _train(selection: list[Record], labels: list[str], base_model_path: Path, how: dict, lora: LoraSpec,
           train: TrainSpec, progress: bool, workdir: Path, init: Path | None = None, workers: int = 0,
           use_gpu: bool = False, deepspeed: dict | None = None) -> Path:
    examples, template = selector_job(selection, labels, how)
    artefact = train_one(base_model_path, examples, template, workdir / "selector", lora=lora, train=train,
                         workers=workers, use_gpu=use_gpu, deepspeed=deepspeed, progress=progress, name="selector",
                         storage=workdir / ".ray-train", init_adapter=init)
    return finish_artefact(artefact, selection, labels, how, train.max_length)


def selection_config(selector: Path) -> dict:
    """How the selector's data was selected (`SELECTION_CONFIG`); a selector from before this was
    recorded used the sentence encoder with cosine, 100 per task, on the input text."""
    file = selector / SELECTION_CONFIG
    recorded = json.loads(file.read_text()) if file.is_file() else {}
    return {"embed": "encoder", "metric": "cos", "per_task": 100, "text_mode": "input", PROMPT_KEY: "ours",
            **recorded}


def select_for_selector(records: list[Record], labels: list[str], base_model_path: Path, *, per_task: int,
                        embed: str, metric: str, text_mode: TextMode, prompt: str, seed: int = 0,
                        progress: bool = True) -> tuple[list[Record], dict, dict]:
    """The selector's training data, K-means representatives of every task, with `how` they were chosen
    (what its artefact records and updates reuse) and the selection report."""
    selector_template(prompt, labels)   # an unknown prompt fails before the selection runs
    selection, report = select_representatives(records, per_task, how=embed, metric=metric, text_mode=text_mode,
                                               seed=seed, base_model_path=base_model_path, progress=progress)
    how = {"embed": embed, "metric": metric, "per_task": per_task, "text_mode": text_mode, PROMPT_KEY: prompt}
    return selection, how, report


def trained_recipe(selector: Path, base_model_path: Path | None = None) -> tuple[Path, LoraSpec, TrainSpec, dict]:
    """How the selector at `selector` was trained: its base model (`base_model_path`, or else the cached
    one of the id it records), its LoRA, its schedule and how its data was selected."""
    trained_on = json.loads((selector / "adapter_config.json").read_text())["base_model_name_or_path"]
    done = json.loads((selector / DONE_MARKER).read_text())   # recorded as what it is: its rank, ...
    lora = LoraSpec(**{**done["lora"], "target_modules": tuple(done["lora"]["target_modules"])})
    return (locate_base_model(trained_on, base_model_path), lora, TrainSpec(**done["train"]),
            selection_config(selector))


def train_selector(catalog: Catalog, records: list[Record], out: str | Path, base_model_path: Path, *,
                   per_task: int = 100, embed: str = "encoder", metric: str = "cos", text_mode: TextMode = "input",
                   prompt: str = "ours", lora: LoraSpec = LoraSpec(r=8, alpha=16), train: TrainSpec = SELECTOR_TRAIN,
                   seed: int = 0, progress: bool = True, workers: int = 0, use_gpu: bool = False,
                   deepspeed: dict | None = None) -> tuple[Catalog, dict]:
    """Select representatives per task (`embed`: encoder | base-embeddings, `metric`: l2 | ip | cos),
    train the selector with `prompt` (ours | paper, `routing.selector_model`), return the new catalog
    and the selection report. `workers` >= 1 trains it on Ray Train workers (`deepspeed`: with ZeRO),
    as adapters train (`training.distributed`); the caller owns the Ray session."""
    check_new_catalog_dir(out)
    unknown = sorted({r.key for r in records} - set(catalog.tasks))
    if unknown:
        raise CatalogError(f"records name tasks the catalog does not have: {unknown}")
    selection, how, report = select_for_selector(records, catalog.keys, base_model_path, per_task=per_task,
                                                 embed=embed, metric=metric, text_mode=text_mode, prompt=prompt,
                                                 seed=seed, progress=progress)
    with tempfile.TemporaryDirectory() as tmp:
        artefact = _train(selection, catalog.keys, base_model_path, how, lora, train, progress, Path(tmp),
                          workers=workers, use_gpu=use_gpu, deepspeed=deepspeed)
        return derive_catalog(catalog, out, router_dirs={"selector": artefact}), report


def retained(selection: list[Record], ratio: dict[str, float], keep: set[str], seed: int = 0) -> list[Record]:
    """A fraction `ratio[task]` of each kept task's old selection data (at least one row when > 0)."""
    out = []
    for key, rows in group_by_task(selection).items():
        if key in keep and ratio[key] > 0:
            n = max(1, round(len(rows) * ratio[key]))
            out += random.Random(f"{seed}:{key}").sample(rows, min(n, len(rows)))
    return out


def per_task_accuracy(selector: SelectorModel, validation: list[Record], text_mode: TextMode,
                      batch_size: int = 16) -> dict[str, float]:
    """`selector`'s top-1 routing accuracy per task on `validation`: the label it scores highest is the
    record's task (what the `selector` router's top-1 is)."""
    hits: dict[str, list[float]] = {}
    for lo in range(0, len(validation), batch_size):
        batch = validation[lo: lo + batch_size]
        top = selector.log_likelihoods([r.text(text_mode) for r in batch]).argmax(-1).tolist()
        for r, i in zip(batch, top):
            hits.setdefault(r.key, []).append(float(selector.labels[i] == r.key))
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}


def update_selector(catalog: Catalog, op: UpdateOp, out: str | Path, base_model_path: Path | None = None, *,
                    ratio: float, new_records: list[Record] = (), delete: list[str] = (),
                    adapters: str | Path | None = None, routing_only: bool = False,
                    validation: list[Record] = (), per_task: int | None = None,
                    train: TrainSpec = SELECTOR_TRAIN, seed: int = 0, progress: bool = True) -> Catalog:
    """Second fine-tuning of the selector (from its trained weights, on the base it was trained on:
    `base_model_path` or else the cached one of that id) on new data mixed with `ratio` of the old
    selection: the AS paper's update (§3.4), where `ratio` trades forgetting old tasks for cost. New
    data is selected as the selector's own was (`selection_config`); `per_task` overrides its count.

    add:     `new_records` bring new tasks, added to the task index, with their adapters from
             `adapters/<domain>/<task>` (trained on the catalog's base); `routing_only` adds them
             without adapters instead (such a task can be routed to, not served).
    balance: the selector is scored per task on `validation`; tasks it routes at least EASY well
             keep only `ratio` of their data (reduction), the others keep all of it and gain fresh
             representatives from `new_records` (augmentation).
    delete:  tasks in `delete` leave the catalog, the rest keep `ratio` of their data.
    """
    check_new_catalog_dir(out)
    if not 0 <= ratio <= 1:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    selector = catalog.router_path("selector")
    base_model_path, lora, _, how = trained_recipe(selector, base_model_path)
    how = {**how, **({"per_task": per_task} if per_task else {})}
    train = replace(train, max_length=trained_window(selector))   # the window it learned and is scored on
    old = load_records(selector / SELECTION_FILE)
    new_keys = {r.key for r in new_records}
    keys = set(catalog.keys)
    keep_ratio = {k: ratio for k in keys}
    record: dict = {"op": op, "ratio": ratio}
    new_adapters: dict[str, Path] = {}
    if op == "add":
        if not new_records:
            raise ValueError("add needs records of the new tasks (--tasks)")
        if new_keys & keys:
            raise ValueError(f"add needs records of new tasks; already in the catalog: {sorted(new_keys & keys)}")
        new_adapters = _new_adapters(catalog, sorted(new_keys), adapters, routing_only)
        keys |= new_keys
    elif op == "balance":
        if not new_records or not validation:
            raise ValueError("balance needs more records of existing tasks (--tasks) and validation records to "
                             "judge the selector by (--val)")
        if new_keys - keys:
            raise ValueError(f"balance needs more records of existing tasks; unknown: {sorted(new_keys - keys)}")
        accuracy = per_task_accuracy(SelectorModel(selector, base_model_path), list(validation), how["text_mode"])
        easy = sorted(k for k in keys if accuracy.get(k, 0.0) >= EASY)
        keep_ratio.update({k: 1.0 for k in keys if k not in easy})
        new_records = [r for r in new_records if r.key not in easy]
        record.update(validation_accuracy=accuracy, easy=easy, augmented=sorted({r.key for r in new_records}))
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
    if op != "add" and (adapters is not None or routing_only):
        raise ValueError(f"{op} changes no adapters: --adapters and --routing-only belong to add")
    fresh = select_representatives(list(new_records), how["per_task"], how=how["embed"], metric=how["metric"],
                                   text_mode=how["text_mode"], seed=seed, base_model_path=base_model_path,
                                   progress=progress)[0] if new_records else []
    selection = retained(old, keep_ratio, keys, seed) + fresh
    labels = sorted(keys)
    tasks, index = _task_set(catalog, labels, new_records if op == "add" else [], how["text_mode"], new_adapters)
    with tempfile.TemporaryDirectory() as tmp:
        artefact = _train(selection, labels, base_model_path, how, lora, train, progress, Path(tmp), init=selector)
        (artefact / UPDATE_FILE).write_text(json.dumps(record, sort_keys=True))
        return derive_catalog(catalog, out, tasks=tasks, index=index, router_dirs={"selector": artefact},
                              adapter_dirs=new_adapters)


def _new_adapters(catalog: Catalog, keys: list[str], adapters: str | Path | None,
                  routing_only: bool) -> dict[str, Path]:
    """The adapters of tasks `add` brings: `adapters/<domain>/<task>`, one per task, or none at all
    when the user asked for a routing-only addition."""
    if routing_only:
        if adapters is not None:
            raise ValueError("give --adapters or --routing-only, not both")
        return {}
    if adapters is None:
        raise ValueError(f"add needs the new tasks' adapters (--adapters DIR with <domain>/<task>/ for {keys}); "
                         f"pass --routing-only to add them as routing labels without adapters")
    if catalog.base_model is None:
        raise CatalogError(f"catalog {catalog.version} is routing-only (no base model): it cannot take adapters; "
                           f"use --routing-only")
    found = {k: adapter_dir(Path(adapters), k) for k in keys}
    missing = [str(p) for p in found.values() if not (p / "adapter_config.json").is_file()]
    if missing:
        raise CatalogError(f"no adapter for {len(missing)} new task(s): {missing}")
    return found


def _task_set(catalog: Catalog, keys: list[str], new_records: list[Record], text_mode: TextMode,
              adapters: dict[str, Path]) -> tuple[dict[str, TaskEntry], TaskIndex]:
    """The updated catalog's tasks and index: kept tasks as they were, new tasks from their records
    (metric inferred from their outputs) with their adapters' LoRA facts."""
    groups = group_by_task(new_records)
    metrics = task_metrics(groups)
    tasks = {k: catalog.tasks[k] if k in catalog.tasks else
             TaskEntry(groups[k][0].domain, groups[k][0].task, template_for((r.instruction for r in groups[k]), text_mode),
                       metric=metrics[k], lora=lora_summary(adapters[k]) if k in adapters else None)
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
