"""Loading a base causal LM from a Hugging Face directory, and naming it.

Everything downstream (adapter training, catalogs, the Generator) sees a base model only as a local
Hugging Face directory; `training.base_model` turns `tiny` / `smollm2` into such a directory.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def cache_root() -> Path:
    """Where built base models (and other reusable artefacts) live: `$SWITCHBOARD_HOME` or ~/.cache/switchboard."""
    home = os.environ.get("SWITCHBOARD_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "switchboard"


def locate_base_model(model_id: str, override: str | Path | None = None) -> Path:
    """The directory of the base model a catalog names, checked against its id.

    `override` is an explicit directory; otherwise the model is looked up in the cache, where
    `training.base_model` writes `tiny` and `smollm2` under the name their id starts with. Only the
    content hash must match: the same model mounted under another directory name (a k8s volume) is it.
    """
    name, digest = model_id.split("@", 1) if "@" in model_id else (model_id, "")
    path = Path(override) if override else cache_root() / "base" / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"base model {model_id} not found at {path}; build it "
                                f"(`switchboard demo` / `--base-model`) or pass its directory")
    found = base_model_id(path)
    if found.split("@", 1)[1] != digest:
        raise ValueError(f"{path} is base model {found}, but the catalog's adapters were trained on {model_id}")
    return path


def base_model_id(path: str | Path) -> str:
    """A short, stable identity for a base model directory: `<name>@<hash>`.

    Hashes `config.json` and the names and sizes of the weight files rather than the weights
    themselves, so it costs nothing for an 8B model yet changes whenever the model does. Adapters
    record it at training time and catalogs refuse adapters trained on another base.
    """
    p = Path(path).resolve()
    config = p / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{p} is not a Hugging Face model directory (no config.json)")
    h = hashlib.sha256(config.read_bytes())
    for f in sorted(p.iterdir()):
        if f.suffix in WEIGHT_SUFFIXES:
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return f"{p.name}@{h.hexdigest()[:12]}"


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Tokenizer set up for batched generation: left padding, and a pad token (EOS when missing)."""
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer in eval mode, in `dtype` on `device`.

    Off the CPU the weights are loaded straight onto the device (`device_map`), one tensor at a
    time, so neither host nor device ever holds a second full copy of the base model.
    """
    device = torch.device(device)
    if device.type == "cpu":
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map={"": device})
    model.eval()
    return model, load_tokenizer(path)
