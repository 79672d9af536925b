"""Adapter training throughput: one process vs Ray Train (2 workers) vs Ray Train + DeepSpeed ZeRO-2
(2 workers) on the same config, and a sweep's wall time with and without ASHA early stopping.

    .venv/bin/python bench/training.py                          # tiny-test base, ~5 minutes on 2 cores
    .venv/bin/python bench/training.py --base-model tiny --steps 100 --repeats 3

Training modes train the same adapter (same records, schedule, global batch) into fresh directories:
  single            train_adapter in this process, all CPU threads
  ray_train         2 Ray Train workers (gloo), one thread each, batch split 2 ways
  ray_train_zero2   the same + DeepSpeed ZeRO-2 (examples/deepspeed-zero2.json, torch AdamW)
`samples_per_s` is the steady-state rate: optimizer steps after the first, times the global batch,
over the time they took (rank 0's clock). `wall_s` is the whole call: worker start-up, model
loading, training, saving (Ray itself is started once, before every mode). Sweeps: the same grid
with `scheduler: asha` and `scheduler: fifo` (no early stopping). A table goes to stderr and the last
stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# This file is bench/training.py: with bench/ first on sys.path (as `python bench/training.py` puts it, and
# as Ray copies the driver's path to its workers), `import training` would find this script, not the package.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/fused_generation.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import TrainerCallback  # noqa: E402

from training.accelerator import use_cpu_deepspeed_without_cuda  # noqa: E402

MODES = ("single", "ray_train", "ray_train_zero2")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class StepClock(TrainerCallback):
    """Rank 0 writes the time from the end of step 1 to the end of training (picklable: runs in workers)."""

    def __init__(self, path: str):
        self.path, self.t1, self.step1 = path, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if self.t1 is None:
            self.t1, self.step1 = time.perf_counter(), state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.t1 is not None:
            Path(self.path).write_text(json.dumps({"steps": state.global_step - self.step1,
                                                   "seconds": time.perf_counter() - self.t1}))


def train_once(mode: str, base: Path, records, template: str, out: Path, lora, train) -> dict:
    from training.adapter import train_adapter
    from training.distributed import train_adapters_distributed

    clock_file = out.parent / f"{out.name}.clock.json"
    clock = StepClock(str(clock_file))
    started = time.perf_counter()
    if mode == "single":
        train_adapter(base, records, template, out, lora=lora, train=train, progress=False, callbacks=[clock])
    else:
        ds = json.loads((REPO / "examples" / "deepspeed-zero2.json").read_text()) if mode == "ray_train_zero2" else None
        job = {"key": records[0].key, "records": records, "template": template, "out": str(out)}
        train_adapters_distributed(base, [job], lora=lora, train=train, workers=2, deepspeed=ds, progress=False,
                                   callbacks=[clock], storage=out.parent / ".ray-train")
    wall = time.perf_counter() - started
    timed = json.loads(clock_file.read_text())
    summary = json.loads((out / "training.json").read_text())
    return {"samples_per_s": timed["steps"] * train.batch_size / timed["seconds"], "wall_s": wall,
            "distributed": summary.get("distributed"), "final_loss": summary["final_loss"]}


def bench_training(base: Path, task: str, steps: int, batch: int, repeats: int, work: Path) -> dict:
    import torch

    from routing.templates import template_for
    from training.adapter import LoraSpec, TrainSpec
    from training.demo_corpus import demo_records

    records = [r for r in demo_records("train") if r.key == task]
    template = template_for(r.instruction for r in records)
    lora = LoraSpec(r=8, alpha=16)
    train = TrainSpec(lr=3e-3, max_steps=steps, batch_size=batch, save_steps=steps + 1, warmup_steps=2)
    torch.set_num_threads(os.cpu_count() or 1)
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for i in range(repeats):
        for mode in MODES:  # interleaved, so background load drifts hit every mode alike
            got = train_once(mode, base, records, template, work / f"{mode}-{i}", lora, train)
            log(f"{mode} #{i + 1}: {got['samples_per_s']:.1f} samples/s, {got['wall_s']:.1f} s wall")
            runs[mode].append(got)
    out = {}
    for mode, got in runs.items():
        out[mode] = {"samples_per_s": round(statistics.median(g["samples_per_s"] for g in got), 1),
                     "wall_s": round(statistics.median(g["wall_s"] for g in got), 1),
                     "final_loss": got[0]["final_loss"], "distributed": got[0]["distributed"]}
    return out


def bench_sweep(base_model: str, task: str, steps: int, work: Path) -> dict:
    from training.run_config import sweep_config
    from training.sweep import run_sweep

    out = {}
    for scheduler in ("asha", "fifo"):
        cfg = sweep_config(base_model=base_model, task=[task], variants=["lora", "rslora", "dora", "pissa"],
                           r=[4, 8], alpha=[16], lr=[6.0e-3], scheduler=scheduler, eval_every=max(1, steps // 4),
                           train={"max_steps": steps, "batch_size": 16, "save_steps": steps, "warmup_steps": 4},
                           val_per_task=20, output=str(work / f"sweep-{scheduler}"), dashboard=False)
        started = time.perf_counter()
        result = run_sweep(cfg)
        wall = time.perf_counter() - started
        best = result["best"].get(task, {})
        out[scheduler] = {"wall_s": round(wall, 1), "trials": result["trials"],
                          "stopped_early": result["stopped_early"], "best": {k: best.get(k) for k in (
                              "variant", "r", "score", "eval_loss")}}
        log(f"sweep {scheduler}: {wall:.1f} s, {result['stopped_early']} of {result['trials']} stopped early")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", default="tiny-test")
    ap.add_argument("--task", default="fin/ticker")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per training run")
    ap.add_argument("--batch-size", type=int, default=16, help="global batch (each of 2 workers takes half)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per training mode (median reported)")
    ap.add_argument("--sweep-steps", type=int, default=80, help="steps per sweep trial; 0 skips the sweeps")
    a = ap.parse_args(argv)
    use_cpu_deepspeed_without_cuda()

    from training.base_model import resolve_base_model
    from training.distributed import ray_session

    base = resolve_base_model(a.base_model, progress=True)
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp, ray_session(dashboard=False):
        work = Path(tmp)
        training = bench_training(base, a.task, a.steps, a.batch_size, a.repeats, work)
        sweeps = bench_sweep(a.base_model, a.task, a.sweep_steps, work) if a.sweep_steps else {}

    single = training["single"]["samples_per_s"]
    print(f"\nadapter training, {a.base_model}, {a.task}, {a.steps} steps x global batch {a.batch_size}, "
          f"median of {a.repeats}", file=sys.stderr)
    print(f"{'mode':<18}{'samples/s':>10}{'vs single':>11}{'wall s':>9}  what ran", file=sys.stderr)
    for mode, r in training.items():
        d = r["distributed"] or {}
        ran = ("1 process" if not d else f"{d['world_size']} workers, {d['backend']}"
               + (f", ZeRO-{d['zero_stage']} ({d['optimizer']} over {d['base_optimizer']})" if d.get("deepspeed") else ""))
        print(f"{mode:<18}{r['samples_per_s']:>10.1f}{r['samples_per_s'] / single:>10.2f}x{r['wall_s']:>9.1f}  {ran}",
              file=sys.stderr)
    if sweeps:
        print(f"\nsweep: 4 variants x 2 ranks on {a.task}, {a.sweep_steps} steps per trial", file=sys.stderr)
        for name, r in sweeps.items():
            print(f"{name:<6}{r['wall_s']:>8.1f} s  {r['stopped_early']}/{r['trials']} stopped early, best "
                  f"{r['best']['variant']} r={r['best']['r']} score={r['best']['score']}", file=sys.stderr)
    summary = {
        "base_model": a.base_model, "task": a.task, "steps": a.steps, "batch_size": a.batch_size, "repeats": a.repeats,
        "cpus": os.cpu_count(), "samples_per_s": {m: r["samples_per_s"] for m, r in training.items()},
        "wall_s": {m: r["wall_s"] for m, r in training.items()},
        "ray_train_vs_single": round(training["ray_train"]["samples_per_s"] / single, 3),
        "zero2_vs_single": round(training["ray_train_zero2"]["samples_per_s"] / single, 3),
        "zero2_vs_ray_train": round(training["ray_train_zero2"]["samples_per_s"]
                                    / training["ray_train"]["samples_per_s"], 3),
        "final_loss": {m: r["final_loss"] for m, r in training.items()},
        "deepspeed": training["ray_train_zero2"]["distributed"],
    }
    if sweeps:
        summary["sweep_wall_s"] = {k: v["wall_s"] for k, v in sweeps.items()}
        summary["sweep_stopped_early"] = sweeps["asha"]["stopped_early"]
        summary["sweep_trials"] = sweeps["asha"]["trials"]
        summary["asha_time_saved"] = round(1 - sweeps["asha"]["wall_s"] / sweeps["fifo"]["wall_s"], 3)
        summary["sweep_best"] = {k: v["best"] for k, v in sweeps.items()}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
