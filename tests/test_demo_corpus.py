"""The demo corpus: deterministic, disjoint splits, valid records, and pre-training text without answers."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from routing.metrics import METRICS
from routing.templates import template_for
from training.demo_corpus import (CORPUS_VERSION, DEMO_TASKS, SPLIT_SIZES, TASKS_BY_KEY, demo_records,
                                  pretraining_texts, write_demo_corpus)
from training.records import group_by_task, load_records

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def splits():
    return {s: demo_records(s) for s in SPLITS}


def test_tasks_cover_three_domains():
    domains = Counter(t.domain for t in DEMO_TASKS)
    assert len(DEMO_TASKS) >= 9
    assert set(domains) >= {"fin", "legal", "med"} and all(n >= 3 for n in domains.values())
    assert len(TASKS_BY_KEY) == len(DEMO_TASKS)  # keys are unique
    for task in DEMO_TASKS:
        assert task.metric in METRICS
        assert "{text}" in template_for([task.instruction])


def test_records_are_deterministic(splits):
    assert demo_records("test") == splits["test"]
    assert demo_records("train") == splits["train"]
    assert demo_records("test", seed=1) != splits["test"]
    assert pretraining_texts() == pretraining_texts()


def test_split_sizes_and_disjoint_inputs(splits):
    for split, records in splits.items():
        per_task = Counter(r.key for r in records)
        assert set(per_task) == set(TASKS_BY_KEY)
        assert set(per_task.values()) == {SPLIT_SIZES[split]}
    assert 300 <= SPLIT_SIZES["train"] <= 600
    inputs = {s: {(r.key, r.input) for r in records} for s, records in splits.items()}
    for s in SPLITS:
        assert len(inputs[s]) == len(splits[s]), f"repeated input within {s}"
    assert not inputs["train"] & inputs["val"]
    assert not inputs["train"] & inputs["test"]
    assert not inputs["val"] & inputs["test"]


def test_records_are_valid_and_short(splits, tmp_path):
    paths = write_demo_corpus(tmp_path)
    assert set(paths) == set(SPLITS)
    for split, path in paths.items():
        assert load_records(path) == splits[split]  # the loader's checks accept every row
    for records in splits.values():
        for r in records:
            task = TASKS_BY_KEY[r.key]
            assert r.instruction == task.instruction and r.output.strip() == r.output and r.output
            assert len(r.output.split()) <= 5, r
    # Labels are balanced enough that always answering the majority label is not a strategy.
    for key, rows in group_by_task(splits["train"]).items():
        top = Counter(r.output for r in rows).most_common(1)[0][1]
        assert top / len(rows) < 0.6, key


def test_generators_are_pure_functions_of_the_rng():
    for task in DEMO_TASKS:
        assert task.make(random.Random(7)) == task.make(random.Random(7))


def test_pretraining_text_never_pairs_an_input_with_its_answer(splits):
    texts = pretraining_texts()
    joined = "\n".join(texts)
    assert "### " not in joined  # no template: the base never sees the prompt format
    for task in DEMO_TASKS:
        assert task.instruction not in joined
    for records in splits.values():
        for r in records:
            assert f"{r.input}\n{r.output}" not in joined
            assert f"{r.input} {r.output}" not in joined
    # Documents holding task inputs never contain an answer that is not itself part of an input
    # (labels, expansions): the base sees those only in answer-only documents.
    input_docs = "\n".join(t for t in texts if "\nKeywords:\n" in t)
    assert input_docs
    answers = {r.output for rs in splits.values() for r in rs
               if r.output not in r.input and not any(c.isdigit() for c in r.output)}
    assert {"positive", "negative", "yes", "no"} <= answers
    for answer in answers:
        assert not re.search(rf"\b{re.escape(answer)}\b", input_docs), answer


def test_corpus_version_is_named():
    assert CORPUS_VERSION.startswith("demo-")
