"""How one server batch splits into `generate` calls.

Two things keep rows apart. A call can only use the adapters resident at once (`AdapterStore`
capacity), and K-way fusions can overflow it. And prompts are left-padded to the longest in the
call, in the prefill and in every decode step's attention: one 4,000-token prompt among 100-token
ones would make each of them pay for 4,000. The planner is pure, so it is tested on its own.

Calls run shortest prompts first: the Generator answers each call's rows as soon as it returns, so a
short request batched with a long one is not held until the long one is done.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

MAX_LENGTH_SPREAD = 2.0
"""A call's longest prompt is at most this many times any of its rows' (counted as at least
`SHORT_PROMPT_TOKENS`), so padding is at most half of a call's prefill beyond that floor."""

SHORT_PROMPT_TOKENS = 64
"""Prompts shorter than this count as this long: padding them is cheaper than another `generate` call."""


def plan_batches(adapters: Sequence[Collection[str]], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Row indices grouped into `generate` calls, each group in row order, the groups in the order to
    run them (by their longest prompt, shortest first).

    Rows are placed longest prompt first, each into the first group whose adapters plus its own
    fit `capacity` and whose longest prompt is within `MAX_LENGTH_SPREAD` of its own. A row that
    alone needs more than `capacity` adapters gets a group of its own (its call then fails alone).
    """
    if len(adapters) != len(lengths):
        raise ValueError(f"{len(adapters)} adapter sets for {len(lengths)} prompt lengths")
    groups: list[tuple[list[int], set[str], int]] = []   # rows, their adapters, the longest prompt
    for row in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        need, floor = set(adapters[row]), max(lengths[row], SHORT_PROMPT_TOKENS)
        for rows, names, longest in groups:
            if longest <= MAX_LENGTH_SPREAD * floor and len(names | need) <= capacity:
                rows.append(row)
                names |= need
                break
        else:
            groups.append(([row], need, lengths[row]))
    return [sorted(rows) for rows, _, _ in sorted(groups, key=lambda g: g[2])]
