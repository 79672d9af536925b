from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from ..catalog import Catalog
from ..decision import RouteDecision, RouteRequest


class Router(ABC):
    name: ClassVar[str]
    needs_embedding: ClassVar[bool] = False  # True: requests must carry `embedding` (the Embedder fills it)
    artefacts: ClassVar[tuple[str, ...]] = ()  # trained artefacts (`catalog.routers` names) it needs

    def __init__(self, catalog: Catalog):
        self.catalog = catalog

    @abstractmethod
    def route(self, requests: list[RouteRequest]) -> list[RouteDecision]:
        """One decision per request, in order. Batched because every real router is faster that way."""

    def _decision(self, tasks: list[tuple[str, float]], scores: list[float]) -> RouteDecision:
        return RouteDecision(tuple((k, float(w)) for k, w in tasks), self.name, self.catalog.version,
                             tuple(float(s) for s in scores))
