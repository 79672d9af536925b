"""`EngineConfig`: the engine's knobs, checked once (nano-vllm's `config.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Admission = Literal["continuous", "static"]


@dataclass(frozen=True)
class EngineConfig:
    """How many sequences run at once, how much KV cache they share, how a long prompt is cut up.

    Attributes:
        max_num_seqs: sequences decoding together in one step (rows of the decode batch).
        kv_cache_tokens: the KV budget of the replica in tokens, shared by all sequences; it is
            allocated once, up front, as `kv_cache_tokens // block_size` blocks.
        block_size: tokens per KV block. A sequence reserves the blocks for its prompt plus its
            whole token budget when it is admitted, so a running sequence never waits for memory.
        prefill_chunk_tokens: prompt tokens prefilled per step, over all prefilling sequences: a
            long prompt is prefilled over several steps while the running rows keep decoding.
        max_waiting: requests queued before new ones are refused (the server answers
            RESOURCE_EXHAUSTED / HTTP 429 rather than an unbounded wait).
        admission: "continuous" admits waiting requests at every step; "static" only when the
            running batch has drained (classic request-level batching: the benchmark's baseline).
    """

    max_num_seqs: int = 32
    kv_cache_tokens: int = 16384
    block_size: int = 16
    prefill_chunk_tokens: int = 256
    max_waiting: int = 1024
    admission: Admission = "continuous"

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "kv_cache_tokens", "block_size", "prefill_chunk_tokens", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_tokens < self.block_size:
            raise ValueError(f"kv_cache_tokens {self.kv_cache_tokens} holds no whole block of {self.block_size}")
        if self.admission not in ("continuous", "static"):
            raise ValueError(f"admission must be 'continuous' or 'static', got {self.admission!r}")

    @property
    def num_blocks(self) -> int:
        return self.kv_cache_tokens // self.block_size
