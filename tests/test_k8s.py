"""k8s/ manifests: every document validated against the KubeRay CRD schema for its kind
(../shared/k8s-schemas), then the checks no schema makes: the RayService serves the same Serve app
as serve_app/serve_config.yaml, GPUs are requested where the Generator runs, and the RayJob runs
`switchboard sweep` with a config that its ConfigMap provides.

Schema validation follows what the API server does with kubectl's default `--validate=strict`:
types, enums, required fields, and unknown fields rejected (a CRD object schema with `properties`
is closed). It does not evaluate the CRDs' CEL rules (`x-kubernetes-validations`) or int32 ranges.
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
from pathlib import Path, PurePosixPath

import pytest
import yaml
from jsonschema import Draft7Validator

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
SERVE_CONFIG = REPO / "serve_app" / "serve_config.yaml"
SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "k8s-schemas"
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB each: C loader, ~3x faster

# RayService.spec.upgradeStrategy.type is a free string in the CRD; these are the values KubeRay accepts.
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
SWEEP_KEYS = {"base_model", "tasks", "variants", "r", "alpha", "lr", "scheduler", "workers", "use_gpu"}


def _load_manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.y*ml")):
        for i, doc in enumerate(yaml.load_all(path.read_text(), Loader=LOADER)):
            if doc is not None:
                docs.append((f"{path.name}[{i}]:{doc.get('kind')}", doc))
    return docs


MANIFESTS = _load_manifests()


def _of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in MANIFESTS if doc.get("kind") == kind]


def _one(kind: str) -> dict:
    found = _of_kind(kind)
    assert len(found) == 1, f"expected one {kind} in k8s/, found {len(found)}"
    return found[0]


# --- schemas -----------------------------------------------------------------------------------

def _strict(node: dict) -> dict:
    """A CRD structural schema as JSON Schema, closed the way strict field validation closes it."""
    out = dict(node)
    if isinstance(out.get("properties"), dict):
        out["properties"] = {name: _strict(s) for name, s in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = _strict(out["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_strict(s) for s in out[key]]
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@functools.lru_cache(maxsize=1)
def _validators() -> dict[tuple[str, str], tuple[Draft7Validator, bool]]:
    """(apiVersion, kind) -> (validator, deprecated) for every served version of the CRDs k8s/ uses."""
    if not SCHEMAS.is_dir():
        pytest.skip(f"no CRD schemas at {SCHEMAS}")
    wanted = {doc.get("kind") for _, doc in MANIFESTS}
    found = {}
    for path in sorted(SCHEMAS.glob("*.y*ml")):
        text = path.read_text()
        # Parsing a CRD takes ~0.5 s: skip those whose kind (near the top) no manifest uses.
        named = re.search(r"^  names:\n(?:    .*\n)*?    kind: (\w+)$", text, re.M)
        if named and named.group(1) not in wanted:
            continue
        for crd in yaml.load_all(text, Loader=LOADER):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served", True):
                    schema = _strict(version["schema"]["openAPIV3Schema"])
                    found[(f"{group}/{version['name']}", kind)] = (Draft7Validator(schema),
                                                                    bool(version.get("deprecated")))
    if not found:
        pytest.skip(f"no CustomResourceDefinition in {SCHEMAS}")
    return found


def _errors(doc: dict) -> list[str]:
    validator, _ = _validators()[(doc["apiVersion"], doc["kind"])]
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


def _check_configmap(doc: dict) -> None:
    assert doc.get("apiVersion") == "v1"
    assert isinstance(doc.get("metadata", {}).get("name"), str)
    data = doc.get("data")
    assert isinstance(data, dict) and data, "a ConfigMap here carries data"
    for key, value in data.items():
        assert re.fullmatch(r"[-._a-zA-Z0-9]+", key), f"invalid ConfigMap key {key!r}"
        assert isinstance(value, str), f"data.{key} must be a string (quote numbers and booleans)"
        if key.endswith((".yaml", ".yml")):
            assert isinstance(yaml.safe_load(value), dict), f"data.{key} is not a YAML mapping"


@pytest.mark.parametrize("doc", [d for _, d in MANIFESTS], ids=[i for i, _ in MANIFESTS])
def test_manifest_matches_schema(doc):
    assert isinstance(doc.get("apiVersion"), str) and isinstance(doc.get("kind"), str)
    assert doc.get("metadata", {}).get("name"), "metadata.name is required"
    if doc["kind"] == "ConfigMap":
        _check_configmap(doc)
        return
    key = (doc["apiVersion"], doc["kind"])
    assert key in _validators(), f"no CRD schema for {key} in {SCHEMAS} (known: {sorted(_validators())})"
    assert not _validators()[key][1], f"{key} is a deprecated version"
    errors = _errors(doc)
    assert not errors, "\n".join(errors)


def test_k8s_holds_the_expected_manifests():
    kinds = sorted(doc["kind"] for _, doc in MANIFESTS)
    assert kinds == ["ConfigMap", "ConfigMap", "RayJob", "RayService"], kinds


@pytest.mark.parametrize("kind, mutate, expect", [
    ("RayService", lambda s: s["rayClusterConfig"]["workerGroupSpecs"][0].update(replicas="two"),
     "is not of type 'integer'"),
    ("RayService", lambda s: s["rayClusterConfig"]["autoscalerOptions"].update(upscalingMode="Turbo"),
     "is not one of"),
    ("RayService", lambda s: s["rayClusterConfig"].update(enableInTreeAutoScaling=True),  # typo'd field
     "Additional properties are not allowed"),
    ("RayService", lambda s: s["rayClusterConfig"]["workerGroupSpecs"][1]["rayStartParams"].update({"num-gpus": 1}),
     "is not of type 'string'"),
    ("RayService", lambda s: s["rayClusterConfig"]["headGroupSpec"].pop("template"),
     "'template' is a required property"),
    ("RayJob", lambda s: s.update(shutdownAfterJobFinishes="yes"), "is not of type 'boolean'"),
])
def test_validator_rejects_broken_copies(kind, mutate, expect):
    broken = copy.deepcopy(_one(kind))
    mutate(broken["spec"])
    errors = _errors(broken)
    assert any(expect in e for e in errors), errors


# --- RayService: the same Serve app as serve_app/serve_config.yaml -----------------------------

def _serve_configs() -> tuple[dict, dict]:
    service = _one("RayService")
    return yaml.safe_load(service["spec"]["serveConfigV2"]), yaml.safe_load(SERVE_CONFIG.read_text())


def _apps(config: dict) -> dict[str, dict]:
    return {app["name"]: app for app in config["applications"]}


def _deployments(app: dict) -> dict[str, dict]:
    return {d["name"]: d for d in app.get("deployments", [])}


def test_rayservice_serves_the_serve_config_app():
    k8s, local = _serve_configs()
    assert _apps(k8s).keys() == _apps(local).keys()
    for name, app in _apps(local).items():
        ours = _apps(k8s)[name]
        assert ours["import_path"] == app["import_path"]
        assert ours.get("route_prefix") == app.get("route_prefix")
        assert list(_deployments(ours)) == list(_deployments(app))
        assert set(ours["args"]) == set(app["args"]), "args differ from serve_config.yaml"
    assert k8s["grpc_options"]["grpc_servicer_functions"] == local["grpc_options"]["grpc_servicer_functions"]
    assert k8s["grpc_options"]["port"] == local["grpc_options"]["port"]
    assert k8s["http_options"]["port"] == local["http_options"]["port"]
    assert k8s["http_options"]["host"] == "0.0.0.0", "the Serve proxy must listen on the pod IP"
    assert k8s.get("proxy_location") == local.get("proxy_location")


def test_rayservice_serve_config_passes_serves_schema():
    """What the Ray dashboard checks when KubeRay deploys serveConfigV2."""
    schema = pytest.importorskip("ray.serve.schema")
    k8s, _ = _serve_configs()
    schema.ServeDeploySchema.model_validate(k8s)
    known = set(schema.DeploymentSchema.model_fields)  # the schema ignores unknown keys: catch typos here
    for app in k8s["applications"]:
        for d in app["deployments"]:
            assert set(d) <= known, f"{d['name']}: unknown deployment options {set(d) - known}"


def test_rayservice_args_are_valid_app_args(tmp_path):
    from serve_app.config import AppArgs

    k8s, _ = _serve_configs()
    (tmp_path / "catalog.json").write_text("{}")  # the real catalog lives on the cluster's volume
    for app in k8s["applications"]:
        args = app["args"]
        assert PurePosixPath(args["catalog"]).is_absolute()
        AppArgs(**{**args, "catalog": str(tmp_path)})


def _pods(cluster: dict) -> list[tuple[str, dict]]:
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    return [(name, g["template"]["spec"]) for name, g in groups]


def _mount_source(pod: dict, path: str) -> dict | None:
    """The volume the file or directory `path` comes from in the pod's first container."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for m in sorted(pod["containers"][0].get("volumeMounts", []), key=lambda m: -len(m["mountPath"])):
        if PurePosixPath(path).is_relative_to(m["mountPath"]):
            return volumes[m["name"]]
    return None


def test_rayservice_catalog_is_on_a_volume_in_every_pod():
    service = _one("RayService")
    k8s, _ = _serve_configs()
    catalog = _apps(k8s)["switchboard"]["args"]["catalog"]
    for name, pod in _pods(service["spec"]["rayClusterConfig"]):
        source = _mount_source(pod, catalog)
        assert source and "persistentVolumeClaim" in source, f"{name}: {catalog} is not on a PVC mount"
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    annotation = head["metadata"]["annotations"]["switchboard.io/catalog-version"]
    assert annotation == PurePosixPath(catalog).name, "bump the catalog-version annotation with args.catalog"


def _gpus(pod: dict) -> int:
    limits = pod["containers"][0].get("resources", {}).get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def test_rayservice_gpus_are_requested_for_the_generator():
    service = _one("RayService")
    cluster = service["spec"]["rayClusterConfig"]
    k8s, _ = _serve_configs()
    generator = _deployments(_apps(k8s)["switchboard"])["Generator"]
    assert generator["ray_actor_options"].get("num_gpus") == 1
    gpu_groups = [g for g in cluster["workerGroupSpecs"] if _gpus(g["template"]["spec"])]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for g in gpu_groups:
        gpus = _gpus(g["template"]["spec"])
        assert g["rayStartParams"].get("num-gpus") == str(gpus)
        assert g["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == gpus
    capacity = sum(g["maxReplicas"] * _gpus(g["template"]["spec"]) for g in gpu_groups)
    assert capacity >= generator["autoscaling_config"]["max_replicas"] * generator["ray_actor_options"]["num_gpus"]
    assert any(not _gpus(g["template"]["spec"]) for g in cluster["workerGroupSpecs"]), "no CPU worker group"
    assert _gpus(cluster["headGroupSpec"]["template"]["spec"]) == 0, "the head holds no GPU"


def test_rayservice_upgrades_autoscales_and_exposes_ports():
    spec = _one("RayService")["spec"]
    assert spec["upgradeStrategy"]["type"] in UPGRADE_TYPES  # the CRD does not enforce this enum
    assert spec["upgradeStrategy"]["type"] != "None", "upgrades must not be disabled"
    cluster = spec["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]
    for g in cluster["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {6379, 8265, 8000, 9000} <= {p["containerPort"] for p in head["ports"]}
    k8s, _ = _serve_configs()
    service_ports = {p["port"] for p in spec["serveService"]["spec"]["ports"]}
    assert {k8s["http_options"]["port"], k8s["grpc_options"]["port"]} <= service_ports


def test_rayservice_pods_are_ready_by_the_standard_grpc_health_service():
    """Every serving pod's readiness is grpc.health.v1 on the Serve gRPC port, for the service the app serves."""
    from serve_app.health import SERVICE

    k8s, _ = _serve_configs()
    for name, pod in _pods(_one("RayService")["spec"]["rayClusterConfig"]):
        for c in pod["containers"]:
            probe = c.get("readinessProbe", {}).get("grpc")
            assert probe == {"port": k8s["grpc_options"]["port"], "service": SERVICE}, f"{name}/{c['name']}"


def test_rayservice_carries_a_valid_canary_policy_and_a_shared_writable_state_dir(tmp_path):
    """Every pod sees the policy ConfigMap, and the state dir the `canary` commands and Routers default to."""
    from serve_app.canary.policy import load_policy

    (maps,) = [d for _, d in MANIFESTS if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "switchboard-canary"]
    (tmp_path / "policy.yaml").write_text(maps["data"]["policy.yaml"])
    assert load_policy(tmp_path / "policy.yaml").steps[-1] == 100
    for name, pod in _pods(_one("RayService")["spec"]["rayClusterConfig"]):
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["canary-policy"]["configMap"]["name"] == "switchboard-canary", name
        assert not volumes["canary-state"]["persistentVolumeClaim"].get("readOnly"), name
        for c in pod["containers"]:
            mounts = {m["name"]: m for m in c["volumeMounts"]}
            home = next(e["value"] for e in c["env"] if e["name"] == "SWITCHBOARD_HOME")
            assert mounts["canary-state"]["mountPath"] == f"{home}/canary" and not mounts["canary-state"].get("readOnly")
            assert mounts["canary-policy"]["mountPath"] == "/etc/switchboard/canary"


@pytest.mark.parametrize("kind", ["RayService", "RayJob"])
def test_pods_run_offline_on_one_image(kind):
    doc = _one(kind)
    cluster = doc["spec"]["rayClusterConfig" if kind == "RayService" else "rayClusterSpec"]
    images = set()
    for name, pod in _pods(cluster):
        for c in pod["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("HF_HUB_OFFLINE") == "1", f"{name}/{c['name']}: HF_HUB_OFFLINE=1 missing"
            images.add(c["image"])
    assert len(images) == 1, images


# --- RayJob: the sweep -------------------------------------------------------------------------

def test_rayjob_runs_the_sweep_from_its_configmap():
    spec = _one("RayJob")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["switchboard", "sweep"], argv
    config_path = argv[argv.index("--config") + 1]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES
    # The entrypoint runs on the head: the config file must come from a ConfigMap mounted there.
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    source = _mount_source(head, config_path)
    assert source and "configMap" in source, f"{config_path} is not mounted from a ConfigMap on the head"
    configmaps = {c["metadata"]["name"]: c for c in _of_kind("ConfigMap")}
    assert source["configMap"]["name"] in configmaps, "the RayJob's ConfigMap is not defined in k8s/"
    data = configmaps[source["configMap"]["name"]]["data"]
    assert PurePosixPath(config_path).name in data


def test_sweep_config_and_gpu_workers():
    spec = _one("RayJob")["spec"]
    (configmap,) = [c for c in _of_kind("ConfigMap") if c["metadata"]["name"] == "switchboard-sweep"]
    sweep = yaml.safe_load(configmap["data"]["sweep.yaml"])
    assert SWEEP_KEYS <= set(sweep), SWEEP_KEYS - set(sweep)
    assert sweep["variants"] == ["lora", "rslora", "dora", "pissa"]
    assert sweep["r"] == [4, 8] and sweep["alpha"] == [8, 16]
    assert all(isinstance(lr, float) for lr in sweep["lr"]), "lr must parse as floats (write 1.0e-3)"
    assert sweep["scheduler"] == "asha" and sweep["workers"] == 2 and sweep["use_gpu"] is True
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpu_groups = [g for g in groups if _gpus(g["template"]["spec"])]
    assert gpu_groups, "no GPU worker group in the RayJob"
    for g in gpu_groups:
        assert g["rayStartParams"].get("num-gpus") == str(_gpus(g["template"]["spec"]))
    # One trial needs `workers` GPUs at once, or it never schedules.
    assert sum(g["maxReplicas"] * _gpus(g["template"]["spec"]) for g in gpu_groups) >= sweep["workers"]
