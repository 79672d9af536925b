"""Fused multi-LoRA generation vs merged weights and peft, measured side by side in one run.

    .venv/bin/python bench/fused_generation.py                    # random tiny Llama, built in-process
    .venv/bin/python bench/fused_generation.py --base PATH        # a HF directory (e.g. smollm2)

12 random rank-8 adapters on every attention + MLP projection, 16 requests, 32 new tokens, greedy,
EOS ignored so every mode generates exactly the same number of tokens. Modes:
  mixed_k1      fused layer, each row its own adapter (round-robin over the adapters)
  mixed_k3      fused layer, each row a weighted 3-way fusion
  homogeneous   fused layer, every row the same adapter
  merged        adapter merged into the base weights, a plain HF model (no LoRA cost)
  peft_loop     peft, set_adapter + generate one request at a time
  peft_adapter_names  peft's mixed batch, generate(..., adapter_names=[...])
Progress goes to stderr, a table to stdout, and the last stdout line is one JSON object.
Peak RSS per mode is the process high-water mark reset before the mode (/proc/self/clear_refs),
so it includes every model this script keeps resident; `extra_mb` is the peak above the RSS at
the start of the mode (the mode's own working memory).
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

# Idle OpenMP workers spin by default; on a shared 2-core machine that turns any background load
# into 5-10x slower, erratic steps. Passive waiting keeps the modes comparable. Must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from routing.lora import FusedLoraModel, generate  # noqa: E402

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CORPUS = [
    "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. ",
    "Question: what is the capital of France? Answer: Paris is the capital of France. ",
    "translate to german: good morning, how are you today? guten morgen, wie geht es dir heute? ",
    "summarize: the committee met on tuesday and agreed to postpone the vote until next month. ",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5\n",
]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def tiny_base():
    """A random-init small Llama and a byte-level BPE tokenizer trained on CORPUS (no hub access)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"],
                                                            show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval(), tokenizer, "tiny-random-llama(h128,L4,ffn384; the tiny base's shape)"


def make_adapters(base, root: Path, n: int, rank: int, seed: int):
    """n random LoRAs on one peft model (the peft baselines use it); each saved to root/<name>."""
    from peft import LoraConfig, get_peft_model

    names = [f"a{i:02d}" for i in range(n)]
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ALL_PROJ)
    torch.manual_seed(seed)   # peft draws lora_A from torch's global generator
    peft_model = get_peft_model(base, cfg, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_B" in pname:  # zero at init: make every delta non-zero
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(root, safe_serialization=True)
    paths = {}
    for name in names:
        d = root / name
        if not (d / "adapter_config.json").is_file():  # peft writes its first adapter to root itself
            d.mkdir(exist_ok=True)
            for f in ("adapter_config.json", "adapter_model.safetensors"):
                (d / f).write_bytes((root / f).read_bytes())
        paths[name] = d
    return peft_model.eval(), paths


def hf_generate(model, tok, prompts, new_tokens, **extra):
    """Plain HF generate with the settings `routing.lora.generate` uses (greedy, no EOS stop)."""
    gc = copy.deepcopy(model.generation_config)
    gc.eos_token_id, gc.pad_token_id = [], tok.pad_token_id
    gc.max_new_tokens, gc.max_length, gc.do_sample = new_tokens, None, False
    gc.temperature = gc.top_p = gc.top_k = None
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**enc, generation_config=gc, **extra)
    new = out[:, enc["input_ids"].shape[1]:]
    tok.batch_decode(new, skip_special_tokens=True)
    return new.tolist()


class PeakRss:
    """Process RSS high-water mark within a block (Linux: VmHWM reset via /proc/self/clear_refs)."""

    @staticmethod
    def _status(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self.start = self._status("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak = self._status("VmHWM")
        self.extra = self.peak - self.start


def run_interleaved(modes: dict, repeats: int) -> tuple[dict, dict, dict, dict]:
    """Warm every mode up, then time `repeats` rounds, each round running every mode once.

    Interleaving spreads background load on a shared machine over all modes alike, so the ratios
    stay fair even when absolute times wobble. Returns outputs, median seconds, min seconds, RSS.
    """
    outputs, times, rss = {}, {m: [] for m in modes}, {}
    for mode, fn in modes.items():
        log(f"warm-up {mode} ...")
        with PeakRss() as rss[mode]:
            outputs[mode] = fn()
    for r in range(repeats):
        for mode, fn in modes.items():
            with PeakRss() as peak:
                t = time.perf_counter()
                fn()
                times[mode].append(time.perf_counter() - t)
            if peak.peak > rss[mode].peak:
                rss[mode] = peak
        log(f"round {r + 1}/{repeats}: " + ", ".join(f"{m} {times[m][-1]:.2f}s" for m in modes))
    return (outputs, {m: statistics.median(t) for m, t in times.items()}, {m: min(t) for m, t in times.items()},
            rss)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, help="HF model directory (default: a random tiny Llama built here)")
    ap.add_argument("--adapters", type=int, default=12)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds over all modes (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)

    if args.base:
        from routing.base_models import load_causal_lm
        base, tok = load_causal_lm(args.base)
        base_name = args.base.name
    else:
        base, tok, base_name = tiny_base()
    log(f"base {base_name}: {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params, threads {args.threads}")

    fused_base, merged_base = copy.deepcopy(base), copy.deepcopy(base)
    tmp = tempfile.TemporaryDirectory(prefix="fused-bench-")
    peft_model, paths = make_adapters(base, Path(tmp.name), args.adapters, args.rank, args.seed)
    names = list(paths)
    log(f"{len(names)} adapters, rank {args.rank}, saved under {tmp.name}")

    fused = FusedLoraModel(fused_base, max_loras=len(names), max_rank=args.rank)
    for name, p in paths.items():
        fused.load_adapter(name, p)
    from peft import PeftModel
    merged = PeftModel.from_pretrained(merged_base, paths[names[0]]).merge_and_unload().eval()

    prompts = [CORPUS[i % len(CORPUS)][: 24 + 7 * (i % 5)] for i in range(args.requests)]  # ragged: left padding
    row_adapter = [names[i % len(names)] for i in range(args.requests)]
    k1 = [[(n, 1.0)] for n in row_adapter]
    k3 = [[(names[(i + j) % len(names)], w) for j, w in enumerate((0.5, 0.3, 0.2))] for i in range(args.requests)]
    homog = [[(names[0], 1.0)]] * args.requests
    n_new = args.new_tokens

    def fused_mode(routes):
        return lambda: [g.token_ids for g in generate(fused, tok, prompts, routes, max_new_tokens=n_new,
                                                      ignore_eos=True)]

    def peft_loop():
        out = []
        for p, a in zip(prompts, row_adapter):
            peft_model.set_adapter(a)
            out += hf_generate(peft_model, tok, [p], n_new)
        return out

    modes = {
        "mixed_k1": fused_mode(k1),
        "mixed_k3": fused_mode(k3),
        "homogeneous": fused_mode(homog),
        "merged": lambda: hf_generate(merged, tok, prompts, n_new),
        "peft_loop": peft_loop,
        "peft_adapter_names": lambda: hf_generate(peft_model, tok, prompts, n_new, adapter_names=row_adapter),
    }
    outputs, median_s, min_s, rss = run_interleaved(modes, args.repeats)
    results = {}
    for mode in modes:
        assert all(len(t) == n_new for t in outputs[mode]), f"{mode}: not every row generated {n_new} tokens"
        results[mode] = dict(tokens_per_s=args.requests * n_new / median_s[mode], seconds=median_s[mode],
                             best_tokens_per_s=args.requests * n_new / min_s[mode],
                             peak_rss_mb=rss[mode].peak, extra_mb=rss[mode].extra)

    # correctness: logits of the mixed K=1 batch vs peft running each row's adapter alone
    ids = torch.randint(3, len(tok), (args.requests, 16), generator=torch.Generator().manual_seed(args.seed))
    with torch.inference_mode():
        with fused.routing(k1):
            got = fused(input_ids=ids).logits
        diff = 0.0
        for b, a in enumerate(row_adapter):
            peft_model.set_adapter(a)
            diff = max(diff, (got[b] - peft_model(input_ids=ids[b:b + 1]).logits[0]).abs().max().item())
    same = lambda a, b: sum(x == y for x, y in zip(outputs[a], outputs[b])) / len(outputs[a])  # noqa: E731

    tps = {m: r["tokens_per_s"] for m, r in results.items()}
    summary = {
        "base": base_name, "threads": args.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "adapters": len(names), "rank": args.rank,
        "requests": args.requests, "new_tokens": n_new, "repeats": args.repeats,
        "tokens_per_s": {m: round(v, 1) for m, v in tps.items()},
        "best_tokens_per_s": {m: round(r["best_tokens_per_s"], 1) for m, r in results.items()},
        "peak_rss_mb": {m: round(r["peak_rss_mb"], 1) for m, r in results.items()},
        "mixed_vs_homogeneous": round(tps["mixed_k1"] / tps["homogeneous"], 3),
        "mixed_vs_merged": round(tps["mixed_k1"] / tps["merged"], 3),
        "mixed_vs_peft_loop": round(tps["mixed_k1"] / tps["peft_loop"], 3),
        "mixed_vs_peft_adapter_names": round(tps["mixed_k1"] / tps["peft_adapter_names"], 3),
        "k3_vs_k1": round(tps["mixed_k3"] / tps["mixed_k1"], 3),
        "max_abs_diff_vs_peft": diff,
        "mixed_tokens_equal_peft_loop": same("mixed_k1", "peft_loop"),
        "mixed_tokens_equal_peft_adapter_names": same("mixed_k1", "peft_adapter_names"),
        "homogeneous_tokens_equal_merged": same("homogeneous", "merged"),
    }
    print(f"\nbase {base_name}, {len(names)} adapters r={args.rank}, {args.requests} requests x {n_new} "
          f"new tokens, greedy, {args.threads} threads, median of {args.repeats} interleaved rounds")
    print(f"{'mode':<20} {'tok/s':>9} {'best tok/s':>11} {'seconds':>9} {'mixed_k1 is':>12} {'peak RSS MB':>12} "
          f"{'extra MB':>9}")
    for m, r in results.items():
        print(f"{m:<20} {r['tokens_per_s']:>9.1f} {r['best_tokens_per_s']:>11.1f} {r['seconds']:>9.3f} "
              f"{tps['mixed_k1'] / r['tokens_per_s']:>11.2f}x {r['peak_rss_mb']:>12.1f} {r['extra_mb']:>9.1f}")
    print(json.dumps(summary))
    tmp.cleanup()
    return summary


if __name__ == "__main__":
    main()
