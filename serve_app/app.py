"""`build_app`: the Serve application, as named by `import_path` in the Serve config YAML."""

from __future__ import annotations

from ray.serve import Application

from routing.catalog import Catalog
from routing.routers import AUTO, ROUTERS, carries

from .config import AppArgs
from .embedder import Embedder
from .generator import Generator
from .ingress import Ingress
from .router import RouterDeployment
from .selector import Selector


def build_app(args: dict) -> Application:
    """Ingress -> Router (-> Embedder) and Ingress -> Generator, each its own deployment and replicas."""
    cfg = AppArgs(**args).model_dump()  # bad args fail the build, before any replica starts
    catalog = Catalog.load(cfg["catalog"], verify=False)
    default = cfg["default_router"]
    if default != AUTO and (default not in ROUTERS or default == "fixed" or not carries(catalog, default)):
        raise ValueError(f"default_router {default!r}: not a router catalog {catalog.version} carries "
                         f"(fixed needs a task per request; auto picks the best carried)")
    has_selector = "selector" in catalog.routers
    router = RouterDeployment.options(name="Router").bind(cfg, Embedder.bind(cfg),
                                                         Selector.bind(cfg) if has_selector else None)
    return Ingress.bind(cfg, router, Generator.bind(cfg))
