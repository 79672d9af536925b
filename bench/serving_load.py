"""Open-loop load on the live Serve app over gRPC streaming: continuous batching vs static batching.

    .venv/bin/python bench/serving_load.py                          # tiny base, ~6 min on 2 cores
    .venv/bin/python bench/serving_load.py --base-model smollm2 --rates 0.25,0.5,1,2 --duration 40
    python bench/serving_load.py --base-model smollm2 --rates 4,16,64 --duration 10 --num-gpus 0.5   # a GPU

Both batching modes (the Generator's `batching` arg: `static` runs a batch until its last answer
before admitting the next, `continuous` admits at every decoding step) are deployed side by side as
two apps of one Serve instance from `serve_app/serve_config.yaml`; for each rate, each mode in turn
gets requests arriving as a Poisson process for `--duration` seconds and every answer is awaited
(interleaved, so a change in the machine's load hits both). Requests are spread over the demo's 9 tasks, each
with its own adapter (random LoRA deltas of rank 8: throughput does not depend on what they learnt):
60% one fixed adapter, 20% routed K=3 fusions, 20% bare base; prompts are the demo's test inputs, one
in ten made about 8× longer; `max_new_tokens` is 16 for most, 64 for one in five. EOS can end an
answer early in both modes alike (same requests, same seed).

Per rate: completed requests/s and generated tokens/s over the arrival window plus the drain, time to
first token and time per output token (p50/p99, from the stream's chunks), errors by status code.
`continuous_vs_static_throughput` compares the two modes' generated tokens/s at the highest rate (make
it one that saturates both: then each answers as fast as it can); `sustained_rate` is the highest
rate each mode keeps up with (all answered, TTFT p50 within 3× of the lowest rate's). Progress goes
to stderr, a table to stdout, the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # idle OpenMP threads must not spin on the replicas' cores

import grpc  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protos.switchboard.v1 import switchboard_pb2_grpc as pb_grpc  # noqa: E402
from serve_app import launch  # noqa: E402
from serve_app.client import generate_request  # noqa: E402
from serve_app.contract import APP_NAME  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def random_adapters(base_dir: Path, keys: list[str], out: Path, rank: int = 8) -> Path:
    """A peft LoRA per task with random B (A is peft's init), recorded for `base_dir` as training would."""
    import torch
    from peft import LoraConfig, get_peft_model

    from routing.base_models import base_model_id, load_causal_lm
    from training.catalog_build import adapter_dir

    model, _ = load_causal_lm(base_dir)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(0)
    for i, key in enumerate(keys):
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        peft_model.peft_config["default"].base_model_name_or_path = base_model_id(base_dir)
        peft_model.save_pretrained(adapter_dir(out, key), safe_serialization=True)
    return out


def workload(texts: list[str], keys: list[str], n: int, seed: int) -> list[dict]:
    """`n` request specs: which route, what prompt, how many new tokens."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        text = rnd.choice(texts)
        if rnd.random() < 0.1:
            text = " ".join(rnd.choice(texts) for _ in range(8))
        kind = rnd.random()
        route = (dict(task=rnd.choice(keys)) if kind < 0.6 else dict(top_k=3, routing_temperature=1.0) if kind < 0.8
                 else dict(task=rnd.choice(keys), base_only=True))
        out.append(dict(text=text, max_new_tokens=64 if rnd.random() < 0.2 else 16, **route))
    return out


async def one(stub, app: str, spec: dict, sent: float) -> dict:
    first = None
    try:
        call = stub.GenerateStream(generate_request(**spec), metadata=(("application", app),), timeout=600)
        async for chunk in call:
            if first is None and (chunk.text or chunk.finish_reason):
                first = time.perf_counter()
            if chunk.finish_reason:
                end = time.perf_counter()
                tokens = chunk.new_tokens
        return dict(ok=True, ttft=first - sent, end=end, tokens=tokens,
                    tpot=(end - first) / (tokens - 1) if tokens > 1 else None)
    except grpc.aio.AioRpcError as e:
        return dict(ok=False, code=e.code().name, end=time.perf_counter())


async def drive(port: int, app: str, specs: list[dict], rate: float, duration: float, seed: int) -> dict:
    """Poisson arrivals at `rate`/s for `duration` s (cycling through `specs`), then await all answers."""
    rnd = random.Random(seed)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.SwitchboardStub(channel)
        tasks, start = [], time.perf_counter()
        t, i = start, 0
        while True:
            t += rnd.expovariate(rate)
            if t - start > duration:
                break
            await asyncio.sleep(max(0.0, t - time.perf_counter()))
            tasks.append(asyncio.ensure_future(one(stub, app, specs[i % len(specs)], time.perf_counter())))
            i += 1
        results = await asyncio.gather(*tasks)
    elapsed = max([r["end"] for r in results], default=start) - start
    done = [r for r in results if r["ok"]]
    ttft = sorted(r["ttft"] for r in done)
    tpot = sorted(r["tpot"] for r in done if r["tpot"] is not None)
    errors: dict[str, int] = {}
    for r in results:
        if not r["ok"]:
            errors[r["code"]] = errors.get(r["code"], 0) + 1
    return {"rate": rate, "sent": len(results), "completed": len(done), "req_s": len(done) / elapsed,
            "tok_s": sum(r["tokens"] for r in done) / elapsed, "ttft_p50_ms": 1000 * _pct(ttft, 50),
            "ttft_p99_ms": 1000 * _pct(ttft, 99), "tpot_p50_ms": 1000 * _pct(tpot, 50),
            "tpot_p99_ms": 1000 * _pct(tpot, 99), "errors": sum(errors.values()), "error_codes": errors}


def _kept_up(rows: list[dict]) -> list[dict]:
    """The rates a mode keeps up with: every request answered, time to first token (p50) within 3× of
    the lowest rate's. (Throughput over the window plus the drain cannot tell: with answers of several
    seconds the drain alone pulls it below the arrival rate.)"""
    floor = rows[0]["ttft_p50_ms"]
    return [r for r in rows if r["completed"] == r["sent"] and r["ttft_p50_ms"] <= 3 * floor] or rows[:1]


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", default="tiny")
    ap.add_argument("--rates", default="2,4,8,16,32", help="requests/s, comma-separated")
    ap.add_argument("--duration", type=float, default=20, help="seconds of arrivals per rate")
    ap.add_argument("--modes", default="static,continuous")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--num-gpus", type=float, default=0, help="GPUs per Generator replica (0.5: both modes share one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from training.base_model import resolve_base_model
    from training.catalog_build import build_catalog
    from training.demo_corpus import demo_records

    work = args.workdir or Path(tempfile.mkdtemp(prefix="serving-load-"))
    base_dir = resolve_base_model(args.base_model)
    val, test = demo_records("val"), demo_records("test")
    keys = sorted({r.key for r in val})
    log(f"{len(keys)} random rank-8 adapters for {base_dir.name} -> {work}")
    adapters = random_adapters(base_dir, keys, work / "adapters")
    catalog = build_catalog(val, work / "catalog", adapters=adapters, base_model=(args.base_model, base_dir))
    specs = workload([r.input for r in test], keys, 4096, args.seed)

    modes = args.modes.split(",")
    port = _free_port()
    config = launch.load_config(args={"catalog": str(catalog.root), "base_model": str(base_dir),
                                      "max_num_seqs": args.max_num_seqs, "default_router": "centroid"},
                                grpc_port=port, http_port=_free_port())
    template = config["applications"].pop()
    for mode in modes:
        app = copy.deepcopy(template)
        app.update(name=f"{APP_NAME}-{mode}", route_prefix=f"/{mode}")
        app["args"]["batching"] = mode
        for d in app["deployments"]:
            if d["name"] == "Generator":   # one replica each: the comparison is per replica
                d.pop("autoscaling_config", None)
                d["num_replicas"] = 1
                if args.num_gpus:
                    d.setdefault("ray_actor_options", {})["num_gpus"] = args.num_gpus
        config["applications"].append(app)
    log(f"starting the app ({', '.join(modes)} side by side)")
    launch.start(config)
    table: dict[str, list[dict]] = {m: [] for m in modes}
    try:
        for mode in modes:   # warm-up: every replica has run once
            asyncio.run(drive(port, f"{APP_NAME}-{mode}", specs[:8], 1.0, 3.0, args.seed))
        for rate in rates:
            for mode in modes:
                row = asyncio.run(drive(port, f"{APP_NAME}-{mode}", specs, rate, args.duration, args.seed))
                log(f"[{mode}] rate {rate:g}/s: {row['completed']}/{row['sent']} answered, {row['tok_s']:.1f} tok/s, "
                    f"TTFT p50 {row['ttft_p50_ms']:.0f} ms p99 {row['ttft_p99_ms']:.0f} ms, errors {row['errors']}")
                table[mode].append(row)
    finally:
        launch.stop()

    print(f"{'mode':<11} {'rate/s':>6} {'done':>5} {'req/s':>6} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'TPOT p50':>9} {'TPOT p99':>9} {'errors':>6}")
    for mode, rows in table.items():
        for r in rows:
            print(f"{mode:<11} {r['rate']:>6g} {r['completed']:>5} {r['req_s']:>6.2f} {r['tok_s']:>7.1f} "
                  f"{r['ttft_p50_ms']:>9.0f} {r['ttft_p99_ms']:>9.0f} {r['tpot_p50_ms']:>9.1f} {r['tpot_p99_ms']:>9.1f} "
                  f"{r['errors']:>6}")
    report = {"base_model": args.base_model, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "duration_s": args.duration, "max_num_seqs": args.max_num_seqs, "table": table}
    if {"static", "continuous"} <= set(table):
        top = {m: table[m][-1] for m in ("static", "continuous")}   # the highest rate: both saturated there
        kept = {m: _kept_up(table[m]) for m in top}
        calm = max(kept["continuous"], key=lambda r: r["rate"])   # the highest rate continuous batching keeps up with
        report.update({
            "continuous_vs_static_throughput": round(top["continuous"]["tok_s"] / top["static"]["tok_s"], 2),
            "saturation_rate": top["static"]["rate"],
            "saturation_tok_s": {m: round(top[m]["tok_s"], 1) for m in top},
            "sustained_rate": {m: max(r["rate"] for r in kept[m]) for m in top},
            "ttft_p50_ms": round(calm["ttft_p50_ms"], 1), "ttft_p99_ms": round(calm["ttft_p99_ms"], 1),
            "ttft_p99_over_p50": round(calm["ttft_p99_ms"] / calm["ttft_p50_ms"], 2), "ttft_at_rate": calm["rate"],
            "tpot_p50_ms": round(calm["tpot_p50_ms"], 1),
            "errors": sum(r["errors"] for rows in table.values() for r in rows)})
    print(json.dumps(report))
    return report


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
