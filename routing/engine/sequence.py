"""`Sequence`: one request inside the engine — its tokens, route, budget, status and KV blocks."""

from __future__ import annotations

import enum
import itertools
import math
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "eos", "abort"]


@dataclass(frozen=True)
class SamplingParams:
    """Greedy by default (temperature 0). `seed` makes a sampled answer reproducible on its own:
    every sequence draws from its own generator, so its samples do not depend on its batch-mates."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"sampling temperature must be finite and >= 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """The scheduler's view of a request: plain data, no tensors.

    `routes` are (adapter key, weight) pairs, [] for the bare base; `budget` is the most new tokens
    it may make (already cut to the context). `computed` counts the tokens whose keys and values are
    in the KV cache; the prompt is prefilled when `computed >= len(prompt)`.
    """

    request_id: str
    prompt: list[int]
    routes: tuple[tuple[str, float], ...]
    budget: int
    sampling: SamplingParams = SamplingParams()
    status: Status = Status.WAITING
    output: list[int] = field(default_factory=list)
    computed: int = 0
    blocks: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    arrival: int = field(default_factory=lambda: next(_ids))   # admission order

    @property
    def adapters(self) -> frozenset[str]:
        return frozenset(k for k, _ in self.routes)

    @property
    def prefilled(self) -> bool:
        return self.computed >= len(self.prompt)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def reserved_tokens(self) -> int:
        """KV positions the sequence can ever need: prompt plus budget (the last token is never fed back)."""
        return len(self.prompt) + self.budget - 1

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
