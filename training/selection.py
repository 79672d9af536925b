"""K-means representative selection: the training set of the selector (Adapters Selector, §3.3).

Per task, the inputs are embedded, clustered into k groups with FAISS K-means, and the sample
nearest each centroid is kept (Algorithm 1 and the text after it). Two centroids can share their
nearest sample, so fewer than k may survive; the paper's Figure 2 shows how many survive depends on
the distance measure (IP fewest, L2 most, COS between). The per-task selections are then balanced
to the same size and shuffled together.

    reps, report = select_representatives(load_records("data/"), per_task=500)
    write_jsonl(reps, "selection.jsonl")

Embeddings (`how`):
  encoder          the sentence encoder of `routing.encoder`, *without* the task-retrieval prefix
                   (see `embed_records`); L2-normalised.
  base-embeddings  the paper's way: the base LLM's input embedding matrix averaged over the tokens
                   of each text (no forward pass, no special tokens).
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path
from typing import Literal, Sequence

import faiss
import numpy as np

from routing.task_index import faiss_gpus, flat_index

from .records import Record, TextMode, group_by_task

Metric = Literal["l2", "ip", "cos"]
METRICS: tuple[Metric, ...] = ("l2", "ip", "cos")
EmbedHow = Literal["encoder", "base-embeddings"]
EMBED_HOWS: tuple[EmbedHow, ...] = ("encoder", "base-embeddings")


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)  # a zero row stays zero


def _unique_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact-duplicate rows collapsed: (index of each distinct row's first occurrence, ascending; its count)."""
    rows = np.ascontiguousarray(x).view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).ravel()
    _, first, counts = np.unique(rows, return_index=True, return_counts=True)
    order = np.argsort(first, kind="stable")
    return first[order], counts[order]


def kmeans_representatives(embeddings: np.ndarray, k: int, metric: Metric, seed: int = 0,
                           niter: int = 20) -> np.ndarray:
    """Indices of the samples nearest each of k K-means centroids, duplicates removed.

    Semantics (n rows, `metric` in l2 / ip / cos):
        x = rows (L2-normalised first for "cos"); distinct = x without exact-duplicate rows, each
            weighted by its multiplicity (identical to clustering x itself: duplicates pull a
            centroid exactly as hard, but can never both be kept)
        k = min(k, len(distinct))
        centroids = K-means(distinct, k, niter) assigning each point to
            l2:  argmin_j ||x - c_j||            (faiss.Kmeans)
            cos: argmax_j x·c_j, |c_j| = 1       (faiss.Kmeans(spherical=True))
            ip:  argmax_j x·c_j, c_j = plain mean (see below)
        for each centroid c_j, largest cluster first (ties: lower j):
            r = nearest distinct sample to c_j by the same measure (ties: lower index)
            keep r unless an earlier centroid kept it
        return the kept rows' indices into `embeddings` (first occurrence of a duplicated row)

    The result is ordered by the (weighted) size of the cluster each sample represents, so a prefix
    is the best smaller selection; `select_representatives` trims that way when balancing.

    "ip": faiss.Kmeans has no inner-product flag (`spherical` also normalises the centroids), but
    it assigns points through its `index`, and FAISS's Clustering maximises the objective when that
    index is an inner-product one. So IP here is the paper's Algorithm 1 with IP as the distance:
    assignment by max inner product, centroids the plain mean, the representative the sample with
    the largest inner product with its centroid. Large-norm samples win many centroids, which is
    why IP keeps the fewest samples (paper, Figure 2 and §5.1). On L2-normalised embeddings IP and
    COS pick by the same criterion.

    Initialisation is FAISS's k-means++ over the distinct rows. Its default, k rows drawn at
    random, often seeds two centroids in one true cluster and none in another, and Lloyd never
    recovers (8 well-separated blobs, k=8: 92 of 100 seeds miss a blob at random, 13 with
    k-means++); it costs a few Lloyd iterations. FAISS's sub-sampling (`max_points_per_centroid`,
    256 by default) is switched off: every distinct row takes part. Its "please provide at least"
    warning for small inputs is silenced (`min_points_per_centroid=1`): clustering 50 samples into
    40 groups is the point here. With faiss-gpu and a GPU, training, assignment and the nearest-sample
    search run there (`routing.task_index.flat_index`); the result matches the CPU run (a gpu test).
    """
    return _kmeans_representatives(embeddings, k, metric, seed, niter)[0]


def _kmeans_representatives(embeddings: np.ndarray, k: int, metric: Metric, seed: int,
                            niter: int) -> tuple[np.ndarray, int]:
    """`kmeans_representatives`, and the k it ran with (capped at the distinct rows)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if niter < 1:
        raise ValueError(f"niter must be at least 1, got {niter}")
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (n, d), got shape {x.shape}")
    n, d = x.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64), 0
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or inf")
    if metric == "cos":
        x = _normalise(x)

    first, counts = _unique_rows(x)
    distinct = np.ascontiguousarray(x[first])  # (m, d)
    m = len(distinct)
    k = min(k, m)
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=metric == "cos", verbose=False, gpu=faiss_gpus(),
                      max_points_per_centroid=max(m, 1), min_points_per_centroid=1,
                      init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS)
    if metric == "ip":
        km.index = flat_index(d, inner_product=True)
    km.train(distinct, weights=counts.astype(np.float32))
    centroids = km.centroids  # (k, d)

    _, assigned = km.assign(distinct)  # (m,)
    sizes = np.bincount(assigned, weights=counts, minlength=k)  # (k,)
    search = flat_index(d, inner_product=metric != "l2")
    search.add(distinct)
    _, nearest = search.search(centroids, 1)  # (k, 1) indices into distinct
    order = np.lexsort((np.arange(k), -sizes))  # largest cluster first, then lower centroid id

    kept, seen = [], set()
    for j in order:
        r = int(nearest[j, 0])
        if r >= 0 and r not in seen:
            seen.add(r)
            kept.append(int(first[r]))
    return np.asarray(kept, dtype=np.int64), k


def embed_records(records: Sequence[Record], how: EmbedHow, text_mode: TextMode = "input",
                  base_model_path: str | Path | None = None, *, encoder=None, batch_size: int = 64,
                  progress: bool = False) -> np.ndarray:
    """(N, dim) float32 embeddings of `record.text(text_mode)`, one row per record.

    "encoder": `routing.encoder` (MiniLM by default), L2-normalised, with an empty prefix unless an
    `encoder` is passed. The task-retrieval prefix is what routing queries and task indexes are
    embedded with; here the goal is the spread *within* one task, and a constant instruction
    prepended to every text only pulls its embeddings together (on the 12 TASA tasks the mean
    within-task cosine rises from 0.12-0.54 plain to 0.38-0.69 prefixed), so selection embeds the
    plain text.

    "base-embeddings": the input embedding matrix of the causal LM at `base_model_path`, averaged
    over each text's tokens (`add_special_tokens=False`: a BOS row would add a length-dependent
    constant to every mean). Computed with `embedding_bag(mode="mean")` on the flat token ids, in
    batches of `batch_size` texts, so nothing is padded and no layer runs. The model is loaded whole
    with `routing.base_models.load_causal_lm` (float32); only its embedding matrix is used.
    """
    if how not in EMBED_HOWS:
        raise ValueError(f"how must be one of {EMBED_HOWS}, got {how!r}")
    texts = [r.text(text_mode) for r in records]
    if how == "encoder":
        if encoder is None:
            from routing.encoder import shared_encoder

            encoder = shared_encoder(prefix="")
        return encoder.encode(texts, batch_size=batch_size, progress=progress)
    if base_model_path is None:
        raise ValueError("how='base-embeddings' needs base_model_path (a Hugging Face causal LM directory)")
    from routing.base_models import load_causal_lm

    model, tokenizer = load_causal_lm(base_model_path)
    return mean_token_embeddings(texts, model.get_input_embeddings().weight, tokenizer, batch_size, progress)


def mean_token_embeddings(texts: Sequence[str], weight, tokenizer, batch_size: int = 64,
                          progress: bool = False) -> np.ndarray:
    """(N, H) float32: row i = mean over the tokens t of texts[i] of weight[t] (zeros for a text with no tokens)."""
    import torch
    import torch.nn.functional as F

    out = np.zeros((len(texts), weight.shape[1]), dtype=np.float32)
    starts = range(0, len(texts), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="embedding (base embedding layer)", unit="batch", file=sys.stderr)
    with torch.no_grad():
        for s in starts:
            ids = tokenizer(list(texts[s:s + batch_size]), add_special_tokens=False)["input_ids"]
            lengths = torch.tensor([len(t) for t in ids])
            flat = torch.tensor([t for row in ids for t in row], dtype=torch.long)  # (sum of lengths,)
            offsets = torch.cumsum(lengths, 0) - lengths  # (B,) start of each text in flat
            means = F.embedding_bag(flat, weight, offsets, mode="mean")  # (B, H)
            out[s:s + len(ids)] = means.float().numpy()
    return out


def select_representatives(records: Sequence[Record], per_task: int, how: EmbedHow = "encoder",
                           metric: Metric = "cos", text_mode: TextMode = "input", seed: int = 0,
                           base_model_path: str | Path | None = None, progress: bool = True, *,
                           balance: bool = True, min_per_task: int | None = None, niter: int = 20,
                           encoder=None) -> tuple[list[Record], dict]:
    """The selector's training set: K-means representatives of every task, balanced and shuffled.

    Per task (`domain/task`): embed `record.text(text_mode)` (identical texts are embedded once, so
    they get identical rows and collapse; the first such record is the one kept), then
    `kmeans_representatives(k=per_task, metric, seed, niter)`.

    Balancing (paper §3.3: "ensuring an equal amount of data from each task"): every task is cut
    to the same count, the smallest number of survivors of any task, keeping the representatives
    of its largest clusters. Floor: a single short task (few records, many duplicate inputs, or an
    IP collapse) must not shrink every other task to a handful, which the paper found "fails to
    meet the training requirements of the selector" (§5.1). So the common count is never below
    `min_per_task` (default ceil(per_task / 2)); a task with fewer survivors than that keeps all it
    has and is reported as short. `min_per_task=0` is the paper's strict equality; `balance=False`
    keeps every survivor.

    The result is shuffled with `random.Random(seed)`: same inputs and seed, same order.

    Returns (records, report) with report[task_key] = {"records": rows in the task, "requested":
    per_task, "k": the k K-means ran with (per_task capped at the task's distinct embeddings),
    "survivors": distinct representatives, "kept": after balancing}.
    """
    if per_task < 1:
        raise ValueError(f"per_task must be at least 1, got {per_task}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if how not in EMBED_HOWS:
        raise ValueError(f"how must be one of {EMBED_HOWS}, got {how!r}")
    if how == "base-embeddings" and base_model_path is None:
        raise ValueError("how='base-embeddings' needs base_model_path (a Hugging Face causal LM directory)")
    if min_per_task is not None and min_per_task < 0:
        raise ValueError(f"min_per_task must be >= 0, got {min_per_task}")
    groups = group_by_task(records)
    if not groups:
        raise ValueError("no records to select from")
    floor = math.ceil(per_task / 2) if min_per_task is None else min_per_task

    # Embed every distinct text once, in one pass (one model load for base-embeddings).
    text_ids: dict[str, int] = {}
    firsts: list[Record] = []
    for rows in groups.values():
        for r in rows:
            if r.text(text_mode) not in text_ids:
                text_ids[r.text(text_mode)] = len(firsts)
                firsts.append(r)
    if progress:
        print(f"[select] embedding {len(firsts)} distinct texts of {sum(map(len, groups.values()))} records "
              f"({how}), {len(groups)} tasks", file=sys.stderr, flush=True)
    emb = embed_records(firsts, how, text_mode, base_model_path, encoder=encoder,
                        progress=progress and len(firsts) > 1000)  # (distinct texts, dim)

    survivors: dict[str, list[Record]] = {}
    report: dict[str, dict] = {}
    for key, rows in groups.items():
        x = emb[[text_ids[r.text(text_mode)] for r in rows]]  # (len(rows), dim), duplicates identical
        kept, k = _kmeans_representatives(x, per_task, metric, seed, niter)
        survivors[key] = [rows[i] for i in kept]
        report[key] = {"records": len(rows), "requested": per_task, "k": k, "survivors": len(kept), "kept": len(kept)}

    fewest = min(len(s) for s in survivors.values())
    cap = max(fewest, floor) if balance else per_task
    selected: list[Record] = []
    for key, reps in survivors.items():
        selected += reps[:cap]
        report[key]["kept"] = min(len(reps), cap)
    if progress:
        for key, r in report.items():
            short = "  (short: below the balanced count)" if balance and r["kept"] < cap else ""
            print(f"[select] {key}: {r['records']} records, k={r['k']}, {r['survivors']} survivors, "
                  f"{r['kept']} kept{short}", file=sys.stderr, flush=True)
    random.Random(seed).shuffle(selected)
    return selected, report
