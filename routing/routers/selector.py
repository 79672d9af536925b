from __future__ import annotations

import numpy as np

from ..catalog import Catalog
from ..devices import Placement
from ..selector_model import SelectorModel
from .probabilistic import ProbabilisticRouter


class SelectorRouter(ProbabilisticRouter):
    """Adapters Selector: a LoRA selector LM scores every catalog task label.

    Its logits are the per-label log-likelihoods, so softmax over the pool is the model's own
    distribution over tasks (no temperature is fitted: T_cal = 1), and the top-K / τ rule is the
    one every probabilistic router shares.
    """

    name = "selector"
    artefacts = ("selector",)

    def __init__(self, catalog: Catalog, model: SelectorModel | None = None, placement: Placement | None = None):
        # CatalogError when the catalog has none; `placement` (default CPU float32) only when loading here
        model = model or SelectorModel(catalog.router_path(self.name), placement=placement)
        super().__init__(catalog, model.labels)
        self.model = model

    def logits(self, texts: list[str]) -> np.ndarray:
        return self.model.log_likelihoods(texts).numpy()
