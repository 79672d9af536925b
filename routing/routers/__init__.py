"""Routers: each turns a batch of `RouteRequest`s into `RouteDecision`s over one catalog's tasks.

One file per router, registered by name in `ROUTERS`; `make_router` is the only constructor callers use.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..catalog import Catalog
from ..decision import UnknownTaskError
from .base import Router
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


def carries(catalog: Catalog, name: str) -> bool:
    """Whether `catalog` has every trained artefact router `name` needs."""
    return all(a in catalog.routers for a in ROUTERS[name].artefacts)


def best_router(catalog: Catalog) -> str:
    """What `auto` means for this catalog: the first of `AUTO_PREFERENCE` whose artefacts it carries."""
    return next(n for n in AUTO_PREFERENCE if carries(catalog, n))


def make_router(name: str, catalog: Catalog) -> Router:
    """The router `name` over `catalog`; `auto` picks the best one the catalog carries."""
    if name == AUTO:
        name = best_router(catalog)
    try:
        cls = ROUTERS[name]
    except KeyError:
        raise ValueError(f"unknown router {name!r}; known: {sorted([AUTO, *ROUTERS])}") from None
    return cls(catalog)


def make_routers(catalog: Catalog, names: Iterable[str] = ROUTERS) -> dict[str, Router]:
    """Every router of `names` the catalog carries, and `auto`; the ensemble reuses its loaded members
    (its artefact names are its members' router names) rather than loading the encoder twice."""
    routers: dict[str, Router] = {}
    for name in names:
        if not carries(catalog, name):
            continue
        if ROUTERS[name] is EnsembleRouter and all(m in routers for m in EnsembleRouter.artefacts):
            routers[name] = EnsembleRouter(catalog, tuple(routers[m] for m in EnsembleRouter.artefacts))
        else:
            routers[name] = ROUTERS[name](catalog)
    routers[AUTO] = routers[best_router(catalog)]
    return routers


__all__ = ["AUTO", "ROUTERS", "Router", "UnknownTaskError", "best_router", "carries", "make_router", "make_routers"]
