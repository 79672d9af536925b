"""`build_app`: the Serve application, as named by `import_path` in the Serve config YAML."""

from __future__ import annotations

from ray.serve import Application

from .config import AppArgs
from .embedder import Embedder
from .generator import Generator
from .ingress import Ingress
from .router import RouterDeployment

APP_NAME = "switchboard"
GRPC_SERVICER = "protos.switchboard.v1.switchboard_pb2_grpc.add_SwitchboardServicer_to_server"


def build_app(args: dict) -> Application:
    """Ingress -> Router (-> Embedder) and Ingress -> Generator, each its own deployment and replicas."""
    cfg = AppArgs(**args).model_dump()  # fail at build time, in the caller's terminal, on bad args
    router = RouterDeployment.options(name="Router").bind(cfg, Embedder.bind(cfg))
    return Ingress.bind(cfg, router, Generator.bind(cfg))
