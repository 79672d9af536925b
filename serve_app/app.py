"""`build_app`: the Serve application, as named by `import_path` in the Serve config YAML."""

from __future__ import annotations

from ray.serve import Application

from routing.catalog import Catalog

from .config import AppArgs
from .embedder import Embedder
from .generator import Generator
from .ingress import Ingress
from .router import RouterDeployment
from .selector import Selector


def build_app(args: dict) -> Application:
    """Ingress -> Router (-> Embedder) and Ingress -> Generator, each its own deployment and replicas."""
    cfg = AppArgs(**args).model_dump()  # bad args fail the build, before any replica starts
    has_selector = "selector" in Catalog.load(cfg["catalog"], verify=False).routers
    router = RouterDeployment.options(name="Router").bind(cfg, Embedder.bind(cfg),
                                                         Selector.bind(cfg) if has_selector else None)
    return Ingress.bind(cfg, router, Generator.bind(cfg))
