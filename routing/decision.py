"""What a router is asked, and what it answers."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# K=1 measures best on the demo: calibrated K=3 gives the same answers at 0.92x the generation speed, and
# LoRAuter's raw τ=0.2 at K=3 loses 30 points on MiniLM (README, "Against the papers"; bench/fusion_answers.py).
DEFAULT_TOP_K = 1
# LoRAuter's τ. On a calibrated catalog the centroid router reads it relative to this value (τ = 0.2 gives
# calibrated probabilities, routing.calibration), as the trained routers do; uncalibrated, it is applied
# to raw cosines, the paper's rule.
DEFAULT_TEMPERATURE = 0.2
# τ outside this range is argmax or uniform in all but name, and near 0 or infinity it is arithmetic
# trouble (a float32 denormal τ overflows the scaled scores); such requests are refused.
TEMPERATURE_RANGE = (1e-3, 1e3)
MAX_TOP_K = 8


class UnknownTaskError(KeyError):
    """A request named a task the catalog does not have (gRPC NOT_FOUND)."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class RouteRequest:
    text: str
    top_k: int = DEFAULT_TOP_K
    temperature: float = DEFAULT_TEMPERATURE
    task: str | None = None                 # the `fixed` router's answer
    exclude: str | None = None              # a task key to leave out of the pool (OOD evaluation)
    embedding: np.ndarray | None = field(default=None, compare=False)  # filled by the Embedder

    def __post_init__(self) -> None:
        if not self.text.strip():
            raise ValueError("text is empty")
        if not 1 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be in 1..{MAX_TOP_K}, got {self.top_k}")
        low, high = TEMPERATURE_RANGE
        if not low <= self.temperature <= high:   # NaN fails too
            raise ValueError(f"temperature must be in [{low:g}, {high:g}], got {self.temperature}")


@dataclass(frozen=True)
class RouteDecision:
    """Weighted tasks (weights sum to 1, best first); served as a K-way adapter fusion."""

    tasks: tuple[tuple[str, float], ...]
    router: str
    catalog_version: str
    scores: tuple[float, ...] = ()          # the router's raw scores for `tasks`, same order

    @property
    def top(self) -> str:
        return self.tasks[0][0]

    def to_dict(self) -> dict:
        return {"tasks": [{"task": k, "weight": w} for k, w in self.tasks], "router": self.router,
                "catalog_version": self.catalog_version, "scores": list(self.scores)}


def softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(scores / τ), shifted before the division so the best score maps to exp(0) whatever τ is."""
    z = np.asarray(scores, dtype=np.float64)
    z = np.exp((z - z.max(axis=-1, keepdims=True)) / temperature)
    return z / z.sum(axis=-1, keepdims=True)
