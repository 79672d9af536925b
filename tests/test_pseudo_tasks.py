"""Pseudo-tasks end to end (LoRAuter §4.4): an unlabelled validation pool -> K-means clusters -> each
paired with an adapter by Successive Halving -> a catalog whose pseudo-tasks route and answer like tasks."""

from collections import Counter

from routing.base_models import load_causal_lm
from routing.catalog import Catalog
from routing.decision import RouteRequest
from routing.lora import FusedLoraModel, generate
from routing.metrics import score
from routing.pairing import HalvingConfig
from routing.routers import make_router
from routing.templates import render
from training.adapter import TrainSpec, train_adapters
from training.demo_corpus import demo_records
from training.pseudo_catalog import build_pseudo_task_catalog

KEYS = ("fin/ticker", "legal/plaintiff", "med/lab")


def test_pseudo_task_catalog_routes_and_answers_like_named_tasks(tmp_path, tiny_base, encoder):
    train = [r for r in demo_records("train") if r.key in KEYS]
    val = [r for r in demo_records("val") if r.key in KEYS]
    test = [r for r in demo_records("test") if r.key in KEYS]
    trained = train_adapters(tiny_base, train, tmp_path / "adapters", train=TrainSpec(max_steps=300), progress=False)
    pool = tmp_path / "pool"
    pool.mkdir()
    for key, path in trained.items():
        (pool / key.replace("/", "-")).symlink_to(path)
    # The labels are there, and ignored: scrambled ones must change nothing.
    unlabelled = [r.__class__(r.instruction, r.input, r.output, "x", "y") for r in val]
    catalog, report = build_pseudo_task_catalog(unlabelled, tmp_path / "cat", 3, pool, ("tiny-test", tiny_base),
                                                encoder=encoder, config=HalvingConfig(base_samples=6),
                                                parallel=False)
    assert Catalog.load(catalog.root).keys == sorted(report["pseudo_tasks"]) == catalog.keys
    assert all(k.startswith("pseudo/c") for k in catalog.keys) and sum(
        t["size"] for t in report["pseudo_tasks"].values()) == len(val)
    # Each cluster is one real task, and Successive Halving gave it that task's adapter.
    cluster_task = {}
    for r, label in zip(val, catalog.index.labels):
        cluster_task.setdefault(catalog.index.keys[label], Counter())[r.key] += 1
    for key, counts in cluster_task.items():
        (task, n), = counts.most_common(1)
        assert n == sum(counts.values()), counts
        assert report["pseudo_tasks"][key]["winner"] == task.replace("/", "-")
    # Served like named tasks: routed by the centroid router, answered through the fused model.
    router = make_router("centroid", catalog)
    embeddings = encoder.encode([r.input for r in test])
    decisions = router.route([RouteRequest(r.input, embedding=e) for r, e in zip(test, embeddings)])
    owner = {k: c.most_common(1)[0][0] for k, c in cluster_task.items()}
    assert sum(owner[d.top] == r.key for d, r in zip(decisions, test)) / len(test) >= 0.9
    model, tokenizer = load_causal_lm(tiny_base)
    fused = FusedLoraModel(model, max_loras=len(catalog.keys), max_rank=8)
    for key in catalog.keys:
        fused.load_adapter(key, catalog.adapter_path(key))
    prompts = [render(catalog.tasks[d.top].template, r.input) for d, r in zip(decisions, test)]
    answers = generate(fused, tokenizer, prompts, [list(d.tasks) for d in decisions], max_new_tokens=16,
                       stop=[["\n"]] * len(test))
    accuracy = sum(score("accuracy", a.text, r.output) for a, r in zip(answers, test)) / len(test)
    assert accuracy >= 0.8, accuracy
