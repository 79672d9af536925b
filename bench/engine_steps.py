"""The engine alone at saturation: continuous vs static admission, same requests, no Serve, no network.

    .venv/bin/python bench/engine_steps.py                          # tiny base, ~2 min on 2 cores
    .venv/bin/python bench/engine_steps.py --base-model smollm2 --requests 96
    python bench/engine_steps.py --base-model smollm2 --device cuda         # a GPU (bf16 by default there)

Every request is queued before the first step (the saturated limit of `bench/serving_load.py`: a
queue that never empties), with `serving_load.py`'s workload: the demo's 9 tasks each with a random
rank-8 adapter, 60% one adapter, 20% K=3 fusions, 20% bare base, one prompt in ten 8× longer,
16 or 64 new tokens, EOS ending answers early. `Engine.step()` runs until all are answered; the two
admissions run in turn, `--repeats` times, and the median is reported. What the gap between this
and the served figures is, is the serving stack's (gRPC, Serve, per-chunk streaming).

Last stdout line: one JSON object with tok/s, steps, ms per step and rows per step for each mode,
and `continuous_vs_static_throughput`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving_load import random_adapters, workload  # noqa: E402  (bench/ is this script's directory)

from routing.base_models import load_causal_lm  # noqa: E402
from routing.devices import resolve_placement  # noqa: E402
from routing.engine import Engine, EngineConfig  # noqa: E402
from routing.lora.model import FusedLoraModel  # noqa: E402
from routing.lora.store import AdapterStore  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def requests(tokenizer, texts: list[str], keys: list[str], n: int, seed: int) -> list[tuple[list[int], list, int]]:
    """(prompt ids, routes, max_new_tokens) per request; a routed K=3 fusion gets 3 random tasks."""
    rnd = random.Random(seed)
    out = []
    for spec in workload(texts, keys, n, seed):
        if "top_k" in spec:
            tasks = rnd.sample(keys, 3)
            routes = list(zip(tasks, (0.6, 0.3, 0.1)))
        elif spec.get("base_only"):
            routes = []
        else:
            routes = [(spec["task"], 1.0)]
        prompt = tokenizer(f"Input: {spec['text']}\nOutput:")["input_ids"]
        out.append((prompt, routes, spec["max_new_tokens"]))
    return out


def run(engine: Engine, reqs: list) -> dict:
    """Queue every request, step until all are answered; tokens generated, seconds, steps, rows per step."""
    for i, (prompt, routes, budget) in enumerate(reqs):
        engine.add(str(i), prompt, routes, budget)
    steps = rows = tokens = 0
    start = time.perf_counter()
    while engine.has_work:
        rows += len(engine.scheduler.running)
        tokens += sum(len(e.token_ids) for e in engine.step() if e.done and not e.error)
        steps += 1
    seconds = time.perf_counter() - start
    return {"tok_s": tokens / seconds, "seconds": seconds, "tokens": tokens, "steps": steps,
            "ms_per_step": 1000 * seconds / steps, "rows_per_step": rows / steps}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", default="tiny")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto: the GPU when there is one (routing/devices.py)")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from training.base_model import resolve_base_model
    from training.catalog_build import adapter_dir
    from training.demo_corpus import demo_records

    base_dir = resolve_base_model(args.base_model)
    keys = sorted({r.key for r in demo_records("val")})
    work = Path(tempfile.mkdtemp(prefix="engine-steps-"))
    log(f"{len(keys)} random rank-8 adapters for {base_dir.name} -> {work}")
    random_adapters(base_dir, keys, work)
    where = resolve_placement(args.device, args.dtype, gpu_assigned=torch.cuda.is_available(), who="engine_steps")
    model, tokenizer = load_causal_lm(base_dir, dtype=where.dtype, device=where.device)
    fused = FusedLoraModel(model, max_loras=len(keys), max_rank=8)
    store = AdapterStore(fused, {k: adapter_dir(work, k) for k in keys})
    reqs = requests(tokenizer, [r.input for r in demo_records("test")], keys, args.requests, args.seed)
    context = getattr(model.config, "max_position_embeddings", None)

    results: dict[str, list[dict]] = {"static": [], "continuous": []}
    for rep in range(args.repeats):
        for mode in results:
            config = EngineConfig(max_num_seqs=args.max_num_seqs, admission=mode)
            r = run(Engine(fused, tokenizer, store, config, context=context), reqs)
            results[mode].append(r)
            log(f"[{rep}] {mode:<10} {r['tok_s']:7.1f} tok/s  {r['steps']} steps  {r['ms_per_step']:.1f} ms/step  "
                f"{r['rows_per_step']:.1f} rows/step")
    median = {m: {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]} for m, rs in results.items()}
    report = {"base_model": args.base_model, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "device": str(where.device), "dtype": str(where.dtype).removeprefix("torch."),
              "threads": args.threads, "requests": args.requests, "max_num_seqs": args.max_num_seqs,
              "prompt_tokens": sum(len(p) for p, _, _ in reqs),
              "repeats": args.repeats, **median,
              "continuous_vs_static_throughput": round(median["continuous"]["tok_s"] / median["static"]["tok_s"], 2)}
    print(json.dumps(report))
    return report

if __name__ == "__main__":
    main()
