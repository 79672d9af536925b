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
    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable Serve config: {e}") from None
    apps = config.get("applications") if isinstance(config, dict) else None
    grpc = config.get("grpc_options") if isinstance(config, dict) else None
    if not (isinstance(apps, list) and apps and isinstance(apps[0], dict)
            and isinstance(apps[0].get("args") or {}, dict)
            and isinstance(grpc, dict) and grpc.get("grpc_servicer_functions")):
        raise ValueError(f"{path}: a Serve config for Switchboard needs `applications:` (a list, our app first, "
                         f"its `args:` a mapping) and `grpc_options.grpc_servicer_functions`; start from "
                         f"{DEFAULT_CONFIG}")
    app = apps[0]
    app["args"] = {**(app.get("args") or {}), **(args or {})}
    if grpc_port is not None:
        grpc["port"] = grpc_port
    if http_port is not None:
        config["http_options"] = {**(config.get("http_options") or {}), "port": http_port}
    return config


def connect(address: str | None = None, dashboard_port: int | None = None) -> str | None:
    """Join the Ray cluster at `address` (or $RAY_ADDRESS), else start one here; return its dashboard's URL.

    A cluster started here runs the dashboard when `dashboard_port` is given: `serve status`, `serve deploy`
    and the dashboard's Serve page need it. None when already connected or no dashboard runs.
    """
    import ray

    if ray.is_initialized():
        return None
    # Replicas import serve_app/routing/protos: make sure they find this checkout.
    root = str(Path(__file__).resolve().parent.parent)
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                        "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                        # idle OpenMP threads sleep instead of spinning on cores other replicas need
                        "OMP_WAIT_POLICY": "PASSIVE"}}
    if address or os.environ.get("RAY_ADDRESS"):
        context = ray.init(address=address, namespace="serve", runtime_env=env, log_to_driver=False)
    else:
        dashboard = dashboard_port is not None
        context = ray.init(namespace="serve", runtime_env=env, log_to_driver=False, include_dashboard=dashboard,
                           **({"dashboard_port": dashboard_port} if dashboard else {}))
    return _http(context.dashboard_url)


def cluster_dashboard_url() -> str | None:
    """The dashboard of the cluster this process is connected to (started here or joined), if it runs one."""
    from ray._private.worker import get_dashboard_url   # no public API for a connected driver; stable since Ray 1.x

    return _http(get_dashboard_url())


def _http(address: str | None) -> str | None:
    return f"http://{address}" if address and "://" not in address else (address or None)


def dashboard_notice(url: str) -> str:
    """How to reach the dashboard: its address, and the token Ray 2.60 asks for (token auth is on by default)."""
    lines = [f"Ray dashboard: {url}  (the CLIs too: `RAY_ADDRESS={url} serve status`, `... ray job list`)"]
    if os.environ.get("RAY_AUTH_MODE", "token").lower() == "token":
        token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
        lines.append(f"  token auth is on: `ray get-auth-token` prints the token ({token_file}, or $RAY_AUTH_TOKEN); "
                     f"paste it where the dashboard asks, send it as `Authorization: Bearer <token>`, and set "
                     f"RAY_AUTH_MODE=token for the `ray`/`serve` CLIs")
    return "\n".join(lines)


def start(config: dict, timeout_s: float = 600, *, address: str | None = None,
          dashboard_port: int | None = None) -> str | None:
    """`serve run` without the CLI: start Serve with the config's gRPC/HTTP options, deploy, wait until RUNNING.

    Joins the cluster at `address` / $RAY_ADDRESS or starts one (see `connect`); returns the dashboard URL
    when it started one with a dashboard.
    """
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    url = connect(address, dashboard_port)
    client = serve_api.serve_start(http_options=schema.http_options.model_dump(),
                                   grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
                                   proxy_location=schema.proxy_location)
    client.deploy_apps(schema, _blocking=False)
    for app in schema.applications:
        _wait_running(app.name, timeout_s)
    return url


def drain(config: dict, timeout_s: float = 60, poll_s: float = 0.2) -> dict:
    """Stop taking requests, let those in flight finish, then shut Serve down (what SIGTERM asks for).

    Sets `user_config: {draining: true}` on the Ingress: every Ingress replica answers new requests
    UNAVAILABLE (clients retry elsewhere) and its health NOT_SERVING, without a restart. Waits until
    the Ingress reports none in flight (three readings in a row, so that with several Ingress replicas
    each is likely read) or `timeout_s`, then `serve.shutdown()`. Returns what it saw.
    """
    from ray import serve

    draining = copy.deepcopy(config)
    app = draining["applications"][0]
    entries = {d["name"]: d for d in app.setdefault("deployments", [])}
    if "Ingress" not in entries:
        entries["Ingress"] = {"name": "Ingress"}
        app["deployments"].append(entries["Ingress"])
    entries["Ingress"]["user_config"] = {"draining": True}
    started = time.monotonic()
    start(draining, timeout_s)
    handle = serve.get_deployment_handle("Ingress", app["name"])
    quiet, deadline = 0, started + timeout_s
    while quiet < 3 and time.monotonic() < deadline:
        state = handle.serving_state.remote().result()
        quiet = quiet + 1 if state["draining"] and state["in_flight"] == 0 else 0
        time.sleep(poll_s)
    print(f"serve: drained in {time.monotonic() - started:.1f} s" if quiet >= 3 else
          f"serve: requests still in flight after {timeout_s:.0f} s; shutting down anyway", file=sys.stderr)
    stop()
    return {"drained": quiet >= 3, "drain_s": round(time.monotonic() - started, 2)}


def switch_catalog(config: dict, catalog: str | Path, timeout_s: float = 300) -> dict:
    """Move the running app to another catalog version without restarting a replica; return the new config.

    Sets `user_config: {catalog: DIR}` on every deployment that holds the catalog and redeploys: Serve
    treats a `user_config` change as a lightweight update and calls each replica's `reconfigure`
    (see `Generator.reconfigure`). `serve deploy` of a YAML edited the same way does the same on a
    cluster. Returns once the Router and the Generator answer with the new version.
    """
    from ray import serve

    from routing.catalog import Catalog

    from .config import catalog_switch

    config = copy.deepcopy(config)
    app = config["applications"][0]
    served = next((d["user_config"]["catalog"] for d in app.get("deployments", [])
                   if d["name"] == "Router" and "catalog" in d.get("user_config", {})), app["args"]["catalog"])
    current = Catalog.load(served, verify=False)
    target = catalog_switch({"catalog": str(catalog)}, current) or current  # refuse here, not in the replicas
    holders = ["Router", "Generator"]
    if "selector" in target.routers and "selector" in Catalog.load(app["args"]["catalog"], verify=False).routers:
        holders.append("Selector")  # deployed only when the app's own catalog has one; kept if the target has none
    entries = {d["name"]: d for d in app.setdefault("deployments", [])}
    for name in holders:
        if name not in entries:
            entries[name] = {"name": name}
            app["deployments"].append(entries[name])
        entries[name]["user_config"] = {"catalog": str(target.root.resolve())}
    start(config, timeout_s)
    deadline = time.monotonic() + timeout_s
    for name in ("Router", "Generator"):
        handle = serve.get_deployment_handle(name, app["name"])
        while handle.info.remote().result()["version"] != target.version:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} still serves another catalog {timeout_s:.0f} s after the switch")
            time.sleep(0.2)
    return config


def _wait_running(name: str, timeout_s: float) -> None:
    from ray import serve

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
