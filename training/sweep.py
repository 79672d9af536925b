"""Hyper-parameter sweeps with Ray Tune: variant x r x alpha x lr (x dropout, x seeds) for every task,
ASHA early stopping per task, results table and plot, best adapter per task exported as a catalog.
With `selector:` in the config the sweep is over the AS selector instead (the paper's Tables 1-2 sweep
its LoRA variant and rank): one K-means selection shared by every trial, each trial scored by its
routing top-1 on the validation rows of every task, and the best exported as a child version of the
catalog it routes over, with that selector inside.

    switchboard sweep --config examples/sweep-smoke.yaml
    switchboard sweep --config examples/sweep-selector.yaml

Each trial trains one adapter (`training.tune_trial.run_trial`: a single process, or Ray Train workers
with optional DeepSpeed) and reports eval loss and the task metric on validation rows every
`eval_every` steps; those reports are what ASHA compares at its rungs and what the Ray dashboard shows
while the sweep runs. The grid is shuffled (`shuffle_seed`): with few slots ASHA can only stop a trial
when better ones reached the rung before it, so a grid run in order (all r=4 first, say) stops few.

Outputs under `output`: `results.csv` / `results.json` (one row per trial), `sweep.png` (the metric by
variant and rank per task), `trials/<domain>/<task>/<tag>/` (trial adapters; a re-run finds finished
ones and resumes interrupted ones), and a new catalog version under `catalog` with each task's best
finished trial.

DoRA trials take part in the sweep but are never exported: the fused serving path refuses DoRA
adapters (its magnitude vector makes it a per-adapter path), and merging one would change the shared
base. The result names the DoRA trial that would have won, if any, and why it was passed over. When
ASHA stopped every servable trial of a task (DoRA won every rung), the most promising of them is
finished after the sweep, resuming from its last checkpoint, so every task gets an adapter.
"""

from __future__ import annotations

import csv
import itertools
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from training.records import Record, group_by_task, split_per_task
from training.run_config import DEMO, SweepConfig
from training.tune_trial import per_task_asha, reports_per_trial, run_trial, train_point, trial_tag

NOT_EXPORTED = {"dora": "DoRA is refused by the fused multi-LoRA serving path (magnitude vector: a per-adapter "
                        "path); merging it would change the shared base"}
SELECTOR = "selector"   # the one "task" of a selector sweep (`selector:` in the config)
RESUMED = "resumed_for_export"  # stopped by ASHA, later finished because no servable trial of its task completed
COLUMNS = ["task", "variant", "r", "alpha", "lr", "dropout", "seed", "status", "reports", "step", "eval_loss",
           "score", "train_seconds", "adapter", "trial_id"]


def _log(msg: str) -> None:
    print(f"[sweep] {msg}", file=sys.stderr, flush=True)


# ---- data and grid ------------------------------------------------------------------------------
def sweep_data(cfg: SweepConfig) -> tuple[dict[str, list[Record]], dict[str, list[Record]]]:
    """Train and validation rows per swept task; a task is never dropped silently."""
    from training.demo_corpus import demo_records
    from training.distributed import load_task_records, select_tasks
    from training.records import load_records

    train = load_task_records(cfg.tasks)
    if cfg.val:
        val = load_records(cfg.val)
    elif cfg.tasks == DEMO:
        val = demo_records("val")
    else:
        present = {r.key for r in train}
        swept = present & set(cfg.task) if cfg.task else present   # an absent task is select_tasks' error
        train, val = split_per_task(train, cfg.val_fraction, seed=cfg.train.seed)
        emptied = sorted(swept - {r.key for r in val})   # one record: kept for training, none to score
        if emptied:
            raise ValueError(f"tasks {emptied}: too few records to hold validation rows out of; "
                             f"give them more records or a `val:` file")
    train_groups = select_tasks(train, cfg.task)
    val_groups = group_by_task(val)
    missing = sorted(set(train_groups) - set(val_groups))
    if missing:
        raise ValueError(f"val: no validation records for {missing}")
    rng = random.Random(cfg.train.seed)
    val_groups = {k: (rows if len(rows) <= cfg.val_per_task else rng.sample(rows, cfg.val_per_task))
                  for k, rows in val_groups.items() if k in train_groups}
    return train_groups, val_groups


def grid(cfg: SweepConfig, tasks: list[str]) -> list[dict[str, Any]]:
    """Every (task, variant, r, alpha, lr, dropout, seed), shuffled by `shuffle_seed`."""
    seeds = [cfg.train.seed + i for i in range(cfg.num_samples)]
    points = [dict(zip(("task", "variant", "r", "alpha", "lr", "dropout", "seed"), p))
              for p in itertools.product(tasks, cfg.variants, cfg.r, cfg.alpha, cfg.lr, cfg.dropout, seeds)]
    random.Random(cfg.shuffle_seed).shuffle(points)
    return points


def _task_metric(key: str) -> str:
    from training.demo_corpus import TASKS_BY_KEY

    task = TASKS_BY_KEY.get(key)
    return task.metric if task else "exact"


# ---- running ------------------------------------------------------------------------------------
def run_sweep(cfg: SweepConfig) -> dict:
    """Run the sweep, write results/plot, export the best adapters (or the best selector) as a catalog
    version; return the summary.

    Uses the Ray cluster the process is connected to (or `RAY_ADDRESS`'s), else starts a local one for
    the length of the sweep. Nothing is printed to stdout (Tune's status tables go to stderr).
    """
    from training.base_model import resolve_base_model
    from training.distributed import ray_session

    started = time.monotonic()
    train_groups, val_groups = sweep_data(cfg)
    base = resolve_base_model(cfg.base_model)
    make_tasks = selector_task if cfg.selector else adapter_tasks
    tasks = make_tasks(cfg, base, train_groups, val_groups)
    with ray_session(dashboard=cfg.dashboard):
        return _run(cfg, base, tasks, started)


def adapter_tasks(cfg: SweepConfig, base: Path, train_groups: dict[str, list[Record]],
                  val_groups: dict[str, list[Record]]) -> dict[str, dict]:
    """What the trials of each task train on (its rows, its template) and are scored by (its metric)."""
    from routing.templates import template_for

    return {k: {"train": rows, "val": val_groups[k], "metric": _task_metric(k),
                "steps": cfg.train.to_spec(1.0).steps_for(len(rows)),
                "template": template_for((r.instruction for r in rows), cfg.text_mode)}
            for k, rows in train_groups.items()}


def selector_task(cfg: SweepConfig, base: Path, train_groups: dict[str, list[Record]],
                  val_groups: dict[str, list[Record]]) -> dict[str, dict]:
    """One "task", `SELECTOR`: the AS selector over the catalog's tasks. Its K-means selection is made
    once, here, so every trial trains on the same examples; trials are scored by routing top-1 on
    every task's validation rows."""
    from routing.catalog import Catalog
    from training.selector import select_for_selector, selector_job

    sel = cfg.selector
    catalog = Catalog.load(sel.catalog)
    missing = sorted(set(catalog.keys) - set(train_groups))
    if missing:
        raise ValueError(f"selector: the catalog routes over {missing} but the data has no records for them")
    extra = sorted(set(train_groups) - set(catalog.keys))
    if extra:
        raise ValueError(f"selector: the data has tasks the catalog {catalog.version} does not: {extra}")
    _log(f"selector: {sel.per_task} representatives a task by {sel.embed}/{sel.metric} K-means")
    selection, how, _ = select_for_selector([r for rows in train_groups.values() for r in rows], catalog.keys, base,
                                            per_task=sel.per_task, embed=sel.embed, metric=sel.metric,
                                            text_mode=cfg.text_mode, prompt=sel.prompt, seed=cfg.train.seed)
    examples, template = selector_job(selection, catalog.keys, how)
    return {SELECTOR: {"train": examples, "val": [r for k in catalog.keys for r in val_groups[k]],
                       "metric": "route_top1", "steps": cfg.train.to_spec(1.0).steps_for(len(examples)),
                       "template": template,
                       "selector": {"labels": catalog.keys, "how": how, "selection": selection}}}


def _run(cfg: SweepConfig, base: Path, tasks: dict[str, dict], started: float) -> dict:
    from ray import tune

    from training.distributed import ray_cpus

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)

    schedule = cfg.train.model_dump()
    steps = [task["steps"] for task in tasks.values()]
    eval_every = cfg.eval_every or max(1, min(steps) // 4)
    max_reports = max(reports_per_trial(s, eval_every) for s in steps)
    workers = cfg.train_workers()
    unservable = {} if cfg.selector else NOT_EXPORTED
    if cfg.use_gpu:  # each trial holds `workers` GPUs while it runs
        import ray

        concurrent = cfg.max_concurrent or max(1, int(ray.cluster_resources().get("GPU", 0) // workers))
    else:
        concurrent = cfg.max_concurrent or max(1, int(ray_cpus() // (workers or cfg.cpus_per_trial)))
    settings = {"schedule": schedule, "target_modules": cfg.target_modules, "text_mode": cfg.text_mode,
                "eval_every": eval_every, "workers": workers, "use_gpu": cfg.use_gpu, "deepspeed": cfg.deepspeed,
                "output": str(out), "storage": str(cfg.storage_dir / "train"),
                "threads": max(1, int(cfg.cpus_per_trial))}
    points = grid(cfg, list(tasks))
    _log(f"{len(points)} trials ({len(tasks)} task(s) x {cfg.grid_size()}), {concurrent} at a time, "
         f"{max_reports} reports each (every {eval_every} steps), scheduler {cfg.scheduler}")

    data = {"base_path": str(base), "tasks": tasks, "settings": settings}
    trainable = tune.with_parameters(run_trial, data=data)
    # A single-process trial trains in its own process. A Ray Train trial only waits for its workers, whose
    # placement group Ray Train creates itself (not inside the trial's): the trial must hold no CPU, or
    # on a small machine the workers' CPUs never come free. A bundle needs some resource: a little memory.
    resources = {"cpu": 0, "memory": 256 * 2**20} if workers else {"cpu": cfg.cpus_per_trial}
    scheduler = None
    if cfg.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        mode = "min" if cfg.asha.metric == "eval_loss" else "max"
        scheduler = per_task_asha(lambda: ASHAScheduler(
            time_attr="training_iteration", metric=cfg.asha.metric, mode=mode, max_t=max_reports,
            grace_period=min(cfg.asha.grace_period, max_reports), reduction_factor=cfg.asha.reduction_factor))
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space={"point": tune.grid_search(points)},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=concurrent,
                                    reuse_actors=not workers),
        run_config=tune.RunConfig(name=f"sweep-{int(time.time())}", storage_path=str(cfg.storage_dir), verbose=1))
    results = tuner.fit()

    rows = [_row(r) for r in results]
    order = {trial_tag(p) + p["task"]: i for i, p in enumerate(points)}
    rows.sort(key=lambda row: (row["task"], order.get(trial_tag(row) + row["task"], 0)))
    finish_for_export(rows, cfg.metric, data, unservable)
    _write_table(rows, out)
    best, passed_over = pick_best(rows, cfg.metric, unservable)
    plot = plot_results(rows, out / "sweep.png", cfg.metric, best)
    if not best:
        catalog = None
    elif cfg.selector:
        catalog = export_selector(best[SELECTOR], cfg)
    else:
        catalog = export_best(best, cfg, base, tasks)
    summary = {
        "kind": SELECTOR if cfg.selector else "adapters", "trials": len(rows),
        "variants": sorted({row["variant"] for row in rows}),
        "completed": sum(row["status"] == "completed" for row in rows),
        "stopped_early": sum(row["status"] in ("stopped_early", RESUMED) for row in rows),
        "resumed_for_export": sum(row["status"] == RESUMED for row in rows),
        "errors": sum(row["status"] == "error" for row in rows),
        "best": {k: {f: row[f] for f in ("variant", "r", "alpha", "lr", "dropout", "seed", "eval_loss", "score",
                                        "adapter")} | {"metric": row[cfg.metric], "metric_name": cfg.metric}
                 for k, row in best.items()},
        "not_exported": passed_over,
        "catalog": str(catalog.root) if catalog else None, "catalog_version": catalog.version if catalog else None,
        "results": {"csv": str(out / "results.csv"), "json": str(out / "results.json"), "plot": str(plot)},
        "scheduler": cfg.scheduler, "reports_per_trial": max_reports, "eval_every": eval_every,
        "max_concurrent": concurrent, "seconds": round(time.monotonic() - started, 1)}
    _log(f"{summary['completed']} completed, {summary['stopped_early']} stopped early, {summary['errors']} failed; "
         f"catalog {summary['catalog']}")
    return summary


def _row(result) -> dict:
    point = result.config["point"]
    m = result.metrics or {}
    status = "error" if result.error else "completed" if m.get("final") else "stopped_early"
    return {**{k: point[k] for k in ("task", "variant", "r", "alpha", "lr", "dropout", "seed")}, "status": status,
            "reports": m.get("training_iteration", 0), "step": m.get("step"),
            "eval_loss": _round(m.get("eval_loss")), "score": _round(m.get("score")),
            "train_seconds": m.get("train_seconds"), "adapter": m.get("adapter") if m.get("final") else None,
            "trial_id": m.get("trial_id"), **({"error": str(result.error).splitlines()[0]} if result.error else {})}


def _round(x):
    return None if x is None else round(float(x), 5)


def _write_table(rows: list[dict], out: Path) -> None:
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS + ["error"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


# ---- best and export ----------------------------------------------------------------------------
def _rank(metric: str):
    def key(row):
        return (-row["score"], row["eval_loss"]) if metric == "score" else (row["eval_loss"], -row["score"])
    return key


def finish_for_export(rows: list[dict], metric: str, data: dict, unservable: dict[str, str]) -> None:
    """A task whose servable trials were all stopped early (DoRA may win every rung) gets its most
    promising servable trial finished here: the one ASHA kept longest, then the best at its last report.
    It resumes from the trial's last checkpoint rather than starting over."""
    for task in sorted({row["task"] for row in rows}):
        mine = [row for row in rows if row["task"] == task and row["variant"] not in unservable]
        if not mine or any(row["status"] == "completed" for row in mine):
            continue
        stopped = [row for row in mine if row["status"] == "stopped_early" and row["eval_loss"] is not None]
        if not stopped:
            continue
        row = min(stopped, key=lambda r: (-r["reports"], *_rank(metric)(r)))
        _log(f"{task}: every servable trial was stopped early; finishing {trial_tag(row)} (stopped at step "
             f"{row['step']}) so the catalog has an adapter for the task")
        final = train_point({k: row[k] for k in ("task", "variant", "r", "alpha", "lr", "dropout", "seed")}, data)
        row.update(status=RESUMED, step=final["step"], eval_loss=_round(final["eval_loss"]),
                   score=_round(final["score"]), adapter=final["adapter"], train_seconds=final["train_seconds"])


def pick_best(rows: list[dict], metric: str, unservable: dict[str, str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per task, the best finished, servable trial (its variant not in `unservable`): highest score
    (ties: lower eval loss), or lowest eval loss. Also returns, per task, a better trial that was passed
    over and why."""
    best, passed = {}, {}
    for task in sorted({row["task"] for row in rows}):
        done = sorted((row for row in rows if row["task"] == task and row["adapter"]), key=_rank(metric))
        servable = [row for row in done if row["variant"] not in unservable]
        if servable:
            best[task] = servable[0]
        if done and done[0]["variant"] in unservable:
            top = done[0]
            passed[task] = {"variant": top["variant"], "r": top["r"], "alpha": top["alpha"], "lr": top["lr"],
                            metric: top[metric], "reason": unservable[top["variant"]]}
            _log(f"{task}: best trial {trial_tag(top)} not exported: {unservable[top['variant']]}")
        if task not in best:
            _log(f"{task}: no completed, servable trial; the task is left out of the catalog")
    return best, passed


def export_best(best: dict[str, dict], cfg: SweepConfig, base: Path, tasks: dict[str, dict]):
    """A new catalog version (content-addressed, under `cfg.catalog_dir`) with each task's best adapter."""
    from training.catalog_build import build_catalog

    records = [r for key in best for r in tasks[key]["val"]]
    with tempfile.TemporaryDirectory(prefix="sweep-best-") as tmp:
        for key, row in best.items():  # the <domain>/<task> layout build_catalog reads, pointing at the trials
            link = Path(tmp) / key
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(row["adapter"], target_is_directory=True)
        return build_catalog(records, cfg.catalog_dir, adapters=tmp, base_model=(cfg.base_model, base),
                             text_mode=cfg.text_mode, versioned=True)


def export_selector(best: dict, cfg: SweepConfig):
    """The selector's catalog as a new version (content-addressed, under `cfg.catalog_dir`) with the best
    trial's selector inside: its parent is the catalog the sweep routed over."""
    from routing.catalog import Catalog, derive_catalog

    return derive_catalog(Catalog.load(cfg.selector.catalog), cfg.catalog_dir,
                          router_dirs={"selector": Path(best["adapter"])}, versioned=True)


# ---- plot ---------------------------------------------------------------------------------------
def plot_results(rows: list[dict], path: Path, metric: str, best: dict[str, dict] | None = None) -> Path:
    """Per task: the best value of `metric` per variant (x) and rank (bars) over finished trials,
    trials stopped early as grey crosses at their last report, and a star on the exported trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({row["task"] for row in rows})
    variants = sorted({row["variant"] for row in rows})
    ranks = sorted({row["r"] for row in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    width = 0.8 / len(ranks)
    better = max if metric == "score" else min
    for ax, task in zip(axes[0], tasks):
        labelled = False
        for j, r in enumerate(ranks):
            xs, ys = [], []
            for i, v in enumerate(variants):
                vals = [row[metric] for row in rows if (row["task"], row["variant"], row["r"]) == (task, v, r)
                        and row["adapter"] and row[metric] is not None]
                if vals:
                    xs.append(i + (j - (len(ranks) - 1) / 2) * width)
                    ys.append(better(vals))
                stopped = [row[metric] for row in rows if (row["task"], row["variant"], row["r"], row["status"])
                           == (task, v, r, "stopped_early") and row[metric] is not None]
                ax.scatter([i + (j - (len(ranks) - 1) / 2) * width] * len(stopped), stopped, marker="x",
                           color="grey", zorder=3, label=None if labelled or not stopped else "stopped early")
                labelled = labelled or bool(stopped)
            ax.bar(xs, ys, width=width, label=f"r={r}")
            chosen = (best or {}).get(task)
            if chosen and chosen["r"] == r and chosen[metric] is not None:
                x = variants.index(chosen["variant"]) + (j - (len(ranks) - 1) / 2) * width
                ax.scatter([x], [chosen[metric]], marker="*", s=160, color="gold", edgecolor="black", zorder=4,
                           label="exported")
        ax.set_xticks(range(len(variants)), variants)
        ax.set_title(task)
        ax.set_ylabel(f"{metric} (val)" + (", higher is better" if metric == "score" else ", lower is better"))
        if metric == "score":
            ax.set_ylim(0, 1.05)
        ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
