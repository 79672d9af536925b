"""Fused multi-LoRA generation vs merged weights and peft, measured side by side in one run.

    .venv/bin/python bench/fused_generation.py                    # random tiny Llama, built in-process
    .venv/bin/python bench/fused_generation.py --base PATH        # a HF directory (e.g. smollm2)
    .venv/bin/python bench/fused_generation.py --device cuda --shape llama-8b --adapters 16 --rank 16 \
        --requests 64 --new-tokens 128 --repeats 1 --peft-loop-requests 8    # bench/gpu_check.sh

12 random rank-8 adapters on every attention + MLP projection, 16 requests, 32 new tokens, greedy,
EOS ignored so every mode generates exactly the same number of tokens. `--shape llama-1b|llama-8b`
builds a random-init model of Llama-3.2-1B / Llama-3-8B's shape directly on the device, in --dtype
(bfloat16 by default on CUDA). Modes:
  bare          the base model with no adapters at all, plain HF (the physical limit)
  mixed_k1      fused layer, each row its own adapter (round-robin over the adapters)
  mixed_k3      fused layer, each row a weighted 3-way fusion
  homogeneous   fused layer, every row the same adapter
  merged        adapter merged into the base weights, a plain HF model (no LoRA cost)
  peft_loop     peft, set_adapter + generate one request at a time (the first --peft-loop-requests)
  peft_adapter_names  peft's mixed batch, generate(..., adapter_names=[...])
Progress goes to stderr, a table to stdout, and the last stdout line is one JSON object.
On CPU, peak memory per mode is the process RSS high-water mark reset before the mode
(/proc/self/clear_refs), so it includes every model this script keeps resident; on CUDA it is
torch's peak allocated GPU memory. `extra_mb` is the peak above the start of the mode (the mode's
own working memory: KV cache, activations, and for the fused modes the LoRA path's per-step
buffers). `lora_path_mb` = the adapter slots + (extra of mixed_k1 - extra of bare), compared with
the adapters' own bytes (target on GPU: <= 1.10x).
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

from routing.devices import DTYPES, resolve_placement  # noqa: E402
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


LLAMA_SHAPES = {  # random-init stand-ins with the real models' parameter counts (1.24B, 8.03B)
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


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


def llama_base(shape: str, device: torch.device, dtype: torch.dtype):
    """A random-init Llama of `shape` built on `device` in `dtype` (no fp32 or host copy), with the
    tiny BPE tokenizer: prompts only need token ids, and ids past its vocabulary decode to nothing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer, _ = tiny_base()
    cfg = LlamaConfig(**LLAMA_SHAPES[shape], max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    return model, tokenizer, f"random-{shape}"


def make_adapters(base, root: Path, n: int, rank: int, seed: int):
    """n random LoRAs on one peft model (the peft baselines use it); each saved to root/<name>."""
    from peft import LoraConfig, get_peft_model

    names = [f"a{i:02d}" for i in range(n)]
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ALL_PROJ)
    torch.manual_seed(seed)   # peft draws lora_A from torch's global generator
    peft_model = get_peft_model(base, cfg, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, cfg)
    device = next(base.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_B" in pname:  # zero at init: make every delta non-zero
                p.copy_(torch.randn(p.shape, generator=g, device=device) * 0.05)
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
    enc = tok(prompts, return_tensors="pt", padding=True).to(model.device)
    with torch.inference_mode():
        out = model.generate(**enc, generation_config=gc, **extra)
    new = out[:, enc["input_ids"].shape[1]:]
    tok.batch_decode(new, skip_special_tokens=True)
    return new.tolist()


class PeakCuda:
    """Peak allocated GPU memory within a block (MB), and its excess over the start."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.start = torch.cuda.memory_allocated() / 2**20
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated() / 2**20
        self.extra = self.peak - self.start


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


def run_interleaved(modes: dict, repeats: int, peak=PeakRss) -> tuple[dict, dict, dict, dict]:
    """Warm every mode up, then time `repeats` rounds, each round running every mode once.

    Interleaving spreads background load on a shared machine over all modes alike, so the ratios
    stay fair even when absolute times wobble. Returns outputs, median seconds, min seconds, RSS.
    """
    outputs, times, rss = {}, {m: [] for m in modes}, {}
    for mode, fn in modes.items():
        log(f"warm-up {mode} ...")
        with peak() as rss[mode]:
            outputs[mode] = fn()
    for r in range(repeats):
        for mode, fn in modes.items():
            with peak() as seen:
                t = time.perf_counter()
                fn()
                times[mode].append(time.perf_counter() - t)
            if seen.peak > rss[mode].peak:
                rss[mode] = seen
        log(f"round {r + 1}/{repeats}: " + ", ".join(f"{m} {times[m][-1]:.2f}s" for m in modes))
    return (outputs, {m: statistics.median(t) for m, t in times.items()}, {m: min(t) for m, t in times.items()},
            rss)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, help="HF model directory (default: a random tiny Llama built here)")
    ap.add_argument("--shape", choices=["tiny", *LLAMA_SHAPES], default="tiny",
                    help="random-init model shape when --base is not given")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bfloat16 on CUDA, else float32")
    ap.add_argument("--adapters", type=int, default=12)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--peft-loop-requests", type=int, default=None,
                    help="time peft's per-request loop on only the first N requests (tokens/s is per token either "
                         "way; the loop is the slow baseline); default: all")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds over all modes (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    placement = resolve_placement(args.device, args.dtype, gpu_assigned=args.device == "cuda", who="fused_generation")
    device, dtype = placement.device, placement.dtype

    if args.base:
        from routing.base_models import load_causal_lm
        base, tok = load_causal_lm(args.base, dtype, device)
        base_name = args.base.name
    elif args.shape == "tiny":
        base, tok, base_name = tiny_base()
        base = base.to(device=device, dtype=dtype)
    else:
        base, tok, base_name = llama_base(args.shape, device, dtype)
    n_params = sum(p.numel() for p in base.parameters())
    log(f"base {base_name}: {n_params / 1e6:.1f}M params on {device} in {dtype}, threads {args.threads}")

    bare, fused_base, merged_base = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    tmp = tempfile.TemporaryDirectory(prefix="fused-bench-")
    peft_model, paths = make_adapters(base, Path(tmp.name), args.adapters, args.rank, args.seed)
    names = list(paths)
    log(f"{len(names)} adapters, rank {args.rank}, saved under {tmp.name}")

    fused = FusedLoraModel(fused_base, max_loras=len(names), max_rank=args.rank)
    for name, p in paths.items():
        fused.load_adapter(name, p)
    slot_bytes = sum(t.numel() * t.element_size() for layer in fused.layers.values()
                     for t in (layer.lora_a, layer.lora_b, layer.lora_scale))
    adapter_bytes = sum(len(names) * args.rank * (layer.in_features + layer.out_features) * dtype.itemsize
                        for layer in fused.layers.values())  # every adapter is rank `rank` on every layer
    log(f"fused backend {type(fused.backend).__name__}; adapter slots {slot_bytes / 2**20:.1f} MB")
    from peft import PeftModel
    merged = PeftModel.from_pretrained(merged_base, paths[names[0]]).merge_and_unload().eval()

    prompts = [CORPUS[i % len(CORPUS)][: 24 + 7 * (i % 5)] for i in range(args.requests)]  # ragged: left padding
    row_adapter = [names[i % len(names)] for i in range(args.requests)]
    k1 = [[(n, 1.0)] for n in row_adapter]
    k3 = [[(names[(i + j) % len(names)], w) for j, w in enumerate((0.5, 0.3, 0.2))] for i in range(args.requests)]
    homog = [[(names[0], 1.0)]] * args.requests
    n_new = args.new_tokens
    n_loop = min(args.peft_loop_requests or args.requests, args.requests)

    def fused_mode(routes):
        return lambda: [g.token_ids for g in generate(fused, tok, prompts, routes, max_new_tokens=n_new,
                                                      ignore_eos=True)]

    def peft_loop():
        out = []
        for p, a in zip(prompts[:n_loop], row_adapter):
            peft_model.set_adapter(a)
            out += hf_generate(peft_model, tok, [p], n_new)
        return out

    modes = {
        "bare": lambda: hf_generate(bare, tok, prompts, n_new),
        "mixed_k1": fused_mode(k1),
        "mixed_k3": fused_mode(k3),
        "homogeneous": fused_mode(homog),
        "merged": lambda: hf_generate(merged, tok, prompts, n_new),
        "peft_loop": peft_loop,
        "peft_adapter_names": lambda: hf_generate(peft_model, tok, prompts, n_new, adapter_names=row_adapter),
    }
    outputs, median_s, min_s, mem = run_interleaved(modes, args.repeats, PeakCuda if device.type == "cuda" else PeakRss)
    results = {}
    for mode in modes:
        assert all(len(t) == n_new for t in outputs[mode]), f"{mode}: not every row generated {n_new} tokens"
        rows = n_loop if mode == "peft_loop" else args.requests
        results[mode] = dict(tokens_per_s=rows * n_new / median_s[mode], seconds=median_s[mode],
                             best_tokens_per_s=rows * n_new / min_s[mode],
                             peak_mb=mem[mode].peak, extra_mb=mem[mode].extra)

    # correctness: logits of the mixed K=1 batch vs peft running each row's adapter alone
    ids = torch.randint(3, len(tok), (n_loop, 16), generator=torch.Generator().manual_seed(args.seed)).to(device)
    with torch.inference_mode():
        with fused.routing(k1[:n_loop]):
            got = fused(input_ids=ids).logits.float()
        diff = 0.0
        for b, a in enumerate(row_adapter[:n_loop]):
            peft_model.set_adapter(a)
            diff = max(diff, (got[b] - peft_model(input_ids=ids[b:b + 1]).logits[0].float()).abs().max().item())
    same = lambda a, b: (sum(x == y for x, y in zip(outputs[a], outputs[b]))  # noqa: E731
                         / min(len(outputs[a]), len(outputs[b])))

    tps = {m: r["tokens_per_s"] for m, r in results.items()}
    lora_path_mb = slot_bytes / 2**20 + max(0.0, results["mixed_k1"]["extra_mb"] - results["bare"]["extra_mb"])
    ratios = {
        "mixed_vs_bare": tps["mixed_k1"] / tps["bare"],
        "mixed_vs_homogeneous": tps["mixed_k1"] / tps["homogeneous"],
        "mixed_vs_merged": tps["mixed_k1"] / tps["merged"],
        "mixed_vs_peft_loop": tps["mixed_k1"] / tps["peft_loop"],
        "mixed_vs_peft_adapter_names": tps["mixed_k1"] / tps["peft_adapter_names"],
        "k3_vs_k1": tps["mixed_k3"] / tps["mixed_k1"],
        "lora_path_vs_adapter_bytes": lora_path_mb / (adapter_bytes / 2**20),
    }
    targets = {"mixed_vs_bare": 0.85, "k3_vs_k1": 0.7, "mixed_vs_peft_loop": 10.0}
    summary = {
        "base": base_name, "params_m": round(n_params / 1e6, 1), "device": str(device), "dtype": str(dtype),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "backend": type(fused.backend).__name__, "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "adapters": len(names), "rank": args.rank,
        "requests": args.requests, "new_tokens": n_new, "peft_loop_requests": n_loop, "repeats": args.repeats,
        "tokens_per_s": {m: round(v, 1) for m, v in tps.items()},
        "best_tokens_per_s": {m: round(r["best_tokens_per_s"], 1) for m, r in results.items()},
        "peak_mb": {m: round(r["peak_mb"], 1) for m, r in results.items()},
        "extra_mb": {m: round(r["extra_mb"], 1) for m, r in results.items()},
        "adapter_mb": round(adapter_bytes / 2**20, 1), "slot_mb": round(slot_bytes / 2**20, 1),
        "lora_path_mb": round(lora_path_mb, 1),
        **{k: round(v, 3) for k, v in ratios.items()},
        "targets_met": {k: ratios[k] >= v for k, v in targets.items()}
                       | {"lora_path_vs_adapter_bytes": ratios["lora_path_vs_adapter_bytes"] <= 1.10},
        "max_abs_diff_vs_peft": diff,
        "mixed_tokens_equal_peft_loop": same("mixed_k1", "peft_loop"),
        "mixed_tokens_equal_peft_adapter_names": same("mixed_k1", "peft_adapter_names"),
        "homogeneous_tokens_equal_merged": same("homogeneous", "merged"),
    }
    mem_name = "peak GPU MB" if device.type == "cuda" else "peak RSS MB"
    print(f"\nbase {base_name} ({n_params / 1e6:.0f}M) on {summary['gpu'] or device} in {dtype}, {len(names)} adapters "
          f"r={args.rank}, {args.requests} requests x {n_new} new tokens (peft_loop: {n_loop}), greedy, "
          f"median of {args.repeats} interleaved rounds")
    print(f"{'mode':<20} {'tok/s':>9} {'best tok/s':>11} {'seconds':>9} {'mixed_k1 is':>12} {mem_name:>12} "
          f"{'extra MB':>9}")
    for m, r in results.items():
        print(f"{m:<20} {r['tokens_per_s']:>9.1f} {r['best_tokens_per_s']:>11.1f} {r['seconds']:>9.3f} "
              f"{tps['mixed_k1'] / r['tokens_per_s']:>11.2f}x {r['peak_mb']:>12.1f} {r['extra_mb']:>9.1f}")
    print(f"LoRA path {lora_path_mb:.1f} MB (slots {slot_bytes / 2**20:.1f} + per-step) vs adapters "
          f"{adapter_bytes / 2**20:.1f} MB: {ratios['lora_path_vs_adapter_bytes']:.3f}x; targets met: "
          f"{summary['targets_met']}")
    print(json.dumps(summary))
    tmp.cleanup()
    return summary


if __name__ == "__main__":
    main()
