from __future__ import annotations

import numpy as np

from ..calibration import CALIBRATION_KEY
from ..decision import DEFAULT_TEMPERATURE, RouteDecision, RouteRequest, softmax
from .base import Router


class CentroidRouter(Router):
    """LoRAuter: cosine of the query to each task centroid, top-K, softmax with temperature τ.

    On a calibrated catalog (`routing.calibration`) the softmax temperature is T_cal · τ / τ0, so the
    default τ = τ0 weighs by calibrated probabilities; on an uncalibrated one it is τ itself (the paper).
    """

    name = "centroid"
    needs_embedding = True

    def route(self, requests: list[RouteRequest]) -> list[RouteDecision]:
        if not requests:
            return []
        if any(r.embedding is None for r in requests):
            raise ValueError("centroid routing needs request embeddings")
        index = self.catalog.index
        position = {k: i for i, k in enumerate(index.keys)}
        queries = np.stack([r.embedding for r in requests])
        k = max(r.top_k for r in requests)
        exclude = [position.get(r.exclude) for r in requests] if any(r.exclude for r in requests) else None
        t_cal = self.catalog.calibration.get(CALIBRATION_KEY)
        out = []
        for r, (s, i) in zip(requests, index.search(queries, k, exclude)):
            s, i = s[: r.top_k], i[: r.top_k]
            weights = softmax(s, r.temperature if t_cal is None else t_cal * r.temperature / DEFAULT_TEMPERATURE)
            out.append(self._decision([(index.keys[t], w) for t, w in zip(i, weights)], list(s)))
        return out
