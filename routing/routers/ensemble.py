from __future__ import annotations

import numpy as np

from ..catalog import Catalog
from .classifier import ClassifierRouter
from .lexical import LexicalRouter
from .probabilistic import ProbabilisticRouter, log_softmax


class EnsembleRouter(ProbabilisticRouter):
    """The classifier and the lexical router together: the sum of their calibrated log-probabilities.

    A product of two experts that fail differently: the fine-tuned encoder generalises by meaning
    (it keeps the domain when the query's task is out of the pool), the n-gram model by surface
    form (template phrases, formats). Equal weights; on the dev splits they beat either alone on
    every in-pool column (bench/RESULTS.md).
    """

    name = "ensemble"
    artefacts = ("classifier", "lexical")

    def __init__(self, catalog: Catalog, members: tuple[ProbabilisticRouter, ...] | None = None):
        """`members`: the catalog's classifier and lexical routers when the caller has them loaded already."""
        self.members = members or (ClassifierRouter(catalog), LexicalRouter(catalog))
        super().__init__(catalog, catalog.keys)
        # Each member's columns in this router's label order, found once rather than per batch.
        self._orders = [[member.labels.index(k) for k in self.labels] for member in self.members]

    def logits(self, texts: list[str]) -> np.ndarray:
        total = np.zeros((len(texts), len(self.labels)))
        for member, order in zip(self.members, self._orders):
            total += log_softmax(member.logits(texts))[:, order]
        return total
