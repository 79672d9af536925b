"""Routers: each turns a batch of `RouteRequest`s into `RouteDecision`s over one catalog's tasks.

One file per router, registered by name in `ROUTERS`; `make_router` is the only constructor callers use.
"""

from __future__ import annotations

from ..catalog import Catalog
from .base import Router, UnknownTaskError
from .centroid import CentroidRouter
from .classifier import ClassifierRouter
from .fixed import FixedRouter
from .selector import SelectorRouter

ROUTERS: dict[str, type[Router]] = {
    r.name: r for r in (CentroidRouter, FixedRouter, ClassifierRouter, SelectorRouter)}


def make_router(name: str, catalog: Catalog) -> Router:
    try:
        cls = ROUTERS[name]
    except KeyError:
        raise ValueError(f"unknown router {name!r}; known: {sorted(ROUTERS)}") from None
    return cls(catalog)


__all__ = ["ROUTERS", "Router", "UnknownTaskError", "make_router"]
