"""The Adapters-Selector router: trained on the tiny base, scored over catalog labels, updated."""

import pytest
import torch

from routing.decision import RouteRequest
from routing.routers import make_router
from routing.selector_model import SelectorModel, label_text, selector_template
import json

from training.adapter import TrainSpec, train_adapters
from training.catalog_build import build_catalog
from training.demo_corpus import demo_records
from training.selector import SELECTION_CONFIG, SELECTION_FILE, UPDATE_FILE, train_selector, update_selector
from training.records import load_records

KEYS = ("fin/ticker", "legal/motion", "med/lab")
NEW = "med/dose"
FAST = TrainSpec(max_steps=60)


def _pick(split, keys=KEYS):
    return [r for r in demo_records(split) if r.key in keys]


@pytest.fixture(scope="module")
def selector_catalog(tmp_path_factory, tiny_base):
    work = tmp_path_factory.mktemp("selector")
    # Adapters barely trained: the selector tests need them present, not good.
    train_adapters(tiny_base, _pick("train", (*KEYS, NEW)), work / "adapters", train=TrainSpec(max_steps=2),
                   progress=False)
    served = build_catalog(_pick("val"), work / "served", adapters=work / "adapters", base_model=("tiny-test", tiny_base))
    catalog, report = train_selector(served, _pick("train"), work / "with-selector", tiny_base, per_task=40,
                                     embed="base-embeddings", metric="l2", train=FAST, progress=False)
    return catalog, report, work


def test_selector_is_a_new_catalog_version_with_its_selection(selector_catalog):
    catalog, report, _ = selector_catalog
    assert catalog.parent is not None and "selector" in catalog.routers
    assert set(report) >= set(KEYS) or "tasks" in report
    selection = load_records(catalog.router_path("selector") / SELECTION_FILE)
    assert {r.key for r in selection} == set(KEYS) and len(selection) <= 40 * len(KEYS)


def test_selector_routes_held_out_queries_to_valid_tasks(selector_catalog):
    catalog, _, _ = selector_catalog
    router = make_router("selector", catalog)
    test = _pick("test")
    decisions = router.route([RouteRequest(r.input, top_k=2) for r in test])
    assert all(k in catalog.tasks for d in decisions for k, _ in d.tasks)
    assert all(len(d.tasks) == 2 and abs(sum(w for _, w in d.tasks) - 1) < 1e-5 for d in decisions)
    accuracy = sum(d.top == r.key for d, r in zip(decisions, test)) / len(test)
    assert accuracy >= 0.9, accuracy


def test_label_scoring_matches_full_sequence_likelihood(selector_catalog):
    """The cached prefill + radix-tree label walk equal scoring each prompt+label sequence from scratch."""
    catalog, _, _ = selector_catalog
    model = SelectorModel(catalog.router_path("selector"))
    # Branch deeper than the catalog does: a second med task, and a label that is a prefix of another.
    med = model.tokenizer(label_text("med/dose"), add_special_tokens=False)["input_ids"] + [model.tokenizer.eos_token_id]
    model.labels = [*model.labels, "med/dose", "prefix"]
    model.label_ids = [*model.label_ids, med, model.label_ids[0][:-1]]
    texts = [r.input for r in _pick("test")[:3]] + ["short"]
    fast = model.log_likelihoods(texts)
    tok, lm = model.tokenizer, model.model
    for b, text in enumerate(texts):
        prompt = tok("### Which task is this request for?\n" + text + "\n### Task:\n")["input_ids"]
        for j, ids in enumerate(model.label_ids):
            seq = torch.tensor([prompt + ids])
            logp = torch.log_softmax(lm(input_ids=seq).logits[0, len(prompt) - 1:-1].float(), -1)
            slow = logp.gather(-1, torch.tensor(ids)[:, None]).sum()
            assert abs(float(slow) - float(fast[b, j])) < 1e-3


def test_update_add_and_delete(selector_catalog, tiny_base):
    catalog, _, work = selector_catalog
    with pytest.raises(ValueError, match="add needs the new tasks' adapters .*--routing-only"):
        update_selector(catalog, "add", work / "x", tiny_base, ratio=0.5, new_records=_pick("train", (NEW,)))
    with pytest.raises(ValueError, match="no adapter for 1 new task"):
        update_selector(catalog, "add", work / "x", tiny_base, ratio=0.5, new_records=_pick("train", (NEW,)),
                        adapters=work / "nowhere")
    added = update_selector(catalog, "add", work / "added", tiny_base, ratio=0.5, adapters=work / "adapters",
                            new_records=_pick("train", (NEW,)), train=FAST, progress=False)
    assert added.keys == sorted((*KEYS, NEW)) and added.parent == catalog.version
    # The new task is served: its adapter is in the new version, and it kept its old tasks' adapters.
    assert all((added.adapter_path(k) / "adapter_model.safetensors").is_file() for k in added.keys)
    assert added.tasks[NEW].lora["r"] == 8 and added.tasks[NEW].metric == "accuracy"
    # Selected as the selector's own data was: base-model embeddings, L2, 40 per task, recorded again.
    recorded = json.loads((catalog.router_path("selector") / SELECTION_CONFIG).read_text())
    assert recorded == {"embed": "base-embeddings", "metric": "l2", "per_task": 40, "text_mode": "input",
                        "prompt": "ours", "max_length": FAST.max_length}
    assert json.loads((added.router_path("selector") / SELECTION_CONFIG).read_text()) == recorded
    selection = load_records(added.router_path("selector") / SELECTION_FILE)
    old_counts = {k: sum(r.key == k for r in selection) for k in KEYS}
    assert all(8 <= n <= 22 for n in old_counts.values()), old_counts   # about half of the old 40 retained
    router = make_router("selector", added)
    dose = _pick("test", (NEW,))
    assert sum(d.top == NEW for d in router.route([RouteRequest(r.input) for r in dose])) / len(dose) >= 0.8

    with pytest.raises(ValueError, match="delete takes no records"):
        update_selector(added, "delete", work / "x", ratio=1.0, delete=["legal/motion"], new_records=dose)
    # No base model given: the one the selector was trained on, found in the cache by its id.
    deleted = update_selector(added, "delete", work / "deleted", ratio=1.0, delete=["legal/motion"],
                              train=FAST, progress=False)
    assert "legal/motion" not in deleted.keys and "legal/motion" not in deleted.index.keys
    with pytest.raises(ValueError, match="unknown"):
        update_selector(deleted, "delete", work / "x", tiny_base, ratio=0.1, delete=["legal/motion"])
    with pytest.raises(ValueError, match="ratio"):
        update_selector(deleted, "add", work / "x", tiny_base, ratio=2)


def test_balance_reduces_easy_tasks_and_augments_the_others(selector_catalog, tiny_base):
    """§3.4, judged on validation: the selector's per-task accuracy decides which tasks are easy."""
    catalog, _, work = selector_catalog
    old = load_records(catalog.router_path("selector") / SELECTION_FILE)
    balanced = update_selector(catalog, "balance", work / "balanced", tiny_base, ratio=0.25,
                               new_records=_pick("train"), validation=_pick("val"), train=FAST, progress=False)
    update = json.loads((balanced.router_path("selector") / UPDATE_FILE).read_text())
    assert set(update["validation_accuracy"]) == set(KEYS) and update["op"] == "balance"
    assert update["easy"] == sorted(k for k, acc in update["validation_accuracy"].items() if acc >= 0.95)
    selection = load_records(balanced.router_path("selector") / SELECTION_FILE)
    for key in KEYS:
        before, after = (sum(r.key == key for r in rows) for rows in (old, selection))
        if key in update["easy"]:
            assert after == round(0.25 * before), (key, before, after)      # reduced
        else:
            assert after > before, (key, before, after)                    # all kept, and augmented
    with pytest.raises(ValueError, match="--val"):
        update_selector(catalog, "balance", work / "x", tiny_base, ratio=0.5, new_records=_pick("train"))
    with pytest.raises(ValueError, match="--adapters and --routing-only belong to add"):
        update_selector(catalog, "balance", work / "x", tiny_base, ratio=0.5, new_records=_pick("train"),
                        validation=_pick("val"), routing_only=True)


def test_label_text():
    assert label_text("fin/sa") == "domain: fin, task: sa"
    assert label_text("fin/sa", "paper") == "Domain:fin\nTask:sa"


def test_paper_prompt_carries_the_instruction_and_the_domain_and_task_lists():
    template = selector_template("paper", ["fin/sa", "fin/ha", "med/qa"])
    assert template.startswith("Determine which of the following datapoint is\nin which domain, what is the task.")
    assert "input:{text}\nSelect from below list:\nDomains:fin, med\nTasks:sa, ha, qa\nResults:\n" in template
    assert selector_template("ours", ["fin/sa"]) == "### Which task is this request for?\n{text}\n### Task:\n"
    with pytest.raises(ValueError, match="unknown selector prompt"):
        selector_template("mine", ["fin/sa"])
