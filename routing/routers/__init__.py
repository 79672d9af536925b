"""Routers: each turns a batch of `RouteRequest`s into `RouteDecision`s over one catalog's tasks.

One file per router, registered by name in `ROUTERS`; `make_router` is the only constructor callers use.
"""

from __future__ import annotations

from ..catalog import Catalog
from .base import Router, UnknownTaskError
from .centroid import CentroidRouter
from .classifier import ClassifierRouter
from .ensemble import EnsembleRouter
from .fixed import FixedRouter
from .lexical import LexicalRouter
from .selector import SelectorRouter

ROUTERS: dict[str, type[Router]] = {
    r.name: r for r in (CentroidRouter, FixedRouter, ClassifierRouter, LexicalRouter, EnsembleRouter, SelectorRouter)}


AUTO = "auto"
# `auto`, best first, as bench/RESULTS.md ranks them on the real data: the ensemble beats its two
# members, each of which beats the training-free centroid router; the selector is not in the list
# (a whole LM per request, and weaker on real data).
AUTO_PREFERENCE = ("ensemble", "classifier", "lexical", "centroid")


def best_router(catalog: Catalog) -> str:
    """What `auto` means for this catalog: the first of `AUTO_PREFERENCE` whose artefacts it carries."""
    return next(n for n in AUTO_PREFERENCE if all(a in catalog.routers for a in ROUTERS[n].artefacts))


def make_router(name: str, catalog: Catalog) -> Router:
    """The router `name` over `catalog`; `auto` picks the best one the catalog carries."""
    if name == AUTO:
        name = best_router(catalog)
    try:
        cls = ROUTERS[name]
    except KeyError:
        raise ValueError(f"unknown router {name!r}; known: {sorted([AUTO, *ROUTERS])}") from None
    return cls(catalog)


__all__ = ["AUTO", "ROUTERS", "Router", "UnknownTaskError", "best_router", "make_router"]
