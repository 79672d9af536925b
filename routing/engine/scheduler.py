"""`Scheduler`: decides, each step, who is admitted, which prompt chunks are prefilled and who decodes.

It never touches tensors (nano-vllm's split): it works on `Sequence` data and block counts, so it is
tested on its own, step by step. The runner turns its `StepPlan` into tensors.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from routing.engine.blocks import BlockManager
from routing.engine.config import EngineConfig
from routing.engine.sequence import FinishReason, Sequence, Status

MAX_SKIPS = 8
"""How often younger requests may be admitted past the oldest waiting one (held back by adapter slots)
before admission stops for everyone until it fits: bounded unfairness, no starvation."""


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound: try again later (RESOURCE_EXHAUSTED / HTTP 429)."""


class NeverFitsError(ValueError):
    """The request can never run on this engine (its KV reservation or adapter count is too large)."""


@dataclass(frozen=True)
class PrefillChunk:
    seq: Sequence
    start: int     # first prompt position of the chunk
    length: int    # prompt tokens in it

    @property
    def last(self) -> bool:
        """The chunk ends the prompt: its last position's logits give the first new token."""
        return self.start + self.length >= len(self.seq.prompt)


@dataclass
class StepPlan:
    prefills: list[PrefillChunk] = field(default_factory=list)
    decodes: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)   # retired before running (aborted)

    @property
    def empty(self) -> bool:
        return not (self.prefills or self.decodes)


class Scheduler:
    """FIFO admission into at most `max_num_seqs` running sequences, under two shared limits: KV blocks
    and the adapter slots of the fused model (a running sequence's adapters stay resident until it ends)."""

    def __init__(self, config: EngineConfig, adapter_slots: int):
        self.config = config
        self.adapter_slots = adapter_slots
        self.blocks = BlockManager(config.num_blocks, config.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._aborted: set[str] = set()
        self._skips = 0

    # ---- intake ---------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue `seq`. Raises `NeverFitsError` when it could never be admitted, `QueueFullError`
        when the queue is at its bound; both before anything changes."""
        need = self.blocks.needed(seq)
        if need > self.blocks.num_blocks:
            raise NeverFitsError(f"prompt ({len(seq.prompt)} tokens) plus budget ({seq.budget}) needs "
                                 f"{need * self.config.block_size} KV tokens; this replica has "
                                 f"{self.config.num_blocks * self.config.block_size}")
        if len(seq.adapters) > self.adapter_slots:
            raise NeverFitsError(f"the route fuses {len(seq.adapters)} adapters; this replica holds "
                                 f"{self.adapter_slots} at once")
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"{len(self.waiting)} requests are already waiting; retry later")
        self.waiting.append(seq)

    def abort(self, request_id: str) -> None:
        """Retire the request at the next step, wherever it is (its client has gone)."""
        self._aborted.add(request_id)

    @property
    def pinned_adapters(self) -> frozenset[str]:
        """Adapters that running sequences use: they must stay resident."""
        return frozenset().union(*(s.adapters for s in self.running))

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        if self._aborted:
            for seq in [s for s in (*self.waiting, *self.running) if s.request_id in self._aborted]:
                self.finish(seq, "abort")
                plan.finished.append(seq)
            self._aborted.clear()
        if self.config.admission == "continuous" or not self.running:
            self._admit()
        budget = self.config.prefill_chunk_tokens
        for seq in self.running:
            if seq.prefilled:
                if seq.output:
                    plan.decodes.append(seq)
            elif budget > 0:
                n = min(len(seq.prompt) - seq.computed, budget)
                plan.prefills.append(PrefillChunk(seq, seq.computed, n))
                budget -= n
        return plan

    def _admit(self) -> None:
        pinned = set(self.pinned_adapters)
        for seq in list(self.waiting):
            if len(self.running) >= self.config.max_num_seqs or not self.blocks.can_allocate(seq):
                break   # FIFO for seats and memory: the oldest goes first
            if len(pinned | seq.adapters) > self.adapter_slots:
                if seq is self.waiting[0]:
                    self._skips += 1
                    if self._skips > MAX_SKIPS:
                        break   # let running sequences drain until the oldest one's adapters fit
                continue
            if seq is self.waiting[0]:
                self._skips = 0
            self.waiting.remove(seq)
            self.blocks.allocate(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            pinned |= seq.adapters

    def advance(self, chunk: PrefillChunk) -> None:
        """Record a prefilled chunk."""
        chunk.seq.computed = chunk.start + chunk.length

    def append(self, seq: Sequence, token: int, eos_ids: frozenset[int]) -> bool:
        """Append a sampled token; finish on EOS or the budget. Returns whether `seq` finished."""
        seq.output.append(token)
        seq.computed = len(seq.tokens) - 1   # the new token's KV is written when it is fed back
        if token in eos_ids:
            self.finish(seq, "eos")
        elif len(seq.output) >= seq.budget:
            self.finish(seq, "length")
        return seq.finished

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Retire `seq`: free its blocks (and thereby its adapters' pins)."""
        if seq.finished:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason
