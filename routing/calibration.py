"""τ for the centroid router, calibrated to the encoder and the catalog (LoRAuter §3.3, issue 20).

LoRAuter turns cosine similarities into fusion weights with softmax(s / τ), τ = 0.2, a value that fits
its SupCon-trained encoder (trained with a temperature-scaled softmax over cosines). MiniLM's cosines
between tasks differ by a few hundredths, so at τ = 0.2 three fused adapters get near-equal weight
and wrong ones dilute the right one. Here the temperature is fitted to the catalog instead:

    T_cal = argmin_T  mean NLL of softmax(cos(x, c_t) / T) at x's own task, over the index samples,

with leave-one-out centroids (a sample's own task centroid is recomputed without it, so the fit sees
what an unseen query sees, not a sample inside its own mean). Temperature scaling (Guo et al., 2017)
makes softmax(s / T_cal) a calibrated probability. Requests then keep τ's meaning relative to the
paper's default: the centroid router weighs with softmax(s / (T_cal · τ / τ0)), τ0 = 0.2, so the
default τ gives the calibrated probabilities, a smaller τ sharpens, a larger τ flattens, like every
trained router here. A catalog without `T_cal` (built with `--no-calibrate`, or before it existed)
applies τ to cosines as the paper does.

When every sample is nearest its own task even left out, the NLL falls all the way to T → 0 and the
grid's lower end wins: the validation data say the router is never wrong, so fusion weighs the top task
almost alone (fusion cannot hurt, and cannot help either, on such a catalog).
"""

from __future__ import annotations

import math

import numpy as np

from .task_index import TaskIndex, normalise

GRID = np.exp(np.linspace(math.log(1e-3), math.log(1.0), 301))   # within decision.TEMPERATURE_RANGE
CALIBRATION_KEY = "centroid_temperature"


def leave_one_out_scores(index: TaskIndex) -> np.ndarray:
    """(N, T) cosine of every index sample to every task centroid, its own task's centroid without it.
    A task with one sample has no centroid left without it: that row scores its own task at -1."""
    emb = normalise(index.embeddings.astype(np.float64))
    n_tasks = len(index.keys)
    sums = np.zeros((n_tasks, emb.shape[1]))
    np.add.at(sums, index.labels, emb)
    counts = np.bincount(index.labels, minlength=n_tasks)
    scores = emb @ normalise(sums).T
    own = sums[index.labels] - emb
    alone = counts[index.labels] == 1
    own_cos = np.einsum("nd,nd->n", emb, normalise(own))
    scores[np.arange(len(emb)), index.labels] = np.where(alone, -1.0, own_cos)
    return scores


def fit_centroid_temperature(index: TaskIndex) -> float:
    """T_cal for `index` (see the module docstring); 1.0 for a one-task catalog (nothing to weigh)."""
    if len(index.keys) < 2:
        return 1.0
    z = leave_one_out_scores(index)
    rows = np.arange(len(z))
    best, best_nll = float(GRID[-1]), math.inf
    for t in GRID:
        s = z / t
        s = s - s.max(axis=1, keepdims=True)
        nll = float(np.mean(np.log(np.exp(s).sum(axis=1)) - s[rows, index.labels]))
        if nll < best_nll - 1e-12:
            best, best_nll = float(t), nll
    return best


def calibrate(index: TaskIndex, enabled: bool = True) -> dict[str, float]:
    """The catalog's `calibration` record for `index`: {CALIBRATION_KEY: T_cal}, or {} when not enabled."""
    return {CALIBRATION_KEY: round(fit_centroid_temperature(index), 6)} if enabled else {}
