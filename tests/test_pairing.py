"""Successive Halving pairing on real adapters: weak and mismatched adapters lose to the right one."""

import json

import pytest

from routing.catalog import CatalogError
from routing.lora import AdapterLoadError
from routing.pairing import HalvingConfig, successive_halving
from routing.pseudo_tasks import pseudo_task_index
from training.adapter import TrainSpec, train_adapters
from training.catalog_build import build_catalog
from training.demo_corpus import demo_records
from training.pairing import IndistinguishableError, adapter_pool, answer_tokens, pair_catalog


def test_halving_schedule_and_budget():
    quality = {"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.3, "e": 0.7}
    calls = []

    def score(cands, sample):
        calls.append((sorted(cands), len(sample)))
        return {c: quality[c] for c in cands}

    res = successive_halving(list(quality), 100, score, HalvingConfig(base_samples=4, keep=0.5, growth=2, warmup=1))
    assert res.winner == "b"
    assert [n for _, n in calls] == [4, 8, 16] and [len(c) for c, _ in calls] == [5, 3, 2]
    assert res.evaluations == 5 * 4 + 3 * 8 + 2 * 16 < 5 * 100
    with pytest.raises(ValueError):
        successive_halving([], 10, score)
    # keep = 0.6 of two candidates rounds up to both: one must still drop, or the loop never ends.
    res = successive_halving(["a", "b"], 100, score, HalvingConfig(keep=0.6))
    assert res.winner == "b" and len(res.rounds) == 1


def test_halving_budget_rounds_and_ties():
    quality = {"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.3, "e": 0.7}
    score = lambda cands, sample: {c: quality[c] for c in cands}   # noqa: E731
    # The budget caps the evaluations: 5 x 4 = 20, then 3 x 8 = 24 would overspend 30, so 3 x 3.
    res = successive_halving(list(quality), 100, score, HalvingConfig(base_samples=4, budget=30))
    assert res.evaluations <= 30 and [r["samples"] for r in res.rounds][:2] == [4, 3] and res.winner == "b"
    with pytest.raises(ValueError, match="budget of 4 evaluations cannot score 5 candidates"):
        successive_halving(list(quality), 100, score, HalvingConfig(budget=4))
    res = successive_halving(list(quality), 100, score, HalvingConfig(rounds=1))
    assert len(res.rounds) == 1 and res.winner == "b" and not res.tied
    # Equal scores at a cut: the pick is pool order, and the result says so.
    flat = successive_halving(["x", "y", "z"], 100, lambda cands, sample: {c: 0.0 for c in cands})
    assert flat.winner == "x" and flat.tied
    # A tie below the cut does not matter: b and e are kept on score, a and d drop together.
    res = successive_halving(list(quality), 100, lambda cands, s: {**{c: 0.0 for c in cands},
                                                                   **{c: quality[c] for c in cands if c in "be"}},
                             HalvingConfig(keep=0.4))
    assert res.winner == "b" and not res.tied
    # A tie at the cut below a clear leader (TASA's label tasks: own adapter 1.0, the others 0.0) is not
    # one: one of the zeros is kept by order, but only to lose to the leader.
    res = successive_halving(["w", "x", "y", "z"], 100, lambda cands, s: {c: float(c == "y") for c in cands})
    assert res.winner == "y" and not res.tied and res.rounds[0]["scores"] == {"w": 0.0, "x": 0.0, "y": 1.0, "z": 0.0}
    # ... but one tied with the leader is: the cut between them falls by order.
    res = successive_halving(["w", "x", "y", "z"], 100, lambda cands, s: {c: float(c in "xyz") for c in cands},
                             HalvingConfig(keep=0.5))
    assert res.winner == "x" and res.tied


def test_answers_are_long_enough_for_long_answer_metrics(tiny_base):
    from routing.base_models import load_causal_lm

    _, tokenizer = load_causal_lm(tiny_base)
    long = " ".join(["inflammation"] * 80)
    assert answer_tokens(tokenizer, ["yes", long], short=True) == 24
    assert answer_tokens(tokenizer, ["yes", long], short=False) > len(tokenizer(long)["input_ids"])


def test_strict_pairing_refuses_a_pool_it_cannot_tell_apart(tmp_path, tiny_base):
    """Two copies of one adapter answer alike on every sample: the warning case, an error under strict."""
    key = "fin/ticker"
    train = [r for r in demo_records("train") if r.key == key]
    val = [r for r in demo_records("val") if r.key == key]
    weak = train_adapters(tiny_base, train, tmp_path / "weak", train=TrainSpec(max_steps=2), progress=False)
    pool = tmp_path / "pool"
    pool.mkdir()
    for name in ("copy-a", "copy-b"):
        (pool / name).symlink_to(weak[key])
    catalog = build_catalog(val, tmp_path / "cat", adapters=tmp_path / "weak", base_model=("tiny-test", tiny_base))
    with pytest.raises(IndistinguishableError, match=r"could not be told apart for task\(s\) \['fin/ticker'\]"):
        pair_catalog(catalog, pool, val, tmp_path / "strict", config=HalvingConfig(base_samples=4), parallel=False,
                     strict=True)
    assert not (tmp_path / "strict").exists()
    paired, report = pair_catalog(catalog, pool, val, tmp_path / "lenient", config=HalvingConfig(base_samples=4),
                                  parallel=False)
    assert report["tied"] == [key] and report["tasks"][key]["winner"] == "copy-a"
    assert report["tasks"][key]["metric"] == catalog.tasks[key].metric == "accuracy"


def test_pseudo_tasks_recover_clusters(encoder):
    texts = ["stock prices rose", "shares fell on earnings", "the market rallied",
             "patient has a fever", "the doctor prescribed antibiotics", "blood pressure is high"]
    index = pseudo_task_index(encoder.encode(texts), 2, seed=0)
    first, second = index.labels[:3], index.labels[3:]
    assert len(set(first)) == 1 and len(set(second)) == 1 and first[0] != second[0]
    assert index.keys == ["pseudo/c0", "pseudo/c1"]


def test_pair_picks_each_tasks_own_adapter_over_weak_and_mismatched(tmp_path, tiny_base):
    keys = ("fin/ticker", "legal/plaintiff")
    train = [r for r in demo_records("train") if r.key in keys]
    val = [r for r in demo_records("val") if r.key in keys]
    good = train_adapters(tiny_base, train, tmp_path / "good", train=TrainSpec(max_steps=300), progress=False)
    weak = train_adapters(tiny_base, train, tmp_path / "weak", train=TrainSpec(max_steps=2), progress=False)
    pool = tmp_path / "pool"
    pool.mkdir()
    for key in keys:
        (pool / f"{key.replace('/', '-')}").symlink_to(good[key])
        (pool / f"{key.replace('/', '-')}-weak").symlink_to(weak[key])
    catalog = build_catalog(val, tmp_path / "cat", adapters=tmp_path / "weak", base_model=("tiny-test", tiny_base))
    paired, report = pair_catalog(catalog, pool, val, tmp_path / "paired",
                                  config=HalvingConfig(base_samples=6, warmup=1), parallel=False)
    assert paired.parent == catalog.version
    for key in keys:
        assert report["tasks"][key]["winner"] == key.replace("/", "-"), report["tasks"][key]
        assert report["tasks"][key]["evaluations"] < report["tasks"][key]["uniform_evaluations"]


def test_pool_must_be_a_directory_of_adapters_the_catalog_can_serve(tmp_path):
    (tmp_path / "file.jsonl").write_text("")
    with pytest.raises(CatalogError, match="not a directory of adapters"):
        adapter_pool(tmp_path / "file.jsonl", "tiny-test")
    with pytest.raises(CatalogError, match="no adapters"):
        adapter_pool(tmp_path, "tiny-test")
    adapter = tmp_path / "a"
    adapter.mkdir()
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": "tiny-other"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CatalogError, match="adapter 'a' .* trained on base model 'tiny-other'"):
        adapter_pool(tmp_path, "tiny-test")
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterLoadError, match="adapter 'a' .*DoRA"):
        adapter_pool(tmp_path, "tiny-test")
    (adapter / "adapter_config.json").write_text("{")
    with pytest.raises(AdapterLoadError, match="adapter 'a' .*not valid JSON"):
        adapter_pool(tmp_path, "tiny-test")
