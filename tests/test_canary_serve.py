"""Canary rollouts on the real Serve app on loopback, driven through the Admin service by real gRPC clients.

One app (the small catalog as stable) lives for the module; its tests run in order: a tampered candidate is
refused, a bad one (its task index built on swapped labels) is rolled back by the analysis in its shadow
step with every stable request answered, a good one goes shadow -> 50% (sticky sessions, answered by the
candidate's router and adapters; a Router replica killed there resumes the step) -> 100%, promoted.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import urllib.request
from types import SimpleNamespace

import grpc
import pytest

from protos.switchboard.v1 import admin_pb2 as apb
from protos.switchboard.v1 import admin_pb2_grpc as apb_grpc
from serve_app import launch
from serve_app.admin import AdminClient
from serve_app.client import RetryPolicy, SwitchboardClient
from training.catalog_build import build_catalog
from training.demo_corpus import demo_records

KEYS = ("fin/sentiment", "med/dose")
TOKEN = "canary-test-token-0123456789"
# p99 is off (a ratio no run reaches): the test kills a Router replica mid-split, and the request that waits
# through its restart (seconds) is the candidate's p99 on this few requests (the analysis's tests judge p99).
POLICY = """
steps: [shadow, 50, 100]
min_requests: {min_requests}
interval_s: 1
checks: {{error_rate_margin: 0.05, max_p99_latency_ratio: 100000, min_agreement: 0.8, accuracy_margin: 0.1,
          min_labelled: 6}}
max_inconclusive: 200
"""


def _records(split: str) -> list:
    return [r for r in demo_records(split) if r.key in KEYS]


@pytest.fixture(scope="module")
def app(small_catalog, tiny_base, tmp_path_factory, free_port):
    work = tmp_path_factory.mktemp("canary-serve")
    adapters = small_catalog.root.parent / "adapters"
    val = _records("val")
    build = dict(adapters=adapters, base_model=("tiny-test", tiny_base))
    # good: the same tasks and adapters, an index from most of the same records (routes like stable)
    good = build_catalog([r for i, r in enumerate(val) if i % 5], work / "good", **build)
    # bad: an index whose two tasks' examples swapped labels (a router trained on shuffled labels)
    swap = {KEYS[0]: KEYS[1], KEYS[1]: KEYS[0]}
    bad = build_catalog([dataclasses.replace(r, domain=swap[r.key].split("/")[0], task=swap[r.key].split("/")[1])
                         for r in val], work / "bad", **build)
    tampered = work / "tampered"
    shutil.copytree(good.root, tampered)
    victim = next(p for p in sorted(tampered.rglob("*.safetensors")))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))

    state = work / "canary.json"
    port, http = free_port(), free_port()
    config = launch.load_config(args={"catalog": str(small_catalog.root), "max_new_tokens": 4,
                                      "admin_token": TOKEN, "canary_state": str(state)},
                                grpc_port=port, http_port=http)
    launch.start(config)
    address = f"127.0.0.1:{port}"
    try:
        with SwitchboardClient(address, retry=RetryPolicy(attempts=12, max_s=2.0)) as client, \
                AdminClient(address, TOKEN) as admin:
            yield SimpleNamespace(client=client, admin=admin, address=address, http=http, stable=small_catalog,
                                  good=good, bad=bad, tampered=tampered, state=state, test=_records("test"))
    finally:
        launch.stop()


def _drive(app, until, timeout_s: float = 180, session: str = "", generate_every: int = 8) -> dict:
    """Labelled Route traffic (a Generate now and then), until `until(status)`; every reply must be OK."""
    deadline, n, versions = time.monotonic() + timeout_s, 0, {}
    while time.monotonic() < deadline:
        for record in app.test:
            key = f"{session}{n % 40}" if session else ""
            if n % generate_every == 0:
                reply = app.client.generate(record.input, true_task=record.key, session_key=key, max_new_tokens=2)
            else:
                reply = app.client.route(record.input, true_task=record.key, session_key=key)
            versions[reply.decision.catalog_version] = versions.get(reply.decision.catalog_version, 0) + 1
            n += 1
        status = app.admin.status()
        if until(status):
            return {"status": status, "versions": versions, "sent": n}
    pytest.fail(f"no verdict in {timeout_s:.0f} s: {app.admin.status()}")


def test_admin_refuses_callers_without_the_token(app):
    with grpc.insecure_channel(app.address) as channel:
        stub = apb_grpc.AdminStub(channel)
        for metadata, code in (((), grpc.StatusCode.UNAUTHENTICATED),
                               ((("authorization", "Bearer wrong-token-0123456789"),), grpc.StatusCode.PERMISSION_DENIED)):
            with pytest.raises(grpc.RpcError) as err:
                stub.GetCanary(apb.GetCanaryRequest(), metadata=(("application", "switchboard"), *metadata))
            assert err.value.code() == code and "Traceback" not in err.value.details()
    with pytest.raises(grpc.RpcError) as err:   # the right token, nothing to show yet: a precise code, not a crash
        app.admin.status()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no rollout" in err.value.details()


def test_a_tampered_candidate_is_refused_and_stable_keeps_serving(app):
    with pytest.raises(grpc.RpcError) as err:
        app.admin.start(str(app.tampered), POLICY.format(min_requests=12))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not match version" in err.value.details()
    reply = app.client.generate(app.test[0].input, max_new_tokens=2)
    assert reply.decision.catalog_version == app.stable.version and reply.request_id


def test_a_bad_candidate_is_rolled_back_in_shadow_with_no_failed_stable_request(app):
    started = app.admin.start(str(app.bad.root), POLICY.format(min_requests=12))
    assert started["status"] == "running" and started["shadow"] and started["candidate"]["version"] == app.bad.version
    out = _drive(app, lambda s: s["status"] != "running")
    assert out["status"]["status"] == "rolled_back", out
    assert set(out["versions"]) == {app.stable.version}   # shadow: stable answered everything, and all were OK
    decision = out["status"]["last_decision"]
    agreement = next(m for m in decision["measurements"] if m["name"] == "agreement")
    assert decision["by"] == "analysis" and agreement["phase"] == "Failed" and agreement["value"] < 0.8, decision
    time.sleep(1.5)   # every replica has synced: stable alone serves
    assert app.client.route(app.test[0].input, session_key="s1").decision.catalog_version == app.stable.version


def test_a_good_candidate_splits_sticky_sessions_survives_a_router_restart_and_is_promoted(app):
    import ray

    app.admin.start(str(app.good.root), POLICY.format(min_requests=40))
    _drive(app, lambda s: s["step"] >= 1 or s["status"] != "running")   # shadow passed: agreement
    assert app.admin.status()["step"] == 1 and app.admin.status()["weight"] == 0.5
    time.sleep(1.5)   # every replica has seen the split
    sides = {f"user{i}": {app.client.route(app.test[i % len(app.test)].input, session_key=f"user{i}")
                          .decision.catalog_version for _ in range(2)} for i in range(12)}
    assert all(len(v) == 1 for v in sides.values()), sides   # sticky: one version per session
    on_candidate = [k for k, v in sides.items() if v == {app.good.version}]
    assert on_candidate and len(on_candidate) < 12, sides
    # answered wholly on the candidate: its router, its adapters in the Generator
    answer = app.client.generate(app.test[0].input, session_key=on_candidate[0], max_new_tokens=2)
    assert answer.decision.catalog_version == app.good.version and answer.new_tokens >= 1

    before = json.loads(app.state.read_text())
    (router,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if "#Router#" in a["name"]]
    ray.kill(ray.get_actor(router["name"], namespace=router["namespace"]), no_restart=True)
    # the restarted replica resumes: same step, the counts so far kept, the same sessions on the candidate
    assert app.client.route(app.test[0].input, session_key=on_candidate[0]).decision.catalog_version == app.good.version
    after = json.loads(app.state.read_text())
    assert after["step"] == before["step"] == 1 and after["current"]["requests"] >= before["current"]["requests"]

    out = _drive(app, lambda s: s["status"] != "running", session="user")
    assert out["status"]["status"] == "promoted", out
    history = json.loads(app.state.read_text())["history"]
    assert [h["action"] for h in history if h["by"] == "analysis" and h["action"] != "hold"] == ["promote"] * 3
    time.sleep(1.5)
    reply = app.client.generate(app.test[1].input, max_new_tokens=2)   # no session key: the new stable answers
    assert reply.decision.catalog_version == app.good.version
    assert app.client.health().catalog_version == app.good.version
    fb = app.client.feedback(reply.request_id, app.test[1].key)
    assert fb.catalog_version == app.good.version
    with pytest.raises(grpc.RpcError) as err:
        app.client.feedback("not-an-id", KEYS[0])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_per_version_metrics_reach_the_ray_metrics_export(app):
    """What Prometheus scrapes: the node's Ray metrics endpoint shows per-version requests (HTTP ones too) and
    shadow agreement."""
    import httpx
    import ray

    answer = httpx.post(f"http://127.0.0.1:{app.http}/v1/completions", timeout=60,
                        json={"model": "auto", "prompt": app.test[0].input, "max_tokens": 2})
    assert answer.status_code == 200, answer.text
    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        if "ray_switchboard_canary_shadow_total" in text and 'method="completions"' in text:
            break
        time.sleep(2)
    lines = [line for line in text.splitlines() if line.startswith("ray_switchboard_")]
    assert any(f'catalog_version="{app.good.version}"' in line and 'code="OK"' in line for line in lines), lines[:20]
    assert any('method="completions"' in line and 'code="OK"' in line for line in lines)
    assert any(f'catalog_version="{app.bad.version}"' in line and 'agreed="false"' in line for line in lines)
    assert any(line.startswith("ray_switchboard_latency_ms_bucket") for line in lines)
    assert any(line.startswith("ray_switchboard_labelled_total") and 'correct="true"' in line for line in lines)
    assert any(line.startswith("ray_switchboard_adapters_resident") and app.good.version in line for line in lines)


def test_the_cli_drives_the_running_app_through_admin(app, monkeypatch, capsys):
    from serve_app.cli import main

    monkeypatch.setenv("SWITCHBOARD_ADMIN_TOKEN", TOKEN)
    assert main(["canary", "status", "--endpoint", app.address]) == 0
    status = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert status["status"] == "promoted" and status["candidate"]["version"] == app.good.version
    assert main(["canary", "promote", "--endpoint", app.address]) == 2   # ended: FAILED_PRECONDITION, said plainly
    assert "FAILED_PRECONDITION" in capsys.readouterr().err
    monkeypatch.setenv("SWITCHBOARD_ADMIN_TOKEN", "another-token-0123456789")
    assert main(["canary", "status", "--endpoint", app.address]) == 2
    assert "PERMISSION_DENIED" in capsys.readouterr().err
