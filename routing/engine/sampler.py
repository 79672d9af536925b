"""Next-token choice per row: greedy, or temperature + nucleus sampling from the row's own generator."""

from __future__ import annotations

import torch

from routing.engine.sequence import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of `logits` (n, V), float32.

    Greedy rows take the argmax (ties go to the lowest id, as in `transformers`). Sampled rows draw
    from softmax(logits / temperature) restricted to the smallest set of tokens whose probability
    reaches `top_p`, using their own generator, so a seeded request draws the same tokens whatever
    its batch-mates are.
    """
    out = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        probs = torch.softmax(logits[i] / p.temperature, dim=-1)
        if p.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < p.top_p       # the top token is always kept
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        out[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return out
