"""The canary analysis: from per-version counters of one step to promote, hold or roll back, with the numbers.

A pure function (`analyze`) of the policy, the step and two `Counters`: stable's since the rollout
began (the baseline: at 100% stable answers nothing, so a per-step baseline would be empty) and the
candidate's since the step began. No clock, no I/O: every verdict can be replayed from the state file.
In a shadow step the candidate only routes, so its routing is judged (agreement with stable, labelled
accuracy); in split steps its serving too (error rate, p99 latency against stable's).
Like an Argo Rollouts AnalysisRun, each check is a `Measurement` that is Successful, Failed or
Inconclusive (too little data to say); any Failed rolls back, all Successful promotes, otherwise hold.

Counters add up (`+`), so each Router replica counts on its own and the shared state sums them.
Latency is a histogram over fixed log-spaced buckets, so p99 merges across replicas in bounded space.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from .policy import Policy

# Bucket upper bounds in ms: 1 ms .. ~100 s, 10 per decade (p99 is read as its bucket's upper bound: <= 26% high).
LATENCY_BOUNDS_MS: tuple[float, ...] = tuple(round(10 ** (i / 10), 3) for i in range(0, 51))


@dataclass
class Counters:
    """What one version did over a step. `compared`/`agreed`: shadow routings of the same request."""

    requests: int = 0
    errors: int = 0
    compared: int = 0
    agreed: int = 0
    labelled: int = 0
    correct: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_MS) + 1))

    def record(self, *, ok: bool, latency_ms: float, agreed: bool | None = None, correct: bool | None = None) -> None:
        self.requests += 1
        self.errors += not ok
        self.latency[bisect.bisect_left(LATENCY_BOUNDS_MS, latency_ms)] += 1
        if agreed is not None:
            self.compared += 1
            self.agreed += agreed
        if correct is not None:
            self.labelled += 1
            self.correct += correct

    def __add__(self, other: "Counters") -> "Counters":
        merged = {k: getattr(self, k) + getattr(other, k) for k in ("requests", "errors", "compared", "agreed",
                                                                     "labelled", "correct")}
        return Counters(**merged, latency=[a + b for a, b in zip(self.latency, other.latency)])

    def p99_ms(self) -> float | None:
        total = sum(self.latency)
        if not total:
            return None
        rank, seen = math.ceil(0.99 * total), 0
        for bound, n in zip((*LATENCY_BOUNDS_MS, math.inf), self.latency):
            seen += n
            if seen >= rank:
                return bound
        raise AssertionError("the histogram's counts sum to its total")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Counters":
        return cls(**d)


class Phase(str, Enum):
    SUCCESSFUL = "Successful"
    FAILED = "Failed"
    INCONCLUSIVE = "Inconclusive"


class Action(str, Enum):
    PROMOTE = "promote"
    HOLD = "hold"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class Measurement:
    name: str
    phase: Phase
    value: float | None
    limit: float | None
    detail: str


@dataclass(frozen=True)
class Decision:
    action: Action
    step: int
    measurements: tuple[Measurement, ...]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action.value, "step": self.step, "reason": self.reason,
                "measurements": [{**asdict(m), "phase": m.phase.value} for m in self.measurements]}


def _rate(n: int, d: int) -> float | None:
    return n / d if d else None


def _measure(name: str, value: float | None, limit: float, ok: bool, enough: bool, detail: str) -> Measurement:
    phase = Phase.INCONCLUSIVE if value is None or not enough else (Phase.SUCCESSFUL if ok else Phase.FAILED)
    return Measurement(name, phase, None if value is None else round(value, 6), round(limit, 6), detail)


def measurements(policy: Policy, step: int, stable: Counters, candidate: Counters) -> tuple[Measurement, ...]:
    """Every check that applies at `step`, measured on the counters."""
    c, n = policy.checks, candidate.compared if policy.is_shadow(step) else candidate.requests
    enough = n >= policy.min_requests
    need = f"{n}/{policy.min_requests} requests"
    out = []
    if policy.is_shadow(step):   # the candidate only routed: judge its routing, not its serving
        agreement = _rate(candidate.agreed, candidate.compared)
        out.append(_measure("agreement", agreement, c.min_agreement, (agreement or 0) >= c.min_agreement, enough,
                            f"top-1 same as stable on {candidate.agreed}/{candidate.compared}; {need}"))
    else:
        stable_err, cand_err = _rate(stable.errors, stable.requests) or 0.0, _rate(candidate.errors, candidate.requests)
        out.append(_measure("error_rate", cand_err, stable_err + c.error_rate_margin,
                            (cand_err or 0) <= stable_err + c.error_rate_margin, enough,
                            f"{candidate.errors}/{candidate.requests} vs stable {stable.errors}/{stable.requests}; "
                            f"{need}"))
        p99_s, p99_c = stable.p99_ms(), candidate.p99_ms()
        ratio = p99_c / p99_s if p99_s and p99_c is not None else None
        out.append(_measure("p99_latency_ratio", ratio, c.max_p99_latency_ratio,
                            (ratio or 0) <= c.max_p99_latency_ratio, enough,
                            f"p99 {p99_c} ms vs stable {p99_s} ms; {need}"))
    acc_s, acc_c = _rate(stable.correct, stable.labelled), _rate(candidate.correct, candidate.labelled)
    floor = (acc_s or 0.0) - c.accuracy_margin
    labelled = candidate.labelled >= c.min_labelled and stable.labelled >= c.min_labelled
    out.append(_measure("accuracy", acc_c if acc_s is not None else None, floor, (acc_c or 0) >= floor, labelled,
                        f"{candidate.correct}/{candidate.labelled} vs stable {stable.correct}/{stable.labelled} "
                        f"labelled; {min(candidate.labelled, stable.labelled)}/{c.min_labelled} needed"))
    return tuple(out)


def analyze(policy: Policy, step: int, stable: Counters, candidate: Counters) -> Decision:
    """Promote when every check that must pass did, roll back when one failed, hold while data is short."""
    ms = measurements(policy, step, stable, candidate)
    failed = [m.name for m in ms if m.phase is Phase.FAILED]
    optional = set() if policy.checks.require_accuracy else {"accuracy"}
    pending = [m.name for m in ms if m.phase is Phase.INCONCLUSIVE and m.name not in optional]
    if failed:
        return Decision(Action.ROLLBACK, step, ms, f"failed: {', '.join(failed)}")
    if pending:
        return Decision(Action.HOLD, step, ms, f"inconclusive: {', '.join(pending)}")
    return Decision(Action.PROMOTE, step, ms, "every required check passed")
