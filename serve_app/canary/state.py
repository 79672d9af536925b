"""The rollout state machine, and where it lives so that every Router replica acts on one state.

    start -> step 0 (e.g. shadow) -> analysis each interval: promote (next step) / hold / rollback
          -> after the last step (100%): promoted, the candidate is the new stable
    by command at any time while running: promote (next step now), rollback, abort

`Rollout` is plain data with pure transitions (`tick(now)`, `promote`, `rollback`, `abort`) and JSON
round-trips (`to_dict` / `from_dict`). `RolloutStore` keeps it in one JSON file, changed under an
exclusive `flock` and replaced atomically (write + rename), so Router replicas on one node, or on
several nodes sharing a volume, read and change one state; a replica killed and restarted reads the
step and counters back from the file. Each replica counts into its own `Counters` and adds them in
with `RolloutStore.sync` about once a second, which also runs the analysis when its interval is due:
a lost replica loses at most its last second of counts, never the rollout.

`assign` is the traffic split: sticky per session key (a hash, so every replica agrees without
talking), uniform at random for requests without one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from .analysis import Action, Counters, analyze
from .policy import Policy

STABLE, CANDIDATE = "stable", "candidate"


class Status(str, Enum):
    RUNNING = "running"
    PROMOTED = "promoted"        # the candidate passed every step and now serves all traffic
    ROLLED_BACK = "rolled_back"  # judged worse (or rolled back by command): stable serves all traffic
    ABORTED = "aborted"          # stopped by command: stable serves all traffic


class RolloutError(ValueError):
    """A command that does not apply to the rollout as it is (e.g. promote after it ended)."""


@dataclass
class Rollout:
    rollout_id: str
    stable: dict[str, str]         # {"catalog": DIR, "version": V}
    candidate: dict[str, str]
    policy: dict[str, Any]         # Policy as validated, so a restarted replica needs no file
    started_at: float
    step: int = 0
    status: Status = Status.RUNNING
    step_started_at: float = 0.0
    last_analysis_at: float = 0.0
    inconclusive: int = 0          # analyses in a row that held for lack of data
    baseline: Counters = field(default_factory=Counters)   # stable, since the rollout began
    current: Counters = field(default_factory=Counters)    # candidate, since the step began
    history: list[dict[str, Any]] = field(default_factory=list)   # every decision, with its numbers

    @classmethod
    def begin(cls, stable: dict[str, str], candidate: dict[str, str], policy: Policy, now: float) -> "Rollout":
        rollout_id = hashlib.sha256(f"{stable['version']}>{candidate['version']}@{now}".encode()).hexdigest()[:12]
        return cls(rollout_id, stable, candidate, policy.model_dump(), started_at=now, step_started_at=now,
                   last_analysis_at=now)

    @property
    def rules(self) -> Policy:
        return Policy.model_validate(self.policy)

    @property
    def running(self) -> bool:
        return self.status is Status.RUNNING

    def weight(self) -> float:
        """Share of requests the candidate answers now (0 in shadow and once the rollout ended badly)."""
        if self.status is Status.PROMOTED:
            return 1.0
        return self.rules.weight(self.step) if self.running else 0.0

    def shadowing(self) -> bool:
        return self.running and self.rules.is_shadow(self.step)

    def add(self, stable: Counters, candidate: Counters) -> None:
        self.baseline += stable
        self.current += candidate

    def tick(self, now: float) -> dict[str, Any] | None:
        """Run the analysis if its interval is due; return the decision record it made, if any."""
        rules = self.rules
        if not self.running or now - self.last_analysis_at < rules.interval_s:
            return None
        self.last_analysis_at = now
        decision = analyze(rules, self.step, self.baseline, self.current)
        record = {"at": now, "by": "analysis", "weight": rules.weight(self.step), **decision.to_dict()}
        if decision.action is Action.PROMOTE:
            self._next_step(now)
        elif decision.action is Action.ROLLBACK:
            self.status = Status.ROLLED_BACK
        else:
            self.inconclusive += 1
            if self.inconclusive >= rules.max_inconclusive:
                self.status = Status.ROLLED_BACK
                record["reason"] += f"; no verdict in {self.inconclusive} analyses: rolled back"
        record["status"] = self.status.value
        self.history.append(record)
        return record

    def command(self, verb: str, now: float) -> dict[str, Any]:
        """promote | rollback | abort, by an operator; returns the record written to the history."""
        if not self.running:
            raise RolloutError(f"rollout {self.rollout_id} has ended ({self.status.value}); start a new one")
        step = self.step
        if verb == "promote":
            self._next_step(now)
        elif verb == "rollback":
            self.status = Status.ROLLED_BACK
        elif verb == "abort":
            self.status = Status.ABORTED
        else:
            raise RolloutError(f"unknown command {verb!r}: promote, rollback or abort")
        record = {"at": now, "by": "command", "action": verb, "step": step, "status": self.status.value}
        self.history.append(record)
        return record

    def _next_step(self, now: float) -> None:
        self.inconclusive = 0
        self.current = Counters()
        self.step_started_at = self.last_analysis_at = now
        if self.step + 1 < len(self.policy["steps"]):
            self.step += 1
        else:
            self.status = Status.PROMOTED

    def summary(self) -> dict[str, Any]:
        """What `canary status` prints: where the rollout is and the last decision's numbers."""
        return {"rollout_id": self.rollout_id, "status": self.status.value, "step": self.step,
                "steps": self.policy["steps"], "weight": self.weight(), "shadow": self.shadowing(),
                "stable": self.stable, "candidate": self.candidate,
                "candidate_requests": self.current.requests, "candidate_compared": self.current.compared,
                "last_decision": self.history[-1] if self.history else None}

    def to_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in ("rollout_id", "stable", "candidate", "policy", "started_at", "step",
                                                 "step_started_at", "last_analysis_at", "inconclusive", "history")},
                "status": self.status.value, "baseline": self.baseline.to_dict(), "current": self.current.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Rollout":
        return cls(**{**d, "status": Status(d["status"]), "baseline": Counters.from_dict(d["baseline"]),
                      "current": Counters.from_dict(d["current"])})


def assign(weight: float, session_key: str | None, rollout_id: str, rng: random.Random | None = None) -> str:
    """STABLE or CANDIDATE for one request. A session key lands on the same side on every replica and every
    request of the rollout (and stays there as the weight grows: a session on the candidate at 5% is still
    on it at 25%); without one, a fair coin of bias `weight`."""
    if weight <= 0:
        return STABLE
    if weight >= 1:
        return CANDIDATE
    if session_key:
        digest = hashlib.sha256(f"{rollout_id}:{session_key}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") / 2**64
    else:
        point = (rng or random).random()
    return CANDIDATE if point < weight else STABLE


class RolloutStore:
    """One rollout's state in a JSON file, shared by every Router replica and the `canary` commands."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def load(self) -> Rollout | None:
        try:
            return Rollout.from_dict(json.loads(self.path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _save(self, rollout: Rollout) -> None:
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(rollout.to_dict(), indent=1), encoding="utf-8")
        os.replace(tmp, self.path)

    def update(self, change: Callable[[Rollout | None], Rollout]) -> Rollout:
        """Read, change and write the state as one step that no other replica or command interleaves with."""
        with self._locked():
            rollout = change(self.load())
            self._save(rollout)
            return rollout

    def sync(self, stable: Counters, candidate: Counters, now: float,
             counted_in: tuple[str, int] | None = None) -> Rollout | None:
        """A replica's counts since its last sync are added in, and the analysis runs if it is due.

        `counted_in` is the (rollout_id, step) the replica counted under: counts from an earlier step
        or rollout (another replica moved it on meanwhile) are dropped, not credited to the new one.
        """
        with self._locked():
            rollout = self.load()
            if rollout is None or not rollout.running:
                return rollout
            if counted_in is None or counted_in == (rollout.rollout_id, rollout.step):
                rollout.add(stable, candidate)
            rollout.tick(now)
            self._save(rollout)
            return rollout
