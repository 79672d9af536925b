"""The Admin service's pure parts (who may call, what it answers) and the Feedback request id, without Ray."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from routing.decision import RouteDecision
from serve_app.admin import refusal, status_pb
from serve_app.canary.gate import CanaryGate
from serve_app.canary.policy import Policy
from serve_app.canary.state import CANDIDATE, STABLE, Rollout, RolloutStore
from serve_app.ingress import issue_request_id, read_request_id

TOKEN = "0123456789abcdef0123"


@pytest.mark.parametrize("metadata, configured, code", [
    ((), None, grpc.StatusCode.PERMISSION_DENIED),                       # no token configured: the service is off
    ((("authorization", f"Bearer {TOKEN}"),), None, grpc.StatusCode.PERMISSION_DENIED),
    ((), TOKEN, grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", TOKEN),), TOKEN, grpc.StatusCode.UNAUTHENTICATED),   # not a bearer credential
    ((("authorization", "Bearer "),), TOKEN, grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", f"Bearer {TOKEN}x"),), TOKEN, grpc.StatusCode.PERMISSION_DENIED),
    ((("Authorization", f"Bearer {TOKEN}"),), TOKEN, None),
])
def test_who_may_call_admin(metadata, configured, code):
    refused = refusal(metadata, configured)
    assert (refused and refused[0]) == code
    if configured is None:
        assert "admin_token" in refused[1]   # says why, and what to set


def test_a_status_with_its_decision_becomes_the_message(tmp_path):
    store = RolloutStore(tmp_path / "state.json")
    policy = Policy(steps=["shadow", 50, 100], min_requests=1, interval_s=1)
    rollout = store.update(lambda _: Rollout.begin({"catalog": "/c/1", "version": "v1"},
                                                   {"catalog": "/c/2", "version": "v2"}, policy, now=0.0))
    rollout.tick(5.0)   # no data: a hold with Inconclusive measurements (value None)
    msg = status_pb(rollout.summary())
    assert msg.steps == ["shadow", "50", "100"] and msg.shadow and msg.candidate.version == "v2"
    assert msg.last_decision.action == "hold"
    assert {m.name: m.HasField("value") for m in msg.last_decision.measurements} == {"agreement": False,
                                                                                      "accuracy": False}


@given(version=st.text(min_size=1, max_size=20), top=st.text(min_size=1, max_size=40),
       rollout=st.one_of(st.none(), st.tuples(st.text(alphabet="0123456789abcdef", min_size=12, max_size=12),
                                              st.integers(0, 10))))
def test_a_request_id_carries_what_feedback_needs(version, top, rollout):
    decision = RouteDecision(((top, 1.0),), "centroid", version)
    assert read_request_id(issue_request_id(decision, rollout)) == (version, top, rollout)


@pytest.mark.parametrize("bad", ["", "abc", "abc.def", "abc.bm90IGpzb24=", "x.WzEsIDJd"])
def test_an_id_this_server_did_not_issue_is_not_found(bad):
    with pytest.raises(LookupError, match="not issued"):
        read_request_id(bad)


def test_the_gate_knows_each_version_s_side_and_takes_late_labels(tmp_path):
    store = RolloutStore(tmp_path / "state.json")
    store.update(lambda _: Rollout.begin({"catalog": "/c/1", "version": "v1"}, {"catalog": "/c/2", "version": "v2"},
                                         Policy(steps=[50, 100]), now=0.0))
    gate = CanaryGate(store)
    assert (gate.side_of("v1"), gate.side_of("v2"), gate.side_of("v3")) == (STABLE, CANDIDATE, None)
    gate.label(CANDIDATE, True)
    gate.label(CANDIDATE, False)
    rollout = gate.tick(now=1.0)
    assert (rollout.current.labelled, rollout.current.correct, rollout.current.requests) == (2, 1, 0)
