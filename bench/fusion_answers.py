"""Answers at K = 1 vs K = 3 fusion, τ calibrated to the catalog vs LoRAuter's raw τ = 0.2 (issue 20).

On the demo corpus with a tiny base: one adapter per task (trained here, or `--adapters` from an
earlier run), a catalog from the validation split, the centroid router, and every test query answered
in-process by the fused multi-LoRA model (`routing.lora.generate`, greedy, as the Generator prompts:
the top task's template). Regimes: in-pool (every task available) and OOD (each query's own task left
out of the pool, LoRAuter's regime for its fusion claim: its adapter is then never used). Scored by
each task's catalog metric and by exact match (the demo's report), and normalised by the oracle
(the query's own adapter) as LoRAuter reports.

    .venv/bin/python bench/fusion_answers.py --work /tmp/fusion [--base-model tiny-test] [--adapters DIR]

Progress on stderr; one JSON object as the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from routing.base_models import load_causal_lm  # noqa: E402
from routing.decision import DEFAULT_TEMPERATURE, RouteRequest  # noqa: E402
from routing.encoder import shared_encoder  # noqa: E402
from routing.lora import FusedLoraModel, generate  # noqa: E402
from routing.metrics import score  # noqa: E402
from routing.routers import make_router  # noqa: E402
from routing.templates import render  # noqa: E402
from training.adapter import train_adapters  # noqa: E402
from training.base_model import resolve_base_model  # noqa: E402
from training.catalog_build import build_catalog  # noqa: E402
from training.demo_corpus import demo_records  # noqa: E402

MAX_NEW_TOKENS = 16   # the demo's


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def answer(fused, tokenizer, catalog, texts: list[str], routes: list[list[tuple[str, float]]]) -> list[str]:
    out = []
    for lo in range(0, len(texts), 32):
        prompts = [render(catalog.tasks[r[0][0]].template, t) for t, r in zip(texts[lo:lo + 32], routes[lo:lo + 32])]
        out += [g.text for g in generate(fused, tokenizer, prompts, routes[lo:lo + 32], max_new_tokens=MAX_NEW_TOKENS,
                                         stop=[["\n"]] * len(prompts))]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--base-model", default="tiny-test")
    ap.add_argument("--adapters", type=Path, help="adapters from an earlier run (<domain>/<task>/)")
    a = ap.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)
    base_dir = resolve_base_model(a.base_model, progress=False)
    train, val, test = (demo_records(s) for s in ("train", "val", "test"))
    adapters = a.adapters or a.work / "adapters"
    if a.adapters is None:
        log("training one adapter per task")
        train_adapters(base_dir, train, adapters, progress=False)
    catalogs = {}
    for name, calibrated in (("calibrated", True), ("paper", False)):
        catalogs[name] = build_catalog(val, a.work / f"catalog-{name}", adapters=adapters,
                                       base_model=(a.base_model, base_dir), calibrate_tau=calibrated)
    t_cal = catalogs["calibrated"].calibration["centroid_temperature"]
    log(f"calibrated centroid temperature T_cal = {t_cal}")
    model, tokenizer = load_causal_lm(base_dir)
    fused = FusedLoraModel(model, max_loras=len(catalogs["paper"].keys), max_rank=8)
    for key in catalogs["paper"].keys:
        fused.load_adapter(key, catalogs["paper"].adapter_path(key))
    texts, truth = [r.input for r in test], [r.key for r in test]
    embeddings = shared_encoder().encode(texts)
    metric = {k: t.metric for k, t in catalogs["paper"].tasks.items()}

    def scores(answers: list[str]) -> dict[str, float]:
        return {"metric": float(np.mean([score(metric[k], x, r.output) for x, k, r in zip(answers, truth, test)])),
                "exact": float(np.mean([score("exact", x, r.output) for x, r in zip(answers, test)]))}

    oracle = scores(answer(fused, tokenizer, catalogs["paper"], texts, [[(k, 1.0)] for k in truth]))
    log(f"oracle: {oracle}")
    rows = []
    for regime in ("in-pool", "ood"):
        for name, catalog in catalogs.items():
            router = make_router("centroid", catalog)
            for k in (1, 3):
                requests = [RouteRequest(t, top_k=k, temperature=DEFAULT_TEMPERATURE, embedding=e,
                                         exclude=key if regime == "ood" else None)
                            for t, e, key in zip(texts, embeddings, truth)]
                decisions = router.route(requests)
                routes = [list(d.tasks) for d in decisions]
                got = scores(answer(fused, tokenizer, catalog, texts, routes))
                row = {"regime": regime, "tau": name, "k": k, **{m: round(v, 4) for m, v in got.items()},
                       "normalised": round(got["metric"] / oracle["metric"], 4),
                       "top_weight": round(float(np.mean([d.tasks[0][1] for d in decisions])), 4),
                       "route_at_1": round(float(np.mean([d.top == t for d, t in zip(decisions, truth)])), 4)}
                log(json.dumps(row))
                rows.append(row)
    print(f"{'regime':<8} {'τ':<11} {'K':>2} {'metric':>7} {'exact':>7} {'norm':>6} {'top w':>6} {'route@1':>8}",
          file=sys.stderr)
    for r in rows:
        print(f"{r['regime']:<8} {r['tau']:<11} {r['k']:>2} {r['metric']:>7.3f} {r['exact']:>7.3f} "
              f"{r['normalised']:>6.3f} {r['top_weight']:>6.3f} {r['route_at_1']:>8.2f}", file=sys.stderr)
    print(json.dumps({"base_model": a.base_model, "t_cal": t_cal, "n": len(test), "oracle": oracle, "rows": rows,
                      "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
