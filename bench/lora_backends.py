"""CPU multi-LoRA backends side by side: all slots densely vs the per-row gather vs one matmul per slot.

    .venv/bin/python bench/lora_backends.py            # the table behind get_backend's CPU rule
    .venv/bin/python bench/lora_backends.py --quick    # a few cases (a smoke run)

One "step" is `add_lora` on the 7 projections of one decoder layer (q, k, v, o, gate, up, down),
16 slots of rank R, B rows of T tokens, each row routed to K distinct random slots. Shapes: the
tiny test base (h128, ffn384) and SmolLM2-135M (h576, kv 192, ffn1536). Modes:
  gather_cached  TorchReferenceBackend, the gather done once (a static batch reuses it every step)
  gather         TorchReferenceBackend, gather + matmuls every step (routing changes every step)
  grouped        SlotGroupedBackend, grouping + one matmul pair per used slot every step
  dense          DenseSlotsBackend, two matmuls over all 16 slots every step (its B layout kept)
`extra_mb` is the working memory beyond inputs and outputs, counted from the tensors each mode
allocates (see `extra_mb`); RSS high-water marks were too noisy here (freed heap is reused). Times are medians of interleaved
repeats. Progress goes to stderr; a table, then one JSON line, to stdout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from routing.lora.backend import DenseSlotsBackend, SlotGroupedBackend, TorchReferenceBackend  # noqa: E402

SHAPES = {  # name -> the 7 projections' (in, out)
    "tiny": [(128, 128)] * 4 + [(128, 384), (128, 384), (384, 128)],
    "smollm2-135m": [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)],
}
SLOTS = 16


def log(msg: str) -> None:
    print(f"[lora-backends] {msg}", file=sys.stderr, flush=True)


def make_case(shape: str, b: int, t: int, k: int, r: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    layers = [(torch.randn(SLOTS, r, d_in, generator=g) * 0.02, torch.randn(SLOTS, d_out, r, generator=g) * 0.02,
               torch.rand(SLOTS, generator=g), torch.randn(b, t, d_in, generator=g), torch.zeros(b, t, d_out))
              for d_in, d_out in SHAPES[shape]]
    indices = torch.stack([torch.randperm(SLOTS, generator=g)[:k] for _ in range(b)])
    weights = torch.full((b, k), 1.0 / k)
    return layers, indices, weights


def modes(layers, indices, weights):
    ref, grouped = TorchReferenceBackend(), SlotGroupedBackend()
    cached = [ref.prepare(a, bb, s, indices, weights) for a, bb, s, _, _ in layers]

    def gather_cached():
        for (_, _, _, x, y), p in zip(layers, cached):
            ref.apply(y, x, p)

    def per_step(backend):
        def step():
            for a, bb, s, x, y in layers:
                backend.add_lora(y, x, a, bb, s, indices, weights)
        return step

    return {"gather_cached": gather_cached, "gather": per_step(ref), "grouped": per_step(grouped),
            "dense": per_step(DenseSlotsBackend())}


def extra_mb(layers, indices, weights) -> dict[str, float]:
    """The working memory each mode allocates beyond inputs and outputs, counted from tensor sizes.

    gather_cached holds every layer's gathered stacks for the whole batch; gather allocates one
    layer's stacks (plus the rank-K*R activations) at a time; grouped allocates, per used slot,
    the rows' activations x[rows], their rank-R projection and the (rows, T, out) update; dense
    allocates the (B*T, L*R) activations of one projection and keeps one (L*R, out) copy of each B stack.
    """
    ref, grouped = TorchReferenceBackend(), SlotGroupedBackend()
    b, k = indices.shape
    gathered, per_layer_gather, per_layer_grouped = 0, [], []
    for a, bb, s, x, _ in layers:
        stacks = sum(t.numel() * t.element_size() for t in ref.prepare(a, bb, s, indices, weights))
        gathered += stacks
        t, r, d_out = x.shape[1], a.shape[1], bb.shape[1]
        per_layer_gather.append(stacks + b * t * k * r * x.element_size())
        _, _, groups = grouped.prepare(a, bb, s, indices, weights)
        per_layer_grouped.append(max(len(rows) for _, rows, _ in groups) * t * (x.shape[2] + r + d_out)
                                 * x.element_size())
    dense = sum(bb.numel() * bb.element_size() for _, bb, _, _, _ in layers) + max(
        x.shape[0] * x.shape[1] * a.shape[0] * a.shape[1] * x.element_size() for a, _, _, x, _ in layers)
    mb = 2 ** 20
    return {"gather_cached": gathered / mb, "gather": max(per_layer_gather) / mb, "grouped": max(per_layer_grouped) / mb,
            "dense": dense / mb}


def time_modes(fns: dict, repeats: int) -> dict:
    for fn in fns.values():
        fn()
    times = {m: [] for m in fns}
    for _ in range(repeats):
        for m, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[m].append(time.perf_counter() - t)
    return {m: statistics.median(v) * 1e3 for m, v in times.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a handful of cases")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    grid = list(itertools.product(SHAPES, [1, 64, 256], [1, 16, 64], [1, 3], [8, 16]))
    if args.quick:
        grid = [("tiny", 1, 8, 1, 8), ("smollm2-135m", 1, 32, 3, 16), ("smollm2-135m", 64, 8, 3, 16)]
    rows = []
    with torch.no_grad():   # not inference_mode: slot stacks keep their version counter, as in serving
        for n, (shape, t, b, k, r) in enumerate(grid):
            layers, indices, weights = make_case(shape, b, t, k, r)
            fns = modes(layers, indices, weights)
            ms = time_modes(fns, args.repeats)
            mem = extra_mb(layers, indices, weights)
            rows.append(dict(shape=shape, T=t, B=b, K=k, R=r, ms=ms, extra_mb=mem))
            log(f"{n + 1}/{len(grid)} {shape} T={t} B={b} K={k} R={r}: "
                + ", ".join(f"{m} {v:.2f}ms/{mem[m]:.1f}MB" for m, v in ms.items()))
    print(f"{'shape':<13} {'T':>4} {'B':>3} {'K':>2} {'R':>3} | {'gather_cached ms':>16} {'gather ms':>10} "
          f"{'grouped ms':>11} {'dense ms':>9} | {'cached MB':>10} {'gather MB':>10} {'grouped MB':>11} "
          f"{'dense MB':>9}")
    for row in rows:
        ms, mb = row["ms"], row["extra_mb"]
        print(f"{row['shape']:<13} {row['T']:>4} {row['B']:>3} {row['K']:>2} {row['R']:>3} | "
              f"{ms['gather_cached']:>16.3f} {ms['gather']:>10.3f} {ms['grouped']:>11.3f} {ms['dense']:>9.3f} | "
              f"{mb['gather_cached']:>10.2f} {mb['gather']:>10.2f} {mb['grouped']:>11.2f} {mb['dense']:>9.2f}")
    summary = {"threads": args.threads, "slots": SLOTS, "repeats": args.repeats, "cases": rows}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
