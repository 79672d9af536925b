from __future__ import annotations

import torch

from ..catalog import Catalog, CatalogError
from ..decision import RouteDecision, RouteRequest
from ..selector_model import SelectorModel
from .base import Router


class SelectorRouter(Router):
    """Adapters Selector: a LoRA selector LM scores every catalog task label; top-K, softmax with τ.

    Scores are per-label log-likelihoods, so τ = 1 is the model's own distribution over tasks.
    """

    name = "selector"
    artefacts = ("selector",)

    def __init__(self, catalog: Catalog, model: SelectorModel | None = None):
        super().__init__(catalog)
        self.model = model or SelectorModel(catalog.router_path(self.name))
        if self.model.labels != catalog.keys:
            raise CatalogError(f"selector was trained on tasks {self.model.labels}, the catalog has {catalog.keys}")

    def route(self, requests: list[RouteRequest]) -> list[RouteDecision]:
        if not requests:
            return []
        scores = self.model.log_likelihoods([r.text for r in requests])        # (B, L)
        out = []
        for r, s in zip(requests, scores):
            if r.exclude in self.catalog.tasks:
                s = s.clone()
                s[self.catalog.keys.index(r.exclude)] = float("-inf")
            top = torch.topk(s, min(r.top_k, len(s) - (r.exclude is not None)))
            weights = torch.softmax(top.values / r.temperature, -1)
            out.append(self._decision([(self.catalog.keys[i], w) for i, w in zip(top.indices.tolist(), weights.tolist())],
                                      top.values.tolist()))
        return out
