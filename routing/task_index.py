"""The task index: one normalised centroid per task, searched with FAISS inner product (on the GPU
when FAISS has one: the `gpu` extra installs faiss-gpu).

A task's representation is the mean embedding of a few of its samples (LoRAuter §3.1), kept next to
the sample embeddings it came from so an index can be rebuilt, re-clustered or audited. Centroids
are re-normalised, so inner product is cosine similarity.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np


def faiss_gpus() -> int:
    """GPUs FAISS can use: 0 with faiss-cpu, whose builds may lack `get_num_gpus` altogether."""
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return int(get_num_gpus()) if get_num_gpus is not None else 0


def flat_index(dim: int, inner_product: bool) -> faiss.Index:
    """An exact (flat) inner-product or L2 index, on every GPU FAISS sees when there is one.

    Flat search is exact on either device: GPU answers equal the CPU index's up to float rounding.
    """
    index = faiss.IndexFlatIP(dim) if inner_product else faiss.IndexFlatL2(dim)
    return faiss.index_cpu_to_all_gpus(index) if faiss_gpus() else index


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class TaskIndexError(ValueError):
    """Arrays that do not make a task index (the message says which and why)."""


@dataclass
class TaskIndex:
    keys: list[str]            # task keys `domain/task`, position = task id
    centroids: np.ndarray      # (T, d) float32, unit rows
    embeddings: np.ndarray     # (N, d) float32: the samples the centroids were averaged from
    labels: np.ndarray         # (N,) int64 task id of each sample

    def __post_init__(self) -> None:
        if len(self.keys) != len(set(self.keys)):
            raise TaskIndexError("task index has duplicate keys")
        if self.centroids.ndim != 2 or self.centroids.shape[0] != len(self.keys):
            raise TaskIndexError(f"centroids of shape {self.centroids.shape} for {len(self.keys)} tasks")
        if self.embeddings.ndim != 2 or self.embeddings.shape[1] != self.centroids.shape[1]:
            raise TaskIndexError(f"sample embeddings of shape {self.embeddings.shape} beside "
                                 f"{self.centroids.shape[1]}-dimensional centroids")
        in_range = np.all((self.labels >= 0) & (self.labels < len(self.keys)))
        if self.labels.shape != (len(self.embeddings),) or not in_range:
            raise TaskIndexError(f"{self.labels.shape} sample labels for {len(self.embeddings)} samples "
                                 f"(each a task id below {len(self.keys)})")
        self._faiss = flat_index(self.centroids.shape[1], inner_product=True)
        self._faiss.add(self.centroids)

    @classmethod
    def from_embeddings(cls, embeddings: np.ndarray, keys_per_row: list[str]) -> "TaskIndex":
        """Average the sample embeddings of each task (in sorted key order)."""
        if len(embeddings) != len(keys_per_row) or len(embeddings) == 0:
            raise ValueError("need one task key per embedding, and at least one embedding")
        keys = sorted(set(keys_per_row))
        position = {k: i for i, k in enumerate(keys)}
        labels = np.array([position[k] for k in keys_per_row], dtype=np.int64)
        emb = normalise(embeddings)
        centroids = np.stack([emb[labels == i].mean(axis=0) for i in range(len(keys))])
        return cls(keys, normalise(centroids), emb, labels)

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    def search(self, queries: np.ndarray, k: int,
               exclude: list[int | None] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query, its top-k tasks as (scores, task ids), best first.

        `exclude[q]` drops task id `exclude[q]` from query q's candidates (LoRAuter's out-of-domain
        regime, where a query's own task adapter is absent from the pool); such a row gets at most
        T - 1 tasks, the others up to T.
        """
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"query embeddings of shape {queries.shape}; this index takes (n, {self.dim})")
        drops = exclude if exclude is not None else [None] * len(queries)
        if len(drops) != len(queries) or k < 1:
            raise ValueError(f"need k >= 1 (got {k}) and one exclusion (or None) per query")
        scores, ids = self._faiss.search(normalise(queries), min(k + 1, len(self.keys)))
        out = []
        for s, i, drop in zip(scores, ids, drops):
            keep = i != drop if drop is not None else np.ones(len(i), bool)
            if not keep.any():
                raise ValueError("no task left to route to")
            out.append((s[keep][:k], i[keep][:k]))
        return out

    def save(self, path: Path) -> None:
        np.savez(path, keys=np.array(self.keys), centroids=self.centroids, embeddings=self.embeddings, labels=self.labels)

    @classmethod
    def load(cls, path: Path) -> "TaskIndex":
        with np.load(path, allow_pickle=False) as z:
            return cls([str(k) for k in z["keys"]], z["centroids"].astype(np.float32),
                       z["embeddings"].astype(np.float32), z["labels"].astype(np.int64))
