"""The canary's core: policy validation, the analysis, the rollout state machine, the split, the shared store."""

from __future__ import annotations

import json
import multiprocessing
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serve_app.canary.analysis import Action, Counters, Phase, analyze
from serve_app.canary.policy import Policy, load_policy
from serve_app.canary.state import CANDIDATE, STABLE, Rollout, RolloutError, RolloutStore, Status, assign

POLICY = Policy(steps=["shadow", 5, 25, 50, 100], min_requests=100, interval_s=10, checks={"min_labelled": 20})
STABLE_V = {"catalog": "/c/v1", "version": "v1"}
CANDIDATE_V = {"catalog": "/c/v2", "version": "v2"}


def counters(n: int, *, errors: int = 0, latency_ms: float = 20, agreed: int | None = None,
             labelled: int = 0, correct: int = 0) -> Counters:
    c = Counters()
    for i in range(n):
        c.record(ok=i >= errors, latency_ms=latency_ms, agreed=None if agreed is None else i < agreed,
                 correct=(i < correct) if i < labelled else None)
    return c


# --- policy -------------------------------------------------------------------------------------

def _policy_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def test_the_documented_policy_loads(tmp_path):
    from serve_app.canary import policy as module

    example = module.__doc__.split("\n\n")[1]
    policy = load_policy(_policy_file(tmp_path, "\n".join(line[4:] for line in example.splitlines())))
    assert policy.steps == ["shadow", 5, 25, 50, 100] and policy.checks.min_agreement == 0.9
    assert [policy.weight(i) for i in range(5)] == [0, 0.05, 0.25, 0.5, 1.0] and policy.is_shadow(0)


@pytest.mark.parametrize("text, message", [
    ("steps: [shadow, 5, 100]\nchecks:\n  min_agrement: 0.9\n", "policy.yaml:3: checks.min_agrement: unknown key"),
    ("steps: [shadow, 5, 100]\nmin_request: 5\n", "policy.yaml:2: min_request: unknown key"),
    ("steps: [shadow, 5, 50]\n", "the last step must be 100"),
    ("steps: [5, shadow, 100]\n", "'shadow' can only be the first step"),
    ("steps: [shadow, 50, 25, 100]\n", "must rise strictly"),
    ("steps: [shadow, five, 100]\n", "steps.1: a step is 'shadow' or a percentage of traffic, got 'five'"),
    ("steps: [100]\nchecks: {min_agreement: 1.5}\n", "policy.yaml:2: checks.min_agreement: Input should be less"),
    ("steps: [100]\ninterval_s: 0\n", "policy.yaml:2: interval_s"),
    ("- 5\n- 100\n", "a canary policy is a mapping"),
    ("steps: [shadow, 5, 100\n", "not YAML"),
])
def test_a_bad_policy_is_refused_naming_its_line_and_key(tmp_path, text, message):
    with pytest.raises(ValueError, match="policy.yaml") as err:
        load_policy(_policy_file(tmp_path, text))
    assert message in str(err.value)


# --- analysis -----------------------------------------------------------------------------------

def _phases(decision) -> dict[str, Phase]:
    return {m.name: m.phase for m in decision.measurements}


def test_shadow_promotes_a_router_that_agrees_and_rolls_back_one_that_does_not():
    stable = counters(500, labelled=100, correct=90)
    good = analyze(POLICY, 0, stable, counters(150, agreed=145, labelled=50, correct=45))
    assert good.action is Action.PROMOTE and _phases(good) == {"agreement": Phase.SUCCESSFUL,
                                                               "accuracy": Phase.SUCCESSFUL}
    bad = analyze(POLICY, 0, stable, counters(150, agreed=30, labelled=50, correct=10))
    assert bad.action is Action.ROLLBACK and "agreement" in bad.reason and "accuracy" in bad.reason
    agreement = next(m for m in bad.measurements if m.name == "agreement")
    assert agreement.value == pytest.approx(0.2) and agreement.limit == 0.9 and "30/150" in agreement.detail


def test_too_few_requests_hold_and_say_how_many_are_missing():
    decision = analyze(POLICY, 0, counters(500), counters(40, agreed=40))
    assert decision.action is Action.HOLD and _phases(decision)["agreement"] is Phase.INCONCLUSIVE
    assert "40/100 requests" in decision.measurements[0].detail


def test_split_steps_judge_errors_and_latency_against_stable():
    stable = counters(1000, errors=10, latency_ms=20)
    assert analyze(POLICY, 1, stable, counters(200, errors=2, latency_ms=22)).action is Action.PROMOTE
    errors = analyze(POLICY, 1, stable, counters(200, errors=20, latency_ms=20))
    assert errors.action is Action.ROLLBACK and _phases(errors)["error_rate"] is Phase.FAILED
    slow = analyze(POLICY, 2, stable, counters(200, latency_ms=80))
    assert slow.action is Action.ROLLBACK and _phases(slow)["p99_latency_ratio"] is Phase.FAILED
    ratio = next(m for m in slow.measurements if m.name == "p99_latency_ratio").value
    assert 3 < ratio < 5


def test_accuracy_without_enough_labels_is_inconclusive_and_blocks_only_when_required():
    stable, candidate = counters(1000), counters(200, labelled=5, correct=5)
    assert analyze(POLICY, 1, stable, candidate).action is Action.PROMOTE
    strict = POLICY.model_copy(update={"checks": POLICY.checks.model_copy(update={"require_accuracy": True})})
    held = analyze(strict, 1, stable, candidate)
    assert held.action is Action.HOLD and held.reason == "inconclusive: accuracy"


def test_counters_add_up_like_one_replica_that_saw_everything():
    a, b = counters(300, errors=3, latency_ms=10), counters(700, errors=7, latency_ms=500)
    both = a + b
    assert (both.requests, both.errors, sum(both.latency)) == (1000, 10, 1000)
    assert a.p99_ms() < 13 and both.p99_ms() >= 500 and Counters.from_dict(both.to_dict()) == both


@given(st.lists(st.floats(0.01, 90_000), min_size=1, max_size=200))
def test_p99_is_never_below_the_true_p99_nor_a_bucket_above_it(latencies):
    c = Counters()
    for ms in latencies:
        c.record(ok=True, latency_ms=ms)
    true = sorted(latencies)[-(len(latencies) // 100) - 1] if len(latencies) >= 100 else max(latencies)
    assert true <= c.p99_ms() <= max(1.0, true * 10 ** 0.1) + 1e-9


# --- the state machine --------------------------------------------------------------------------

def _rollout(policy: Policy = POLICY) -> Rollout:
    return Rollout.begin(STABLE_V, CANDIDATE_V, policy, now=1000.0)


def test_a_good_candidate_climbs_every_step_to_promoted():
    r = _rollout()
    now = 1000.0
    for step, weight in enumerate([0, 0.05, 0.25, 0.5, 1.0]):
        assert (r.step, r.weight(), r.shadowing()) == (step, weight, step == 0)
        r.add(counters(1000), counters(150, agreed=150) if step == 0 else counters(150))
        assert r.tick(now + 5) is None   # the interval is not over
        now += 10
        assert r.tick(now)["action"] == "promote"
    assert r.status is Status.PROMOTED and r.weight() == 1.0
    assert [h["step"] for h in r.history] == [0, 1, 2, 3, 4]


def test_a_bad_candidate_is_rolled_back_with_the_numbers_that_decided():
    r = _rollout()
    r.add(counters(1000), counters(150, agreed=20))
    record = r.tick(1010.0)
    assert r.status is Status.ROLLED_BACK and r.weight() == 0 and record["status"] == "rolled_back"
    assert record["measurements"][0]["name"] == "agreement" and record["measurements"][0]["phase"] == "Failed"


def test_a_rollout_without_data_is_rolled_back_after_max_inconclusive_analyses():
    r = _rollout(POLICY.model_copy(update={"max_inconclusive": 3}))
    for i in range(1, 4):
        r.tick(1000.0 + 10 * i)
    assert r.status is Status.ROLLED_BACK and "no verdict in 3 analyses" in r.history[-1]["reason"]


def test_commands_move_the_rollout_and_refuse_once_it_ended():
    r = _rollout()
    assert r.command("promote", 1001.0)["step"] == 0 and r.step == 1 and r.current.requests == 0
    r.command("abort", 1002.0)
    assert r.status is Status.ABORTED and r.weight() == 0
    with pytest.raises(RolloutError, match="has ended"):
        r.command("promote", 1003.0)
    with pytest.raises(RolloutError, match="unknown command"):
        _rollout().command("skip", 1003.0)


def test_the_state_round_trips_through_json_mid_step():
    r = _rollout()
    r.add(counters(300, errors=2), counters(40, agreed=39))
    r.tick(1010.0)
    again = Rollout.from_dict(json.loads(json.dumps(r.to_dict())))
    assert again == r and again.summary()["candidate_compared"] == 40


# --- the split ----------------------------------------------------------------------------------

@given(st.floats(0, 1), st.text(min_size=1))
def test_a_session_lands_on_one_side_on_every_call(weight, key):
    assert len({assign(weight, key, "r1") for _ in range(3)}) == 1


@given(st.text(min_size=1), st.floats(0.01, 0.5), st.floats(0.5, 0.99))
def test_a_session_on_the_candidate_stays_there_as_the_weight_grows(key, low, high):
    if assign(low, key, "r1") == CANDIDATE:
        assert assign(high, key, "r1") == CANDIDATE


def test_the_split_matches_the_weight_with_and_without_session_keys():
    rng = random.Random(0)
    keyed = sum(assign(0.25, f"user-{i}", "r1") == CANDIDATE for i in range(20_000)) / 20_000
    unkeyed = sum(assign(0.25, None, "r1", rng) == CANDIDATE for _ in range(20_000)) / 20_000
    assert abs(keyed - 0.25) < 0.015 and abs(unkeyed - 0.25) < 0.015
    assert assign(0.0, "u", "r1") == STABLE and assign(1.0, "u", "r1") == CANDIDATE


# --- the shared store ---------------------------------------------------------------------------

def _replica(path: str, seed: int) -> None:
    """A Router replica in its own process: counts 50 requests in 10 syncs."""
    store = RolloutStore(path)
    for i in range(10):
        store.sync(counters(5), counters(5, agreed=5), now=1000.0 + seed * 0.01 + i * 0.001)


def test_replicas_in_separate_processes_add_up_to_one_state_and_a_restart_resumes_it(tmp_path):
    store = RolloutStore(tmp_path / "canary" / "switchboard.json")
    store.update(lambda _: _rollout())
    procs = [multiprocessing.get_context("spawn").Process(target=_replica, args=(str(store.path), i))
             for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    resumed = RolloutStore(store.path).load()   # what a restarted replica reads
    assert resumed.current.compared == 200 and resumed.baseline.requests == 200 and resumed.step == 0
    after = store.sync(Counters(), Counters(), now=1011.0)
    assert after.step == 1 and after.history[-1]["action"] == "promote"
