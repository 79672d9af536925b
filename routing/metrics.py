"""Task metrics: how a generated answer is scored against the reference, each in [0, 1].

One entry point, `score(metric, prediction, reference)`, and a name registry `METRICS`. LoRAuter
scores its tasks with their own metrics (App. C.5): exact match or accuracy for classification and
multiple choice, ROUGE / BLEU for generation. Scoring a generation task by exact match gives every
candidate adapter about 0, and Successive Halving can then tell none of them apart.

Normalisation (`normalise`): lower case, runs of whitespace collapsed to one space, ends stripped.
  exact       normalised prediction == normalised reference.
  first_line  `exact` on the prediction's first line only (a model may ramble after the answer).
  accuracy    a label match. When the reference names an option letter ("B", "(B)", "B. text",
              "B) text"), the prediction's leading option letter is compared (after an optional
              "answer:" prefix); otherwise both sides' first lines, normalised and stripped of
              surrounding punctuation and quotes, must be equal.
  rouge_l     ROUGE-L F1 (`rouge-score`, Porter stemming) over word tokens; CJK characters are one
              token each, since the package's default tokenizer drops every non-ASCII character.
  bleu        sentence BLEU (`sacrebleu`, smoothed by its default "exp" method) / 100, tokenized
              with sacrebleu's "zh" tokenizer when the reference holds CJK characters, else "13a".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

_SPACES = re.compile(r"\s+")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_TOKENS = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]|[^\W_]+")
_OPTION = re.compile(r"^(?:\(([A-J])\)|([A-J])(?=$|[.:)\]]))")
_ANSWER_PREFIX = re.compile(r"^(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is)?\s*[:：]?\s*", re.I)
_EDGE_PUNCTUATION = " \t.,;:!?\"'`()[]{}。，；：！？“”‘’「」"


def normalise(s: str) -> str:
    """Lower case, whitespace runs collapsed to one space, ends stripped."""
    return _SPACES.sub(" ", s).strip().lower()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the answers agree up to case and whitespace."""
    return float(normalise(prediction) == normalise(reference))


def first_line_match(prediction: str, reference: str) -> float:
    """Exact match on the first line only: lets a model ramble after a correct answer."""
    return exact_match(prediction.strip().split("\n", 1)[0], reference)


def option_letter(text: str) -> str | None:
    """The option letter a text starts with ("B", "(B) ...", "B. ...", "Answer: B"), or None. Only
    upper case counts, except for a lone letter: "a cat" names no option, "a" does."""
    text = _ANSWER_PREFIX.sub("", text.strip(), count=1)
    if len(text) == 1 and text.upper() in "ABCDEFGHIJ":   # a lone letter counts in either case
        return text.upper()
    m = _OPTION.match(text)
    return (m.group(1) or m.group(2)) if m else None


def _label(text: str) -> str:
    first = text.strip().split("\n", 1)[0]
    return normalise(first).strip(_EDGE_PUNCTUATION)


def accuracy(prediction: str, reference: str) -> float:
    """Label accuracy: the option letter when the reference has one, else the normalised first line."""
    letter = option_letter(reference)
    if letter is not None:
        return float(option_letter(prediction) == letter)
    return float(_label(prediction) == _label(reference))


class _WordTokenizer:
    """rouge-score's tokenizer interface: words, and CJK characters one by one, lower-cased and stemmed."""

    def __init__(self) -> None:
        from nltk.stem import porter

        self._stem = porter.PorterStemmer().stem

    def tokenize(self, text: str) -> list[str]:
        return [self._stem(t) if len(t) > 3 and t.isascii() else t for t in _TOKENS.findall(text.lower())]


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over word (and CJK character) tokens."""
    return float(_rouge().score(reference, prediction)["rougeL"].fmeasure)


def bleu(prediction: str, reference: str) -> float:
    """Sentence BLEU in [0, 1]."""
    from sacrebleu.metrics import BLEU

    tokenize = "zh" if _CJK.search(reference) else "13a"
    value = float(BLEU(tokenize=tokenize, effective_order=True).sentence_score(prediction, [reference]).score / 100)
    return min(1.0, value)   # sacrebleu's float sum can land a hair above 100


@dataclass(frozen=True)
class Metric:
    """A metric and the answers it needs: `short` ones are read off the first line, so generation
    may stop at a newline; the others score the whole answer, which must be generated in full."""

    fn: Callable[[str, str], float]
    short: bool


METRICS: dict[str, Metric] = {
    "exact": Metric(exact_match, short=True),
    "first_line": Metric(first_line_match, short=True),
    "accuracy": Metric(accuracy, short=True),
    "rouge_l": Metric(rouge_l, short=False),
    "bleu": Metric(bleu, short=False),
}


def get_metric(name: str) -> Metric:
    """The metric registered as `name`; a ValueError listing the known names otherwise."""
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}") from None


def score(metric: str, prediction: str, reference: str) -> float:
    """`prediction` scored against `reference` by the metric named `metric`, in [0, 1]."""
    return get_metric(metric).fn(prediction, reference)


# References that take at most this many distinct values (or this share of the rows), each repeated
# on average, form a label set; so do references of at most SHORT_WORDS tokens. See `infer_metric`.
# A task is multiple choice when this share of its references name an option letter.
LABEL_VALUES, LABEL_SHARE, SHORT_WORDS, OPTION_SHARE = 20, 0.05, 3, 0.9


def infer_metric(references: Sequence[str]) -> str:
    """The metric a task's references call for: `accuracy` when nearly all references name an option
    letter (OPTION_SHARE), when they repeat from a small label set, or when all are a few words long; `rouge_l`
    (free generation) otherwise."""
    if not references:
        raise ValueError("no references to infer a metric from")
    if sum(option_letter(r) is not None for r in references) >= OPTION_SHARE * len(references):
        return "accuracy"
    distinct = len({_label(r) for r in references})
    label_set = distinct <= max(LABEL_VALUES, LABEL_SHARE * len(references)) and 2 * distinct <= len(references)
    short = all(len(_TOKENS.findall(r)) <= SHORT_WORDS for r in references)
    return "accuracy" if label_set or short else "rouge_l"
