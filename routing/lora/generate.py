"""Batched generation over a mixed batch: one `model.generate` call, each row with its own adapters.

Rows are left-padded into one batch, the per-row routing is set once and held for the whole call
(prefill and every decoding step, with the KV cache), and each row stops on its own token budget,
its own stop strings or EOS; the call ends when every row is done.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from routing.lora.model import FusedLoraModel

FinishReason = Literal["stop", "length", "eos"]


@dataclass
class Generation:
    """One row's result. `text` excludes the prompt, the stop string and EOS."""

    text: str
    new_tokens: int  # tokens the row generated up to its end (EOS / the stop string's last token included)
    finish_reason: FinishReason
    token_ids: list[int] = field(default_factory=list)  # those `new_tokens` ids


class _RowsDone(StoppingCriteria):
    """Per-row stop: own token budget reached, or own stop string in the decoded new text.

    Returns the (B,) done mask; transformers pads finished rows and ends when all are done.
    """

    def __init__(self, tokenizer, prompt_len: int, budgets: list[int], stops: list[list[str]], device):
        self.tokenizer, self.prompt_len, self.stops = tokenizer, prompt_len, stops
        self.budgets = torch.tensor(budgets, device=device)
        self.done = torch.zeros(len(budgets), dtype=torch.bool, device=device)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        n = input_ids.shape[1] - self.prompt_len
        self.done |= n >= self.budgets
        for b, stops in enumerate(self.stops):  # bookkeeping on text, not model math
            if stops and not self.done[b]:
                text = self.tokenizer.decode(input_ids[b, self.prompt_len:], skip_special_tokens=True)
                if any(s in text for s in stops):
                    self.done[b] = True
        return self.done.clone()


def _finish(tokenizer, ids: list[int], budget: int, stops: list[str], eos_ids: set[int]) -> Generation:
    ids = ids[:budget]
    reason: FinishReason = "length"
    for i, t in enumerate(ids):
        if t in eos_ids:
            ids, reason = ids[:i + 1], "eos"
            break
    content = ids[:-1] if reason == "eos" else ids
    text = tokenizer.decode(content, skip_special_tokens=True)
    hits = [(text.find(s), s) for s in stops if s in text]
    if hits:
        pos = min(hits)[0]
        text, reason = text[:pos], "stop"
        for n in range(1, len(content) + 1):  # the shortest prefix that completes a stop string
            prefix = tokenizer.decode(content[:n], skip_special_tokens=True)
            if any(s in prefix for s in stops):
                ids = content[:n]
                break
    return Generation(text=text, new_tokens=len(ids), finish_reason=reason, token_ids=list(ids))


def generate(fused: FusedLoraModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
             routes: list[list[tuple[str, float]]], max_new_tokens: list[int] | int = 32,
             stop: list[list[str]] | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, seed: int | None = None, ignore_eos: bool = False) -> list[Generation]:
    """Generate for a mixed batch in one `generate` call; row b uses `routes[b]` ([] = bare base).

    `max_new_tokens` and `stop` are per row (an int applies to all). Greedy unless `do_sample`;
    sampling uses only temperature and top_p (no implicit top_k), and `seed` seeds a forked RNG
    (a row's samples then still depend on the batch it shares the RNG with). `ignore_eos` keeps
    generating past EOS (benchmarks). The tokenizer's padding side is left for the call.
    """
    n = len(prompts)
    if len(routes) != n:
        raise ValueError(f"{n} prompts but {len(routes)} routes")
    budgets = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != n or any(int(m) < 1 for m in budgets):
        raise ValueError(f"max_new_tokens must be an int >= 1 or one such per prompt, got {max_new_tokens!r}")
    if stop is not None and any(isinstance(row, str) for row in stop):   # list("###") would be three stops
        raise ValueError("stop must hold one list of strings per prompt, not a string")
    stops = [list(s or []) for s in stop] if stop is not None else [[] for _ in range(n)]
    if len(stops) != n or any(s == "" for row in stops for s in row):
        raise ValueError("stop must hold one list of non-empty strings per prompt")
    if n == 0:
        return []
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token (routing.base_models.load_tokenizer sets one)")

    model = fused.model
    gen_config = copy.deepcopy(model.generation_config)
    eos = gen_config.eos_token_id if gen_config.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = set() if ignore_eos or eos is None else set([eos] if isinstance(eos, int) else eos)
    gen_config.eos_token_id = sorted(eos_ids)  # [] never matches: no EOS stop
    gen_config.pad_token_id = tokenizer.pad_token_id
    gen_config.max_new_tokens, gen_config.max_length = max(budgets), None
    gen_config.do_sample, gen_config.use_cache, gen_config.num_beams = do_sample, True, 1
    if do_sample:
        gen_config.temperature, gen_config.top_p, gen_config.top_k = temperature, top_p, 0
    else:
        gen_config.temperature = gen_config.top_p = gen_config.top_k = None

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(fused.device)
    finally:
        tokenizer.padding_side = side
    prompt_len = enc["input_ids"].shape[1]
    criteria = _RowsDone(tokenizer, prompt_len, budgets, stops, fused.device)

    rng = torch.random.fork_rng(devices=[fused.device] if fused.device.type == "cuda" else [])
    with torch.inference_mode(), fused.routing(routes), (rng if seed is not None else contextlib.nullcontext()):
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(**enc, generation_config=gen_config,
                             stopping_criteria=StoppingCriteriaList([criteria]))
    new = out[:, prompt_len:].tolist()
    return [_finish(tokenizer, new[b], budgets[b], stops[b], eos_ids) for b in range(n)]
