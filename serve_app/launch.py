"""Start the app from the Serve config YAML, in-process, exactly as `serve run CONFIG` would.

Used by `switchboard serve`, the demo and the tests, so all of them exercise the file users deploy.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = Path(__file__).with_name("serve_config.yaml")


def load_config(path: str | Path = DEFAULT_CONFIG, args: dict[str, Any] | None = None,
                grpc_port: int | None = None, http_port: int | None = None) -> dict:
    """The YAML as a dict, with app args and ports overridden (e.g. the catalog path, free test ports)."""
    config = yaml.safe_load(Path(path).read_text())
    config = copy.deepcopy(config)
    app = config["applications"][0]
    app["args"] = {**app.get("args", {}), **(args or {})}
    if grpc_port is not None:
        config["grpc_options"]["port"] = grpc_port
    if http_port is not None:
        config["http_options"]["port"] = http_port
    return config


def start(config: dict, timeout_s: float = 600) -> None:
    """`serve run` without the CLI: start Serve with the config's gRPC/HTTP options, deploy, wait until RUNNING."""
    import ray
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    if not ray.is_initialized():
        # Replicas import serve_app/routing/protos: make sure they find this checkout.
        root = str(Path(__file__).resolve().parent.parent)
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                            # idle OpenMP threads sleep instead of spinning on cores other replicas need
                            "OMP_WAIT_POLICY": "PASSIVE"}}
        ray.init(namespace="serve", runtime_env=env, include_dashboard=False, log_to_driver=False)
    client = serve_api.serve_start(http_options=schema.http_options.model_dump(),
                                   grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
                                   proxy_location=schema.proxy_location)
    client.deploy_apps(schema, _blocking=False)
    name = schema.applications[0].name
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(name)
        state = status.status if status else "NOT_STARTED"
        if state == "RUNNING":
            return
        if state in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"Serve app {name!r} failed to deploy: {status.message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve app {name!r} still {state} after {timeout_s:.0f} s")
        time.sleep(0.5)


def stop() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
    print("serve: shut down", file=sys.stderr)
