"""`switchboard demo`: the whole product in miniature, on one machine, offline.

corpus -> base model -> one adapter per task -> catalog -> trained routers (a new catalog version) ->
Serve app (from the Serve YAML) -> every test query over gRPC four ways (bare base, oracle adapter,
routed by `auto`, which serves the ensemble router, and its top-3 fused) -> every adapter fused with equal
weights, in-process on the same engine (the app's API routes, it takes no explicit weights) -> per-task
report, so a new user sees what fusion buys and what it costs.
Every step is cached by content, so a second run only re-serves and re-evaluates.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from routing.catalog import MANIFEST, Catalog
from routing.metrics import score
from training.adapter import train_adapters
from training.base_model import resolve_base_model
from training.catalog_build import build_catalog
from training.demo_corpus import demo_records, write_demo_corpus
from training.generation_eval import FUSED_TOP_K, InProcessAnswerer
from training.records import Record
from training.router_training import train_classifier

from . import launch
from .client import SwitchboardClient

MAX_NEW_TOKENS = 16
CONCURRENCY = 16   # in-flight requests, so the Generator really batches mixed adapters
STEPS = 8
ROUTER_TRAINING = {"per_task": 100, "epochs": 1.0}   # the demo's tasks are easy; seconds, not minutes


def _step(n: int, text: str) -> None:
    print(f"\n[{n}/{STEPS}] {text}", file=sys.stderr, flush=True)


def _ask(client: SwitchboardClient, records: list[Record], desc: str, **kwargs) -> list[tuple[str, str, float]]:
    """(answer, top-1 routed task, latency ms) per record, CONCURRENCY requests in flight."""

    def one(r: Record) -> tuple[str, str, float]:
        started = time.perf_counter()
        extra = {"task": r.key, "router": "fixed"} if kwargs.get("fixed") else {"top_k": kwargs.get("top_k", 0)}
        reply = client.generate(r.input, max_new_tokens=MAX_NEW_TOKENS, stop=["\n"],
                                base_only=kwargs.get("base_only", False), **extra)
        return reply.text, reply.decision.tasks[0].task, 1000 * (time.perf_counter() - started)

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(tqdm(pool.map(one, records), total=len(records), desc=desc, file=sys.stderr))


def run_demo(base_model: str = "tiny", workdir: Path = Path("runs/demo"), grpc_port: int = 9000) -> dict:
    started = time.perf_counter()
    workdir = workdir.resolve()
    _step(1, "demo corpus")
    paths = write_demo_corpus(workdir / "data")
    train, val, test = (demo_records(s) for s in ("train", "val", "test"))
    print(f"  {len({r.key for r in train})} tasks; {len(train)} train / {len(val)} val / {len(test)} test -> {paths['train'].parent}",
          file=sys.stderr)

    _step(2, f"base model {base_model!r}")
    base_dir = resolve_base_model(base_model)

    _step(3, "one LoRA adapter per task")
    adapters = workdir / "adapters" / base_dir.name
    train_adapters(base_dir, train, adapters)

    _step(4, "catalog (adapters + task index from the validation split)")
    # The task index is built from the validation split (LoRAuter's task representations).
    catalog = build_catalog(val, workdir / "catalogs", adapters=adapters, base_model=(base_model, base_dir),
                            versioned=True)
    print(f"  catalog {catalog.version} at {catalog.root}", file=sys.stderr)

    _step(5, "routers: fine-tuned encoder classifier + n-gram model (the ensemble `auto` serves)")
    catalog = _with_trained_routers(catalog, train)
    print(f"  catalog {catalog.version} (parent {catalog.parent}) at {catalog.root}", file=sys.stderr)

    _step(6, "Serve app from serve_app/serve_config.yaml (gRPC on loopback)")
    config = launch.load_config(args={"catalog": str(catalog.root), "base_model": str(base_dir)}, grpc_port=grpc_port)
    launch.start(config)
    try:
        _step(7, f"{len(test)} test queries x 4 over gRPC")
        with SwitchboardClient(f"127.0.0.1:{grpc_port}") as client:
            health = client.health()
            print(f"  {health.status}: catalog {health.catalog_version}, base {health.base_model}", file=sys.stderr)
            base = _ask(client, test, "bare base", fixed=True, base_only=True)
            oracle = _ask(client, test, "oracle adapter", fixed=True)
            routed = _ask(client, test, "routed (auto)")
            fused = _ask(client, test, f"fused (auto, top-{FUSED_TOP_K})", top_k=FUSED_TOP_K)
            router = client.route(test[0].input).decision.router   # what `auto` serves
            cost = _routing_cost(client, test[::len(test) // 16 or 1][:16])
    finally:
        launch.stop()
    _step(8, f"{len(test)} test queries with all {len(catalog.keys)} adapters fused uniformly, in-process")
    uniform = InProcessAnswerer(catalog, workdir / "eval", base_dir=base_dir)("uniform", test)   # 16 tokens, to a newline
    columns = {"base": base, "oracle": oracle, "routed": routed, "fused": fused, "uniform": [(u,) for u in uniform]}
    report = _report(test, columns, catalog.version, time.perf_counter() - started)
    return {**report, "router": router, **cost}


def _with_trained_routers(catalog: Catalog, records: list[Record]) -> Catalog:
    """`catalog` plus the classifier and lexical routers, cached next to it by its version."""
    out = catalog.root.parent / f"{catalog.version}-routers"
    if (out / MANIFEST).is_file():
        return Catalog.load(out)
    return train_classifier(catalog, records, out, **ROUTER_TRAINING)


def _routing_cost(client: SwitchboardClient, records: list[Record]) -> dict:
    """What routing costs against generating a 32-token answer, from the server's own route and
    generate times, one request at a time (no queueing). Answers that stop early (EOS) are scaled
    to 32 tokens by their measured time per token, prefill included, so the share errs high."""
    route, generate, tokens = [], [], []
    for r in records:
        reply = client.generate(r.input, max_new_tokens=32)
        route.append(reply.route_ms)
        generate.append(reply.generate_ms)
        tokens.append(reply.new_tokens)
    route_ms, answer_ms = float(np.mean(route)), 32 * float(np.sum(generate) / max(1, np.sum(tokens)))
    share = route_ms / (route_ms + answer_ms)
    print(f"routing: {route_ms:.1f} ms per request, {100 * share:.1f}% of a 32-token answer's server time "
          f"({answer_ms:.0f} ms; {len(records)} requests, one at a time)", file=sys.stderr)
    return {"route_ms": round(route_ms, 1), "answer_32_ms": round(answer_ms, 1), "routing_share": round(share, 4)}


def _report(test: list[Record], columns: dict[str, list[tuple]], version: str, seconds: float) -> dict:
    """Exact-match accuracy per task and column (each answer's first element), routed top-1 accuracy."""
    per_task: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for i, r in enumerate(test):
        row = per_task[r.key]
        for name, answers in columns.items():
            row[name].append(score("exact", answers[i][0], r.output))
        row["route"].append(float(columns["routed"][i][1] == r.key))
    mean = lambda key: float(np.mean([v for row in per_task.values() for v in row[key]]))  # noqa: E731
    latencies = np.array([x[2] for x in columns["routed"]])
    out = sys.stderr
    print(f"\n{'task':<22}" + "".join(f"{c:>8}" for c in columns) + f"{'route@1':>9}", file=out)
    for key, row in sorted(per_task.items()):
        print(f"{key:<22}" + "".join(f"{np.mean(row[c]):>8.2f}" for c in columns) + f"{np.mean(row['route']):>9.2f}",
              file=out)
    print(f"{'all':<22}" + "".join(f"{mean(c):>8.2f}" for c in columns) + f"{mean('route'):>9.2f}", file=out)
    print(f"fused: the routed request's top-{FUSED_TOP_K} adapters weighted by the router; uniform: all adapters "
          f"with equal weights, in-process (the query's own task template)", file=out)
    print(f"routed request latency over gRPC: p50 {np.percentile(latencies, 50):.0f} ms, "
          f"p99 {np.percentile(latencies, 99):.0f} ms ({CONCURRENCY} in flight); catalog {version}; "
          f"demo took {seconds:.0f} s", file=out)
    return {"tasks": len(per_task), "queries": len(test), "base_acc": round(mean("base"), 4),
            "oracle_acc": round(mean("oracle"), 4), "routed_acc": round(mean("routed"), 4),
            "fused_acc": round(mean("fused"), 4), "uniform_acc": round(mean("uniform"), 4),
            "routing_top1": round(mean("route"), 4), "p50_ms": round(float(np.percentile(latencies, 50)), 1),
            "p99_ms": round(float(np.percentile(latencies, 99)), 1), "grpc": True, "catalog_version": version,
            "seconds": round(seconds, 1)}
