"""The embedded base models: tiny-test builds, loads like any HF model and is cached; smollm2 converts."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from routing.base_models import base_model_id, load_causal_lm, locate_base_model
from training.base_model import TINY, TINY_TEST, TinyConfig, build_tiny, cache_root, resolve_base_model


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """The base-model cache: the session's temp SWITCHBOARD_HOME when conftest set one, else our own
    temp dir: either way tiny-test is built once per session."""
    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("SWITCHBOARD_HOME"):
            mp.setenv("SWITCHBOARD_HOME", str(tmp_path_factory.getbasetemp() / "switchboard-home"))
        yield cache_root()


@pytest.fixture(scope="module")
def tiny(home):
    return build_tiny(TINY_TEST, progress=False)


def test_cache_root_follows_the_environment(home, monkeypatch):
    assert cache_root() == home == Path(os.environ["SWITCHBOARD_HOME"])
    monkeypatch.delenv("SWITCHBOARD_HOME")
    assert cache_root().parts[-2:] == (".cache", "switchboard")


def test_tiny_test_builds_into_the_cache_and_loads(tiny, home):
    assert tiny.parent == home / "base" and tiny.name == f"tiny-{TINY_TEST.digest()}"
    assert (tiny / "model.safetensors").is_file() and (tiny / "tokenizer.json").is_file()
    assert not [p for p in tiny.parent.iterdir() if ".partial-" in p.name]  # nothing half-built left
    model, tok = load_causal_lm(tiny)
    assert model.config.model_type == "llama" and model.config.hidden_size == TINY_TEST.hidden_size
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names
    assert tok.tokenize("2024") == ["2", "0", "2", "4"]  # digits one by one
    assert tok.bos_token and tok.eos_token and tok.pad_token and tok.unk_token
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    ids = tok("Quote: Sunvale Solar (SUNV) last 12.50, volume 3.1M.", return_tensors="pt")
    assert ids.input_ids[0, 0].item() == tok.bos_token_id
    assert tok.decode(ids.input_ids[0], skip_special_tokens=True) == "Quote: Sunvale Solar (SUNV) last 12.50, volume 3.1M."
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids.input_ids.shape[1], len(tok)) and torch.isfinite(logits).all()


def _stamps(path: Path) -> dict[str, int]:
    """Each file's modification time: a rebuild rewrites them, a cache hit leaves them alone."""
    return {f.name: f.stat().st_mtime_ns for f in path.iterdir()}


def test_second_build_is_cached(tiny):
    before, stamps = base_model_id(tiny), _stamps(tiny)
    assert build_tiny(TINY_TEST, progress=False) == tiny
    assert resolve_base_model("tiny-test", progress=False) == tiny
    assert _stamps(tiny) == stamps and base_model_id(tiny) == before


def test_config_digest_and_validation():
    assert TINY.digest() != TINY_TEST.digest()
    assert TinyConfig(seed=1).digest() != TinyConfig().digest()
    with pytest.raises(ValueError, match="divisible"):
        TinyConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="seq_len"):
        TinyConfig(seq_len=512, max_position_embeddings=256)


def test_resolve_base_model_paths_and_errors(tiny, tmp_path):
    assert resolve_base_model(str(tiny)) == tiny.resolve()
    mounted = shutil.copytree(tiny, tmp_path / "mounted-elsewhere")   # same bytes, another directory name
    assert locate_base_model(base_model_id(tiny), mounted) == mounted
    (mounted / "config.json").write_text((mounted / "config.json").read_text() + "\n")   # another model now
    with pytest.raises(ValueError, match="trained on tiny-"):
        locate_base_model(base_model_id(tiny), mounted)
    with pytest.raises(ValueError, match="tiny, tiny-test, smollm2"):
        resolve_base_model("gpt-17")
    with pytest.raises(ValueError, match="without config.json"):
        resolve_base_model(str(tmp_path))


@pytest.mark.slow
def test_smollm2_converts_and_runs(home):
    path = resolve_base_model("smollm2", progress=False)
    assert (path / "config.json").is_file() and list(path.glob("*.safetensors"))
    assert not list(path.glob("*.gguf"))
    model, tok = load_causal_lm(path)
    assert model.dtype == torch.float32 and getattr(model.config, "quantization_config", None) is None
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1]:])
    stamps = _stamps(path)
    assert resolve_base_model("smollm2", progress=False) == path   # converted once: the files are reused
    assert _stamps(path) == stamps
