"""`Engine`: continuous batching over fused multi-LoRA rows. `step()` is schedule → run → postprocess.

Plain Python and torch, no Ray, no threads: the Serve deployment feeds `add`, calls `step` in its own
loop and streams the `Event`s out. Tests drive `step()` directly.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from routing.engine.config import EngineConfig
from routing.engine.runner import ModelRunner, rows_for
from routing.engine.sampler import sample
from routing.engine.scheduler import NeverFitsError, Scheduler
from routing.engine.sequence import FinishReason, SamplingParams, Sequence
from routing.engine.text import TextStream
from routing.lora.model import FusedLoraModel
from routing.lora.store import AdapterStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """What one step produced for one request: a text delta (possibly empty while a character or a
    possible stop string is incomplete), and on the last event why it ended. `error` is set when the
    request failed on the server side (its batch-mates go on)."""

    request_id: str
    text: str
    new_tokens: int
    finish_reason: FinishReason | None = None
    token_ids: tuple[int, ...] = ()            # on the last event: every new token (EOS / stop-completing token included)
    error: Exception | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class Engine:
    """One fused model, its adapters (`store`), a paged KV cache and a scheduler.

    `context` is the base model's context length: a prompt that leaves no room for a new token is
    refused, and a budget is cut to what the context has left (the answer then ends with "length").
    """

    def __init__(self, fused: FusedLoraModel, tokenizer: PreTrainedTokenizerBase, store: AdapterStore,
                 config: EngineConfig = EngineConfig(), context: int | None = None):
        self.fused, self.tokenizer, self.store, self.config, self.context = fused, tokenizer, store, config, context
        self.scheduler = Scheduler(config, adapter_slots=store.capacity)
        self.runner = ModelRunner(fused, config.num_blocks, config.block_size)
        eos = fused.model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
        self._streams: dict[str, TextStream] = {}
        self._generators: dict[str, torch.Generator | None] = {}

    # ---- intake ---------------------------------------------------------------------------------

    def add(self, request_id: str, prompt: list[int], routes: list[tuple[str, float]], max_new_tokens: int,
            stop: tuple[str, ...] = (), sampling: SamplingParams = SamplingParams()) -> None:
        """Queue a request. Raises `NeverFitsError` (prompt beyond the context, KV or adapter limits),
        `QueueFullError` (retry later) or `KeyError` (an adapter the store does not know), before
        anything changes."""
        if request_id in self._streams:
            raise ValueError(f"request {request_id} is already in the engine")
        if not prompt:
            raise NeverFitsError("the prompt has no tokens")
        if max_new_tokens < 1:
            raise NeverFitsError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if self.context is not None and len(prompt) >= self.context:
            raise NeverFitsError(f"the prompt is {len(prompt)} tokens; the base model's context is {self.context}")
        unknown = [k for k, _ in routes if k not in self.store.paths]
        if unknown:
            raise KeyError(f"adapters not in this engine's catalog: {unknown}")
        if not all(math.isfinite(w) for _, w in routes):
            raise ValueError(f"route weights must be finite: {routes}")
        budget = max_new_tokens if self.context is None else min(max_new_tokens, self.context - len(prompt))
        seq = Sequence(request_id, list(prompt), tuple(routes), budget, sampling)
        self.scheduler.add(seq)
        self._streams[request_id] = TextStream(self.tokenizer, tuple(stop))
        self._generators[request_id] = _generator(sampling, self.runner.device)

    def abort(self, request_id: str) -> None:
        """The client has gone: its sequence is retired at the next step and frees its slot."""
        self.scheduler.abort(request_id)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ---- one step -------------------------------------------------------------------------------

    def step(self) -> list[Event]:
        plan = self.scheduler.schedule()
        events = [self._end(s) for s in plan.finished]
        if plan.empty:
            return events
        failed = self._load_adapters()
        if failed:
            events += [self._fail(s, e) for s, e in failed]
            plan.prefills = [c for c in plan.prefills if not c.seq.finished]
            plan.decodes = [s for s in plan.decodes if not s.finished]
            if plan.empty:
                return events
        try:
            sampled = self._run(plan)
        except Exception as e:  # noqa: BLE001 - fails this step's sequences, not the engine
            log.exception("engine: a step of %d prefill and %d decode rows failed", len(plan.prefills),
                          len(plan.decodes))
            seqs = [c.seq for c in plan.prefills] + plan.decodes
            return events + [self._fail(s, e) for s in seqs]
        for seq, token in sampled:
            events.append(self._emit(seq, token))
        return events

    def _run(self, plan) -> list[tuple[Sequence, int]]:
        """The step's one forward pass (prefill chunks and decode rows packed together) and its samples."""
        wanted = [c.last for c in plan.prefills] + [True] * len(plan.decodes)
        logits = self.runner.forward(rows_for(plan.prefills, plan.decodes), wanted)
        for chunk in plan.prefills:
            self.scheduler.advance(chunk)
        sampled = [c.seq for c in plan.prefills if c.last] + plan.decodes
        return list(zip(sampled, self._sample(logits, sampled)))

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        return sample(logits, [s.sampling for s in seqs], [self._generators[s.request_id] for s in seqs])

    def _load_adapters(self) -> list[tuple[Sequence, Exception]]:
        """Make the running sequences' adapters resident (new ones load; unpinned ones may be evicted).
        A sequence whose adapter cannot load fails alone."""
        pinned = self.scheduler.pinned_adapters
        if all(k in self.store for k in pinned):
            return []
        try:
            self.store.ensure(sorted(pinned))
            return []
        except Exception:  # noqa: BLE001 - find the sequences at fault, below
            pass
        failed, ok = [], set()
        for seq in list(self.scheduler.running):
            try:
                self.store.ensure(sorted(ok | seq.adapters))
                ok |= seq.adapters
            except Exception as e:  # noqa: BLE001 - that request's error alone
                failed.append((seq, e))
        return failed

    # ---- postprocess ----------------------------------------------------------------------------

    def _emit(self, seq: Sequence, token: int) -> Event:
        if self.scheduler.append(seq, token, self.eos_ids):
            return self._end(seq)
        delta, stopped = self._streams[seq.request_id].push(seq.output)
        if stopped:
            self.scheduler.finish(seq, "stop")
            return self._end(seq, delta=delta)
        return Event(seq.request_id, delta, len(seq.output))

    def _fail(self, seq: Sequence, error: Exception) -> Event:
        self.scheduler.finish(seq, "abort")
        return self._end(seq, error=error)

    def _end(self, seq: Sequence, delta: str = "", error: Exception | None = None) -> Event:
        stream = self._streams.pop(seq.request_id)
        self._generators.pop(seq.request_id)
        if seq.finish_reason in ("length", "eos"):
            content = seq.output[:-1] if seq.finish_reason == "eos" else seq.output
            delta = stream.finish(content)
        return Event(seq.request_id, delta, len(seq.output), None if error else seq.finish_reason,
                     tuple(seq.output), error)


def _generator(sampling: SamplingParams, device: torch.device) -> torch.Generator | None:
    if sampling.greedy:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return g
