"""Successive Halving: pair a task with its best adapter from a pool (LoRAuter §3.2, Algorithm 1).

Every round scores the surviving candidates on a fresh sample of the task's validation set, keeps the
top fraction `keep`, and grows the sample by `growth` after `warmup` rounds, until one is left, the
`rounds` cap R is reached, or the next round would overspend `budget` (adapter x sample evaluations);
the last two end with the best of the last round. The caller's `score` sees all survivors and the
round's samples at once, so it can evaluate them as one mixed multi-adapter batch.

A cut between candidates that tie with the round's best score is decided by candidate order, not by
the metric, and so is a final pick between equal scores; the result says so (`tied`), so a caller can
warn that the pool could not be told apart on this data. A tie below a clear leader (the usual case on
label tasks: one adapter at 1.0, the others at 0.0, one of the zeros kept by order) decides only who
loses to the leader next round, so it is not one.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

Score = Callable[[list[str], list[int]], dict[str, float]]


@dataclass(frozen=True)
class HalvingConfig:
    base_samples: int = 4      # m: validation samples per candidate in the first rounds
    keep: float = 0.5          # η: fraction of candidates kept each round
    growth: float = 2.0        # γ: sample growth per round after warmup
    warmup: int = 1            # k: rounds at the base sample size
    rounds: int | None = None  # R: at most this many rounds (None: until one candidate is left)
    budget: int | None = None  # at most this many candidate x sample evaluations (None: no cap)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.base_samples < 1 or not 0 < self.keep < 1 or self.growth <= 1 or self.warmup < 0:
            raise ValueError(f"bad halving config {self}: need base_samples >= 1, 0 < keep < 1, growth > 1, "
                             f"warmup >= 0")
        if (self.rounds is not None and self.rounds < 1) or (self.budget is not None and self.budget < 1):
            raise ValueError(f"bad halving config {self}: rounds and budget must be >= 1 when given")


@dataclass(frozen=True)
class HalvingResult:
    winner: str
    rounds: list[dict]         # per round: samples, scores of every candidate evaluated
    evaluations: int           # candidate x sample evaluations spent
    tied: bool = False         # the leader could not be told apart: decided by order (module docstring)

    def to_dict(self) -> dict:
        return {"winner": self.winner, "rounds": self.rounds, "evaluations": self.evaluations, "tied": self.tied}


def successive_halving(candidates: list[str], n_samples: int, score: Score,
                       config: HalvingConfig = HalvingConfig()) -> HalvingResult:
    if not candidates:
        raise ValueError("no candidate adapters")
    if n_samples < 1:
        raise ValueError("no validation samples to score candidates on")
    if config.budget is not None and config.budget < len(candidates):
        raise ValueError(f"a budget of {config.budget} evaluations cannot score {len(candidates)} candidates once")
    rng = random.Random(config.seed)
    alive, rounds, spent, r, tied = list(candidates), [], 0, 0, False
    while len(alive) > 1 and (config.rounds is None or r < config.rounds):
        grown = config.growth ** (r - config.warmup + 1)
        m = min(n_samples, config.base_samples if r < config.warmup else math.ceil(config.base_samples * grown))
        if config.budget is not None:
            m = min(m, (config.budget - spent) // len(alive))
            if m < 1:
                break
        sample = rng.sample(range(n_samples), m)
        scores = score(alive, sample)
        spent += len(alive) * len(sample)
        rounds.append({"samples": len(sample), "scores": {c: round(scores[c], 4) for c in alive}})
        # Stable order: ties keep the earlier candidate, so results do not depend on dict order.
        # At least one candidate drops each round (keep = 0.6 of 2 would otherwise keep both forever).
        q = min(len(alive) - 1, max(1, math.ceil(config.keep * len(alive))))
        ranked = sorted(alive, key=lambda c: -scores[c])
        tied |= scores[ranked[0]] == scores[ranked[q - 1]] == scores[ranked[q]]
        alive = ranked[:q]
        r += 1
    # Stopped by R or the budget with several left: the best of the last round (ranked first) wins.
    if len(alive) > 1:
        last = rounds[-1]["scores"]
        tied |= last[alive[0]] == last[alive[1]]
    return HalvingResult(alive[0], rounds, spent, tied)
