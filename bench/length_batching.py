"""One long prompt among short ones: the Generator's length-aware plan vs one `generate` call for all.

    .venv/bin/python bench/length_batching.py                     # random tiny Llama, built in-process
    .venv/bin/python bench/length_batching.py --base PATH --long-tokens 2000   # e.g. smollm2

A server batch of `--requests` rows: one prompt of about `--long-tokens` tokens, the rest 40
characters (9-17 tokens), each row its own adapter (fused K=1), greedy, EOS ignored. Modes, interleaved:
  one_call  every row in one `generate` call, left-padded to the long prompt
  planned   `plan_batches`' groups (the short prompts together first, then the long one), one call each
`seconds` is the whole server batch. What a request waits is `answer_s`: in one call every row
answers at its end; planned, the Generator streams each call's rows as it returns, so the short rows
answer after the first call (`planned_together` is the same plan answered all at once, as before the
Generator streamed). `tokens_equal` is the share of rows whose tokens match across modes.
Progress goes to stderr, a table to stdout, and the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # see fused_generation.py; must precede torch

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fused_generation import CORPUS, log, make_adapters, run_interleaved, tiny_base  # noqa: E402

from routing.lora import FusedLoraModel, generate, plan_batches  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, help="HF model directory (default: a random tiny Llama built here)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--long-tokens", type=int, default=400, help="the long prompt's length (under the context)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.base:
        from routing.base_models import load_causal_lm
        base, tok = load_causal_lm(args.base)
        base_name = args.base.name
    else:
        base, tok, base_name = tiny_base()
    fused_base = copy.deepcopy(base)   # make_adapters wraps `base` in peft in place
    tmp = tempfile.TemporaryDirectory(prefix="length-bench-")
    _, paths = make_adapters(base, Path(tmp.name), args.requests, 8, seed=0)
    fused = FusedLoraModel(fused_base, max_loras=len(paths), max_rank=8)
    for name, p in paths.items():
        fused.load_adapter(name, p)

    text = "".join(CORPUS) * 200
    long_ids = tok(text).input_ids[: args.long_tokens]
    prompts = [tok.decode(long_ids)] + [CORPUS[i % len(CORPUS)][:40] for i in range(1, args.requests)]
    lengths = [len(tok(p).input_ids) for p in prompts]
    routes = [[(name, 1.0)] for name in paths]
    plan = plan_batches([{name} for name in paths], lengths, capacity=len(paths))
    log(f"base {base_name}; prompt tokens: long {lengths[0]}, short {min(lengths[1:])}-{max(lengths[1:])}; "
        f"plan {[len(g) for g in plan]}")

    answered: dict[str, list[list[float]]] = {"one_call": [], "planned": []}   # per run: each row's answer time

    def run(mode: str, groups: list[list[int]]):
        def fn():
            out: dict[int, list[int]] = {}
            at: dict[int, float] = {}
            started = time.perf_counter()
            for g in groups:
                done = generate(fused, tok, [prompts[i] for i in g], [routes[i] for i in g],
                                max_new_tokens=args.new_tokens, ignore_eos=True)
                out.update({i: d.token_ids for i, d in zip(g, done)})
                at.update({i: time.perf_counter() - started for i in g})
            answered[mode].append([at[i] for i in range(len(prompts))])
            return [out[i] for i in range(len(prompts))]
        return fn

    modes = {"one_call": run("one_call", [list(range(len(prompts)))]), "planned": run("planned", plan)}
    outputs, median_s, _, _ = run_interleaved(modes, args.repeats)
    same = sum(a == b for a, b in zip(outputs["one_call"], outputs["planned"])) / len(prompts)
    row_s = {m: [statistics.median(r[i] for r in runs[1:]) for i in range(len(prompts))]   # [0]: warm-up
             for m, runs in answered.items()}
    answer_s = {"short": {"one_call": statistics.mean(row_s["one_call"][1:]), "planned_together": median_s["planned"],
                          "planned": statistics.mean(row_s["planned"][1:])},
                "long": {"one_call": row_s["one_call"][0], "planned_together": median_s["planned"],
                         "planned": row_s["planned"][0]}}
    summary = {
        "base": base_name, "threads": args.threads, "requests": args.requests, "new_tokens": args.new_tokens,
        "long_prompt_tokens": lengths[0], "short_prompt_tokens": [min(lengths[1:]), max(lengths[1:])],
        "plan": [len(g) for g in plan], "repeats": args.repeats,
        "seconds": {m: round(s, 3) for m, s in median_s.items()},
        "planned_speedup": round(median_s["one_call"] / median_s["planned"], 2),
        "answer_s": {k: {m: round(s, 3) for m, s in v.items()} for k, v in answer_s.items()},
        "short_answer_speedup": round(answer_s["short"]["one_call"] / answer_s["short"]["planned"], 2),
        "tokens_equal": same,
    }
    print(f"\nbase {base_name}: 1 prompt of {lengths[0]} tokens + {args.requests - 1} of "
          f"{min(lengths[1:])}-{max(lengths[1:])}, {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"{'':<17} {'batch s':>8} {'short answer s':>15} {'long answer s':>14}")
    for m, batch_mode in (("one_call", "one_call"), ("planned_together", "planned"), ("planned", "planned")):
        print(f"{m:<17} {median_s[batch_mode]:>8.3f} {answer_s['short'][m]:>15.3f} {answer_s['long'][m]:>14.3f}")
    print(json.dumps(summary))
    tmp.cleanup()
    return summary


if __name__ == "__main__":
    main()
