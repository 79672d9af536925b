"""`switchboard canary ...` on real catalogs, and two Router-side gates sharing one rollout."""

from __future__ import annotations

import json
import shutil

import pytest

from serve_app.canary.gate import CanaryGate
from serve_app.canary.state import CANDIDATE, STABLE, RolloutStore
from serve_app.cli import main
from training.demo_corpus import demo_records
from training.router_training import train_lexical

POLICY = "steps: [shadow, 50, 100]\nmin_requests: 20\ninterval_s: 5\n"


@pytest.fixture(scope="module")
def catalogs(small_catalog, tmp_path_factory):
    """Stable (the small catalog) and a candidate: the same catalog plus a lexical router (a new version)."""
    work = tmp_path_factory.mktemp("canary")
    records = [r for r in demo_records("train") if r.key in small_catalog.tasks]
    candidate = train_lexical(small_catalog, records, work / "candidate", progress=False)
    return small_catalog, candidate


def canary(capsys, *args: str) -> tuple[int, dict | str]:
    code = main(["canary", *args])
    out, err = capsys.readouterr()
    return code, json.loads(out.strip().splitlines()[-1]) if code == 0 else err


def test_the_canary_verbs_drive_one_rollout(catalogs, tmp_path, capsys):
    stable, candidate = catalogs
    (tmp_path / "policy.yaml").write_text(POLICY)
    state = ("--state", str(tmp_path / "state.json"))
    code, out = canary(capsys, "start", "--catalog", str(candidate.root), "--policy", str(tmp_path / "policy.yaml"),
                       "--stable", str(stable.root), *state)
    assert code == 0 and out["status"] == "running" and out["step"] == 0 and out["shadow"] is True
    assert out["candidate"]["version"] == candidate.version and out["stable"]["version"] == stable.version
    code, err = canary(capsys, "start", "--catalog", str(candidate.root), "--policy", str(tmp_path / "policy.yaml"),
                       *state)
    assert code == 2 and "is running (step 0)" in err
    code, out = canary(capsys, "promote", *state)
    assert code == 0 and (out["step"], out["weight"]) == (1, 0.5)
    code, out = canary(capsys, "status", *state)
    assert out["last_decision"]["by"] == "command" and out["last_decision"]["action"] == "promote"
    code, out = canary(capsys, "rollback", *state)
    assert out["status"] == "rolled_back" and out["weight"] == 0
    code, err = canary(capsys, "abort", *state)
    assert code == 2 and "has ended (rolled_back)" in err
    # A new rollout needs no --stable: the last one left stable serving.
    code, out = canary(capsys, "start", "--catalog", str(candidate.root), "--policy", str(tmp_path / "policy.yaml"),
                       *state)
    assert code == 0 and out["stable"]["version"] == stable.version


def test_a_candidate_that_fails_verification_is_refused_and_stable_keeps_serving(catalogs, tmp_path, capsys):
    stable, candidate = catalogs
    (tmp_path / "policy.yaml").write_text(POLICY)
    damaged = shutil.copytree(candidate.root, tmp_path / "damaged")
    adapter = next(damaged.rglob("*.safetensors"))
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 0xFF
    adapter.write_bytes(bytes(data))
    state = tmp_path / "state.json"
    code, err = canary(capsys, "start", "--catalog", str(damaged), "--policy", str(tmp_path / "policy.yaml"),
                       "--stable", str(stable.root), "--state", str(state))
    assert code == 2 and "damaged: content does not match version" in err and "Traceback" not in err
    assert not state.exists() and CanaryGate(RolloutStore(state)).assign("anyone") == STABLE
    code, err = canary(capsys, "start", "--catalog", str(stable.root), "--policy", str(tmp_path / "policy.yaml"),
                       "--stable", str(stable.root), "--state", str(state))
    assert code == 2 and "is the stable version" in err
    (tmp_path / "bad.yaml").write_text("steps: [shadow, 100]\nchecks: {min_agrement: 1}\n")
    code, err = canary(capsys, "start", "--catalog", str(candidate.root), "--policy", str(tmp_path / "bad.yaml"),
                       "--stable", str(stable.root), "--state", str(state))
    assert code == 2 and "bad.yaml:2: checks.min_agrement: unknown key" in err


def test_two_router_replicas_drive_a_rollout_to_promotion_and_a_restart_resumes(catalogs, tmp_path, capsys):
    stable, candidate = catalogs
    (tmp_path / "policy.yaml").write_text(POLICY)
    store = RolloutStore(tmp_path / "state.json")
    canary(capsys, "start", "--catalog", str(candidate.root), "--policy", str(tmp_path / "policy.yaml"),
           "--stable", str(stable.root), "--state", str(store.path))
    replicas = [CanaryGate(store), CanaryGate(store)]
    now = 1e10   # far after the start: every tick may analyse

    def serve(gate: CanaryGate, n: int) -> None:
        for i in range(n):
            version = gate.assign(f"session-{i}")
            if gate.shadowing():
                gate.record(CANDIDATE, ok=True, latency_ms=3, agreed=i % 20 != 0)   # 95% agreement
            gate.record(version, ok=True, latency_ms=30)

    for i, gate in enumerate(replicas):   # one analysis per interval: holds on 15 compared, promotes on 30
        serve(gate, 15)
        gate.tick(now + 5 * i)
    assert [h["action"] for h in store.load().history] == ["hold", "promote"]
    now += 5
    assert store.load().step == 1 and store.load().history[-1]["measurements"][0]["value"] == pytest.approx(0.9333, 1e-3)
    restarted = CanaryGate(store)   # a replica killed and started again reads the step back
    assert restarted.rollout.step == 1 and restarted.catalog(CANDIDATE) == str(candidate.root.resolve())
    split = [restarted.assign(f"session-{i}") for i in range(400)]
    assert 0.4 < split.count(CANDIDATE) / 400 < 0.6
    # At most three intervals: the first analysis may hold (the ticking replica alone may have too few), the
    # next promotes to 100% (what the others counted meanwhile at 50% is dropped, not credited to 100%), the
    # last ends it. Ticks after the end change nothing.
    for _ in range(3):
        now += 10
        for gate in (*replicas, restarted):
            serve(gate, 30)
            gate.tick(now)
    actions = [h["action"] for h in store.load().history][2:]
    assert actions.count("promote") == 2 and set(actions) <= {"hold", "promote"}, actions
    assert store.load().status.value == "promoted" and restarted.assign("anyone") == CANDIDATE
