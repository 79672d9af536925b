"""Adapter training on N Ray Train workers, optionally with DeepSpeed ZeRO, and `train_from_config`.

The worker runs `training.adapter`'s own pieces (encoding, the fixed example schedule, collator,
in-order Trainer, fingerprint, checkpoint folder and publishing), so an adapter trained here has the
same data, template, loss and directory format as `train_adapter`'s: safetensors, base id recorded,
`training.json` written last, and it goes into catalogs the same way. What differs:

- `train.batch_size` is the *global* batch: each of the N workers takes `batch_size / N` rows of
  every step (the Trainer's distributed sampler shards the one schedule), gradients are averaged
  over gloo (CPU) or NCCL (GPU), so 1 or N workers step through the same batches;
- with `deepspeed` (a ZeRO stage 1/2 config, dict or file) the Trainer wraps the model with
  DeepSpeed (`TrainingArguments(deepspeed=..., use_cpu=...)`): the optimizer state (and with ZeRO-2
  the gradients) are sharded across workers. Keep an `optimizer` section out of the config (the
  Trainer then hands DeepSpeed a torch AdamW) or set `"torch_adam": true`: DeepSpeed's own CPU Adam
  compiles a C++ op first (PITFALLS.md);
- rank 0 alone touches the output directory (checkpoints, staging, publishing); the others wait at
  barriers. The output directory must be on storage every worker can read (one machine here, a
  shared volume on a cluster) since a resumed run reads the last checkpoint on every rank;
- the run's fingerprint includes the worker count and DeepSpeed config, because their checkpoints
  (per-rank RNG states, DeepSpeed's `global_step*` shards) only resume under the same placement.

`training.json` gains a `distributed` entry: world size, backend, DeepSpeed on or off, ZeRO stage,
optimizer class.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from training.adapter import (
    CHECKPOINTS, LoraSpec, TrainSpec, _encode, _fingerprint, _is_done, _last_checkpoint, _peft_model, _prepare,
    ProgressBar, _save, _trainer, precision_args, train_adapter)
from training.records import Record, group_by_task

Job = dict[str, Any]  # {"key", "records", "template", "out"}: one adapter to train


def _log(msg: str) -> None:
    print(f"[distributed] {msg}", file=sys.stderr, flush=True)


def placement_fingerprint(fingerprint: str, workers: int, deepspeed: dict | None) -> str:
    """`train_adapter`'s fingerprint, extended by what makes checkpoints incompatible."""
    blob = json.dumps({"fingerprint": fingerprint, "workers": workers, "deepspeed": deepspeed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---- inside a Ray Train worker ------------------------------------------------------------------
def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _train_one(job: Job, base_path: Path, lora: LoraSpec, train: TrainSpec, text_mode: str, deepspeed: dict | None,
               use_gpu: bool, progress: bool, callbacks: Sequence) -> dict:
    """One adapter, on every rank at once. Mirrors `train_adapter`, rank 0 owning the directory."""
    import torch.distributed as dist

    from routing.base_models import base_model_id

    rank, world = dist.get_rank(), dist.get_world_size()
    records, template, out, name = job["records"], job["template"], Path(job["out"]), job["key"]
    base_id = base_model_id(base_path)
    fingerprint = placement_fingerprint(_fingerprint(base_id, records, template, text_mode, lora, train), world,
                                        deepspeed)
    lock = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        lock = _lock(out, name)  # from here on nobody else writes into `out`: every rank sees one state
    _barrier()
    if _is_done(out, fingerprint):
        if rank == 0:
            _log(f"{name}: up to date in {out}")
        summary = json.loads((out / "training.json").read_text())
        _barrier()
        if lock:
            lock.close()
        return summary

    started = time.monotonic()
    staging = out / ".staging"
    if rank == 0:
        _prepare(out, fingerprint)
        shutil.rmtree(staging, ignore_errors=True)
    _barrier()
    ckpt_dir = out / CHECKPOINTS

    peft_model, tokenizer = _peft_model(base_path, lora, train.seed, staging if rank == 0 else None)
    examples, truncated = _encode(tokenizer, records, template, text_mode, train.max_length)
    if truncated and rank == 0:
        _log(f"{name}: {truncated} of {len(records)} prompts cut to max_length={train.max_length} (start dropped)")
    steps = train.steps_for(len(records))
    resume = _last_checkpoint(ckpt_dir)
    _barrier()  # every rank decided on the same checkpoint before rank 0 may write a newer one
    if resume and rank == 0:
        _log(f"{name}: resumed from step {resume[1]}")
    trainer = _trainer(peft_model, tokenizer, examples, ckpt_dir, train, steps, train.batch_size // world,
                       [ProgressBar(f"adapter {name} (rank 0 of {world})", progress and rank == 0), *callbacks],
                       deepspeed=deepspeed, ddp_find_unused_parameters=False,
                       **precision_args(train, gpu_assigned=use_gpu, who=f"adapter {name} (rank {rank})"))
    trainer.train(resume_from_checkpoint=str(resume[0]) if resume else None)
    placement = _describe(trainer, world)

    if rank == 0:
        _save(trainer, peft_model, lora, out, staging, base_id, {
            "tasks": sorted(group_by_task(records)), "n_records": len(records),
            "seconds": round(time.monotonic() - started, 2), "resumed_from_step": resume[1] if resume else None,
            "base_model_id": base_id, "template": template, "text_mode": text_mode, "lora": asdict(lora),
            "train": asdict(train), "fingerprint": fingerprint, "distributed": placement})
        lock.close()
    _barrier()
    return json.loads((out / "training.json").read_text())


def _lock(out: Path, name: str):
    """Hold `out/.lock` (flock, released when the process dies, however it dies) while training into `out`.

    Killing a driver (Ctrl-C, SIGKILL) does not stop its Ray workers at once: they may write a few more
    checkpoints before Ray reaps them. A new run of the same adapter waits for them instead of racing them.
    """
    import fcntl

    f = open(out / ".lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _log(f"{name}: another run is training into {out}; waiting for it to end")
        fcntl.flock(f, fcntl.LOCK_EX)
    return f


def _describe(trainer, world: int) -> dict:
    """What actually ran: read back from torch.distributed and the DeepSpeed engine, not from the config."""
    import torch.distributed as dist

    info = {"world_size": world, "backend": dist.get_backend(), "deepspeed": bool(trainer.is_deepspeed_enabled)}
    if trainer.is_deepspeed_enabled:
        import deepspeed

        engine = trainer.model_wrapped
        info.update(zero_stage=engine.zero_optimization_stage(), deepspeed_version=deepspeed.__version__,
                    optimizer=type(engine.optimizer).__name__,
                    base_optimizer=type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__,
                    micro_batch_per_worker=engine.train_micro_batch_size_per_gpu(),
                    train_batch_size=engine.train_batch_size())
    return info


def _worker(config: dict) -> None:
    """The Ray Train loop: every job in turn. Results are the jobs' `training.json` files."""
    import torch

    torch.set_num_threads(config["threads"])
    for job in config["jobs"]:
        _train_one(job, Path(config["base_path"]), config["lora"], config["train"], config["text_mode"],
                   config["deepspeed"], config["use_gpu"], config["progress"], config["callbacks"])


# ---- the driver ---------------------------------------------------------------------------------
def ensure_ray(dashboard: bool = True, num_cpus: int | None = None) -> None:
    """Connect to the cluster (`RAY_ADDRESS`, a Ray job) or start a local one, with the dashboard when it is
    installed and wanted (Ray Train's placement-group cleaner polls the state API it serves, and warns
    every few seconds without it; nothing else needs it)."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": False}
    if not os.environ.get("RAY_ADDRESS"):
        kwargs["num_cpus"] = num_cpus or os.cpu_count()
        kwargs["include_dashboard"] = dashboard and _dashboard_available()
    ray.init(**kwargs)


@contextlib.contextmanager
def ray_session(dashboard: bool = True):
    """`ensure_ray` for the length of a block, with stdout sent to stderr: Tune's status tables and the
    workers' forwarded output must not mix with a command's JSON result on stdout. Shuts Ray down at
    the end when the block started it (so late worker output is flushed inside the block too)."""
    import ray

    started = not ray.is_initialized()
    with contextlib.redirect_stdout(sys.stderr):
        ensure_ray(dashboard)
        try:
            yield
        finally:
            if started:
                ray.shutdown()


def _dashboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("aiohttp") is not None and importlib.util.find_spec("ray.dashboard") is not None


def train_adapters_distributed(base_path: str | Path, jobs: list[Job], *, lora: LoraSpec, train: TrainSpec,
                               text_mode: str = "input", workers: int = 2, use_gpu: bool = False,
                               deepspeed: dict | None = None, progress: bool = True, callbacks: Sequence = (),
                               storage: str | Path | None = None, name: str = "adapters") -> dict[str, dict]:
    """Train every job's adapter on `workers` Ray Train workers; return each one's `training.json`.

    `callbacks` are Trainer callbacks, pickled to every worker (each rank runs its own copy).
    Inside a Ray Tune trial the workers' `ray.train.report` calls reach Tune (and its scheduler).
    """
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    if train.batch_size % workers:
        raise ValueError(f"batch_size {train.batch_size} must be divisible by workers={workers}")
    ensure_ray()
    # Threads per worker: the machine's CPUs split between workers; inside a Tune trial, one each.
    cpus = 1 if use_gpu or _in_tune_session() else max(1, int(ray_cpus() // workers))
    run_callbacks = []
    if _in_tune_session():
        from ray.tune.integration.ray_train import TuneReportCallback

        run_callbacks.append(TuneReportCallback())
    storage = Path(storage) if storage else Path(jobs[0]["out"]).parent / ".ray-train"  # Ray's run metadata
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"base_path": str(base_path), "jobs": jobs, "lora": lora, "train": train,
                           "text_mode": text_mode, "deepspeed": deepspeed, "use_gpu": use_gpu,
                           "progress": progress, "callbacks": list(callbacks), "threads": cpus},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=f"{name}-{int(time.time() * 1000)}", storage_path=str(storage),
                             callbacks=run_callbacks))
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise RuntimeError(f"Ray Train run failed: {e}") from e
    shutil.rmtree(Path(result.path), ignore_errors=True)  # no Ray checkpoints were made: only run metadata
    if storage.is_dir() and not any(storage.iterdir()):
        storage.rmdir()
    return {job["key"]: json.loads((Path(job["out"]) / "training.json").read_text()) for job in jobs}


def train_one(base_path: str | Path, records: list[Record], template, out: str | Path, *, lora: LoraSpec,
              train: TrainSpec, text_mode: str = "input", workers: int = 0, use_gpu: bool = False,
              deepspeed: dict | None = None, progress: bool = True, callbacks: Sequence = (),
              storage: str | Path | None = None, name: str = "adapter", init_adapter: Path | None = None) -> Path:
    """One LoRA on `records`: in this process (`workers` 0) or on `workers` Ray Train workers (with
    DeepSpeed when given). Either way the same artefact lands in `out`; return it. `init_adapter`
    (continue a saved adapter, as selector updates do) runs in this process."""
    if workers == 0:
        return train_adapter(base_path, records, template, out, lora=lora, train=train, text_mode=text_mode,
                             progress=progress, callbacks=callbacks, init_adapter=init_adapter)
    if init_adapter is not None:
        raise ValueError("continuing a saved adapter (init_adapter) runs in one process: set workers to 0")
    job = {"key": name, "records": records, "template": template, "out": str(out)}
    train_adapters_distributed(base_path, [job], lora=lora, train=train, text_mode=text_mode, workers=workers,
                               use_gpu=use_gpu, deepspeed=deepspeed, progress=progress, callbacks=callbacks,
                               storage=storage, name=name)
    return Path(out)


def ray_cpus() -> float:
    import ray

    return ray.cluster_resources().get("CPU", 1)


# ---- one entry point for a RunConfig ----------------------------------------------------------
def load_task_records(tasks: str, split: str = "train") -> list[Record]:
    """'demo' (a split of the demo corpus) or a records path."""
    from training.demo_corpus import demo_records
    from training.records import load_records

    return demo_records(split) if tasks == "demo" else load_records(tasks)


def select_tasks(records: list[Record], keys: Sequence[str] | None) -> dict[str, list[Record]]:
    groups = group_by_task(records)
    unknown = sorted(set(keys or ()) - set(groups))
    if unknown:
        raise ValueError(f"task: no records for {unknown}; the data has {sorted(groups)}")
    return {k: groups[k] for k in (keys or groups)}


def train_from_config(cfg) -> dict:
    """Run a `training.run_config.RunConfig`: a single process, Ray Train, or Ray Train + DeepSpeed.

    Returns a JSON-able summary: mode, placement, and per task its adapter path, steps, loss, time.
    """
    from routing.templates import template_for
    from training.base_model import resolve_base_model

    records = load_task_records(cfg.tasks)
    base = resolve_base_model(cfg.base_model, progress=cfg.progress)
    lora, train = cfg.lora.to_spec(), cfg.train.to_spec()
    if cfg.kind == "selector":
        return _train_selector(cfg, records, base, lora, train)
    groups = select_tasks(records, cfg.task)
    jobs = [{"key": key, "records": rows, "template": template_for((r.instruction for r in rows), cfg.text_mode),
             "out": str(Path(cfg.output) / key)} for key, rows in groups.items()]
    workers = cfg.train_workers()
    mode = _mode(workers, cfg.deepspeed)
    started = time.monotonic()
    if workers == 0:
        summaries = {}
        for job in jobs:
            out = train_adapter(base, job["records"], job["template"], job["out"], lora=lora, train=train,
                                text_mode=cfg.text_mode, progress=cfg.progress)
            summaries[job["key"]] = json.loads((out / "training.json").read_text())
    else:
        with ray_session():
            summaries = train_adapters_distributed(base, jobs, lora=lora, train=train, text_mode=cfg.text_mode,
                                                   workers=workers, use_gpu=cfg.use_gpu, deepspeed=cfg.deepspeed,
                                                   progress=cfg.progress, storage=Path(cfg.output) / ".ray-train")
    return {
        "kind": "adapters", "mode": mode, "workers": max(workers, 1), "base_model": cfg.base_model,
        "seconds": round(time.monotonic() - started, 2),
        "adapters": {job["key"]: {"path": job["out"], "steps": summaries[job["key"]]["steps"],
                                  "final_loss": summaries[job["key"]]["final_loss"],
                                  "resumed_from_step": summaries[job["key"]].get("resumed_from_step"),
                                  "distributed": summaries[job["key"]].get("distributed")} for job in jobs}}


def _train_selector(cfg, records: list[Record], base: Path, lora: LoraSpec, train: TrainSpec) -> dict:
    from routing.catalog import Catalog
    from training.selector import train_selector

    catalog = Catalog.load(cfg.catalog)
    if cfg.task:
        records = [r for rows in select_tasks(records, cfg.task).values() for r in rows]
    workers = cfg.train_workers()
    with ray_session() if workers else contextlib.nullcontext():
        new, report = train_selector(catalog, records, cfg.output, base, per_task=cfg.per_task, embed=cfg.embed,
                                     metric=cfg.metric, prompt=cfg.prompt, text_mode=cfg.text_mode,
                                     lora=lora, train=train, seed=cfg.train.seed, progress=cfg.progress,
                                     workers=workers, use_gpu=cfg.use_gpu, deepspeed=cfg.deepspeed)
    summary = json.loads((new.router_path("selector") / "training.json").read_text())
    return {"kind": "selector", "mode": _mode(workers, cfg.deepspeed), "workers": max(workers, 1),
            "base_model": cfg.base_model, "catalog": str(new.root), "version": new.version, "parent": catalog.version,
            "steps": summary["steps"], "final_loss": summary["final_loss"], "distributed": summary.get("distributed"),
            "selection": report}


def _mode(workers: int, deepspeed: dict | None) -> str:
    return "single" if workers == 0 else "ray_train+deepspeed" if deepspeed is not None else "ray_train"
