"""Task metrics: how a generated answer is scored against the reference."""

from __future__ import annotations

import re
from typing import Callable

_SPACES = re.compile(r"\s+")


def _normalise(s: str) -> str:
    return _SPACES.sub(" ", s).strip().lower()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the answers agree up to case and whitespace."""
    return float(_normalise(prediction) == _normalise(reference))


def first_line_match(prediction: str, reference: str) -> float:
    """Exact match on the first line only: lets a model ramble after a correct answer."""
    return exact_match(prediction.strip().split("\n", 1)[0], reference)


METRICS: dict[str, Callable[[str, str], float]] = {"exact": exact_match, "first_line": first_line_match}


def score(metric: str, prediction: str, reference: str) -> float:
    try:
        fn = METRICS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; known: {sorted(METRICS)}") from None
    return fn(prediction, reference)
