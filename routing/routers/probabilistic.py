"""Routers that score every catalog task with calibrated logits: classifier, lexical, their ensemble, selector.

Each trained artefact stores its label order (`labels.json`, exactly the catalog's task set) and
settings (`router.json`, including the calibration temperature T_cal fitted on held-out records).
From calibrated logits z the routers share one decision rule:

    p = softmax(z) over the pool (an excluded task gets p = 0, the rest renormalised)
    top-K tasks by p, weights w_i ∝ p_i ** (τ0 / τ),   τ0 = DEFAULT_TEMPERATURE

so at the default τ the weights are the calibrated probabilities renormalised over the top-K; a
smaller τ sharpens them towards top-1, a larger τ flattens them towards uniform. A decision's
`scores` are the pool probabilities p of the chosen tasks.
"""

from __future__ import annotations

import json
import math
from abc import abstractmethod
from pathlib import Path

import numpy as np

from ..catalog import LABELS_FILE, Catalog, CatalogError, router_labels
from ..decision import DEFAULT_TEMPERATURE, RouteDecision, RouteRequest
from .base import Router

SETTINGS_FILE = "router.json"


def read_artefact(path: Path, kind: str) -> tuple[list[str], dict]:
    """(labels, settings) of a trained artefact. The catalog checked its labels against its tasks on load."""
    try:
        labels = router_labels(path)
        settings = json.loads((path / SETTINGS_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CatalogError(f"{kind} {path}: unreadable artefact ({e})") from None
    if labels is None or not isinstance(settings, dict):
        raise CatalogError(f"{kind} {path}: unreadable artefact (needs {LABELS_FILE} and {SETTINGS_FILE}, an object)")
    return labels, settings


def write_artefact(out: Path, labels: list[str], settings: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LABELS_FILE).write_text(json.dumps(labels, indent=1))
    (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True))


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling (Guo et al., 2017): the T minimising held-out NLL of softmax(logits / T).

    When the model ranks every calibration record right, the NLL only falls as T -> 0: it has no
    minimum, and the records say nothing about how sure to be. T stays 1 then (the model's own
    probabilities) rather than going to one-hot ones, which would leave top-K fusion nothing to weigh.
    """
    z = logits.astype(np.float64)
    if (z.argmax(axis=1) == labels).all():
        return 1.0
    grid = np.exp(np.linspace(math.log(0.05), math.log(20.0), 241))
    best, best_nll = 1.0, math.inf
    for t in grid:
        nll = -float(np.mean(log_softmax(z / t)[np.arange(len(z)), labels]))
        if nll < best_nll:
            best, best_nll = float(t), nll
    return best


class ProbabilisticRouter(Router):
    """A router defined by calibrated logits over `self.labels`; see the module docstring."""

    labels: list[str]

    def __init__(self, catalog: Catalog, labels: list[str]):
        super().__init__(catalog)
        self.labels = labels
        self._position = {k: i for i, k in enumerate(labels)}

    @abstractmethod
    def logits(self, texts: list[str]) -> np.ndarray:
        """Calibrated logits (N, T) in `self.labels` order."""

    def probabilities(self, logits: np.ndarray, exclude: str | None) -> np.ndarray:
        """Calibrated probabilities over the pool: the excluded task (if the catalog has it) gets 0."""
        z = logits.astype(np.float64).copy()
        if exclude is not None and exclude in self._position:
            z[self._position[exclude]] = -np.inf
        if np.isnan(z).any() or not np.isfinite(z.max()):
            raise ValueError(f"the {self.name} router has no task left to route to" if z.max() == -np.inf
                             else f"the {self.name} router produced non-finite scores")
        z = np.exp(z - z.max())
        return z / z.sum()

    def decide(self, request: RouteRequest, logits: np.ndarray) -> RouteDecision:
        p = self.probabilities(logits, request.exclude)
        k = min(request.top_k, int((p > 0).sum()))
        top = np.argsort(-p, kind="stable")[:k]
        # w ∝ p^(τ0/τ): computed in log space so tiny probabilities do not underflow.
        logw = np.log(np.maximum(p[top], 1e-300)) * (DEFAULT_TEMPERATURE / request.temperature)
        w = np.exp(logw - logw.max())
        w /= w.sum()
        return self._decision([(self.labels[t], wt) for t, wt in zip(top, w)], [p[t] for t in top])

    def route(self, requests: list[RouteRequest]) -> list[RouteDecision]:
        if not requests:
            return []
        logits = self.logits([r.text for r in requests])
        return [self.decide(r, z) for r, z in zip(requests, logits)]
