"""The task index: one normalised centroid per task, searched with FAISS inner product.

A task's representation is the mean embedding of a few of its samples (LoRAuter §3.1), kept next to
the sample embeddings it came from so an index can be rebuilt, re-clustered or audited. Centroids
are re-normalised, so inner product is cosine similarity.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class TaskIndex:
    keys: list[str]            # task keys `domain/task`, position = task id
    centroids: np.ndarray      # (T, d) float32, unit rows
    embeddings: np.ndarray     # (N, d) float32: the samples the centroids were averaged from
    labels: np.ndarray         # (N,) int64 task id of each sample

    def __post_init__(self) -> None:
        if len(self.keys) != len(set(self.keys)):
            raise ValueError("task index has duplicate keys")
        if self.centroids.shape[0] != len(self.keys):
            raise ValueError(f"{self.centroids.shape[0]} centroids for {len(self.keys)} tasks")
        self._faiss = faiss.IndexFlatIP(self.centroids.shape[1])
        self._faiss.add(self.centroids)

    @classmethod
    def from_embeddings(cls, embeddings: np.ndarray, keys_per_row: list[str]) -> "TaskIndex":
        """Average the sample embeddings of each task (in sorted key order)."""
        if len(embeddings) != len(keys_per_row) or len(embeddings) == 0:
            raise ValueError("need one task key per embedding, and at least one embedding")
        keys = sorted(set(keys_per_row))
        position = {k: i for i, k in enumerate(keys)}
        labels = np.array([position[k] for k in keys_per_row], dtype=np.int64)
        emb = _normalise(embeddings)
        centroids = np.stack([emb[labels == i].mean(axis=0) for i in range(len(keys))])
        return cls(keys, _normalise(centroids), emb, labels)

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    def search(self, queries: np.ndarray, k: int, exclude: list[int | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k tasks per query: (scores (Q, k), task ids (Q, k)), best first.

        `exclude[q]` drops one task from query q's candidates (LoRAuter's out-of-domain regime,
        where a query's own task adapter is absent from the pool).
        """
        k = min(k, len(self.keys) - (1 if exclude else 0))
        if k < 1:
            raise ValueError("no task left to route to")
        q = _normalise(queries)
        extra = 1 if exclude else 0
        scores, ids = self._faiss.search(q, k + extra)
        if not exclude:
            return scores, ids
        out_s, out_i = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
        for row, drop in enumerate(exclude):
            keep = ids[row] != (-2 if drop is None else drop)
            out_s[row], out_i[row] = scores[row][keep][:k], ids[row][keep][:k]
        return out_s, out_i

    def save(self, path: Path) -> None:
        np.savez(path, keys=np.array(self.keys), centroids=self.centroids, embeddings=self.embeddings, labels=self.labels)

    @classmethod
    def load(cls, path: Path) -> "TaskIndex":
        with np.load(path, allow_pickle=False) as z:
            return cls([str(k) for k in z["keys"]], z["centroids"].astype(np.float32),
                       z["embeddings"].astype(np.float32), z["labels"].astype(np.int64))
