from __future__ import annotations

from ..decision import RouteDecision, RouteRequest, UnknownTaskError
from .base import Router


class FixedRouter(Router):
    """The caller names the task; the router only checks that the catalog has it."""

    name = "fixed"

    def route(self, requests: list[RouteRequest]) -> list[RouteDecision]:
        out = []
        for r in requests:
            if r.task not in self.catalog.tasks:
                raise UnknownTaskError(f"unknown task {r.task!r}; the catalog has {self.catalog.keys}")
            out.append(self._decision([(r.task, 1.0)], [1.0]))
        return out
