"""Pseudo-tasks for unlabelled validation pools (LoRAuter §4.4): K-means clusters stand in for tasks."""

from __future__ import annotations

import faiss
import numpy as np

from .task_index import TaskIndex, normalise


def pseudo_task_index(embeddings: np.ndarray, k: int, seed: int = 0, niter: int = 25) -> TaskIndex:
    """Cluster normalised embeddings (spherical K-means) into at most `k` pseudo-tasks `pseudo/cNN`
    (a cluster left empty, e.g. by duplicate embeddings, names no task)."""
    x = normalise(embeddings)
    if not 1 <= k <= len(x):
        raise ValueError(f"need 1 <= k <= {len(x)} pseudo-tasks, got {k}")
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False)
    km.train(x)
    _, assign = km.index.search(x, 1)
    width = len(str(k - 1))
    return TaskIndex.from_embeddings(x, [f"pseudo/c{int(a):0{width}d}" for a in assign[:, 0]])
