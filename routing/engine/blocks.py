"""`BlockManager`: which KV blocks are free. Pure bookkeeping; the runner owns the tensors."""

from __future__ import annotations

import math
from collections import deque

from routing.engine.sequence import Sequence


class BlockManager:
    """A free list of `num_blocks` blocks of `block_size` tokens.

    A sequence reserves every block it can ever need (prompt + budget) when it is admitted and
    frees them when it finishes: nothing running ever waits for memory or is preempted, at the
    price of holding the unused tail of a budget until the sequence ends (vLLM allocates block by
    block and preempts instead; with the budgets our requests carry the reservation is simpler and
    cannot deadlock).
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def free(self) -> int:
        return len(self._free)

    def needed(self, seq: Sequence) -> int:
        return math.ceil(seq.reserved_tokens / self.block_size)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.needed(seq) <= len(self._free)

    def allocate(self, seq: Sequence) -> None:
        if seq.blocks:
            raise RuntimeError(f"sequence {seq.request_id} already holds blocks")
        n = self.needed(seq)
        if n > len(self._free):
            raise RuntimeError(f"sequence {seq.request_id} needs {n} blocks, {len(self._free)} are free")
        seq.blocks = [self._free.popleft() for _ in range(n)]

    def release(self, seq: Sequence) -> None:
        self._free.extend(seq.blocks)
        seq.blocks = []
