"""Routers on a real encoder and a real FAISS index; one table runs against every router."""

import ast
from pathlib import Path

import numpy as np
import pytest

from routing.catalog import write_catalog, TaskEntry
from routing.decision import RouteRequest, softmax
from routing.evaluation import evaluate_routing
from routing.routers import ROUTERS, UnknownTaskError, make_router
from routing.task_index import TaskIndex
from routing.templates import DEFAULT_TEMPLATE, render, template_for

TASKS = {
    "fin/stocks": ["Shares of Acme rose after strong quarterly earnings.", "The stock market fell sharply today.",
                   "Investors bought bonds as interest rates climbed.", "The company's revenue beat analyst forecasts."],
    "med/symptoms": ["The patient reports chest pain and fever.", "She has had a persistent cough for two weeks.",
                     "Blood pressure is elevated and the heart rate is fast.", "He complains of headaches and nausea."],
    "legal/contracts": ["The tenant shall pay rent on the first day of each month.",
                        "This agreement is governed by the laws of the state.",
                        "The defendant breached the contract by failing to deliver.",
                        "The court dismissed the appeal for lack of jurisdiction."],
}
TRAINING_FREE = ["centroid", "fixed"]
QUERIES = [("Stock prices dropped after the earnings report.", "fin/stocks"),
           ("The patient has a high fever and a sore throat.", "med/symptoms"),
           ("The lease obliges the landlord to repair the roof.", "legal/contracts")]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, encoder):
    texts = [t for ts in TASKS.values() for t in ts]
    keys = [k for k, ts in TASKS.items() for _ in ts]
    index = TaskIndex.from_embeddings(encoder.encode(texts), keys)
    tasks = {k: TaskEntry(*k.split("/"), DEFAULT_TEMPLATE) for k in TASKS}
    enc = {"name": encoder.name, "prefix": encoder.prefix, "text_mode": "input"}
    return write_catalog(tmp_path_factory.mktemp("cat") / "c", tasks=tasks, index=index, encoder=enc)


def _requests(encoder, router, **kw):
    emb = encoder.encode([q for q, _ in QUERIES]) if router.needs_embedding else [None] * len(QUERIES)
    return [RouteRequest(q, embedding=e, task=k if router.name == "fixed" else None, **kw)
            for (q, k), e in zip(QUERIES, emb)]


def assert_valid_decisions(decisions, router, catalog):
    for d in decisions:
        assert d.router == router.name and d.catalog_version == catalog.version
        assert abs(sum(w for _, w in d.tasks) - 1) < 1e-5 and all(k in catalog.tasks for k, _ in d.tasks)
        assert len({k for k, _ in d.tasks}) == len(d.tasks)


@pytest.mark.parametrize("name", TRAINING_FREE)
def test_training_free_routers_answer_valid_decisions(catalog, encoder, name):
    """Trained routers (selector, classifier) run the same checks in their own test files."""
    router = make_router(name, catalog)
    decisions = router.route(_requests(encoder, router))
    assert [d.top for d in decisions] == [k for _, k in QUERIES]
    assert_valid_decisions(decisions, router, catalog)


def test_trained_routers_are_refused_without_their_artefact(catalog):
    for name in sorted(set(ROUTERS) - set(TRAINING_FREE)):
        with pytest.raises(ValueError, match=f"no trained {ROUTERS[name].artefacts[0]!r} router"):
            make_router(name, catalog)


def test_centroid_top_k_softmax_temperature(catalog, encoder):
    router = make_router("centroid", catalog)
    sharp, flat = (router.route(_requests(encoder, router, top_k=3, temperature=t))[0] for t in (0.05, 5.0))
    assert len(sharp.tasks) == 3 and [k for k, _ in sharp.tasks] == [k for k, _ in flat.tasks]
    assert sharp.tasks[0][1] > flat.tasks[0][1] > 1 / 3
    assert np.allclose([w for _, w in sharp.tasks], softmax(np.array(sharp.scores), 0.05))
    assert list(sharp.scores) == sorted(sharp.scores, reverse=True)


def test_ood_exclusion_and_evaluation(catalog, encoder):
    router = make_router("centroid", catalog)
    texts, keys = [q for q, _ in QUERIES], [k for _, k in QUERIES]
    res = evaluate_routing(router, texts, keys, embed=encoder.encode)
    assert res["n"] == 3 and res["top1_task_acc"] == 1.0 and res["top3_task_acc"] == 1.0
    assert set(res["per_task"]) == set(keys) and res["ms_per_query"] > 0
    ood = evaluate_routing(router, texts, keys, embed=encoder.encode, ood=True)
    assert ood["top1_task_acc"] == 0.0  # the own task is never proposed


def test_index_search_excludes_per_row_and_checks_shapes():
    index = TaskIndex.from_embeddings(np.eye(3, dtype=np.float32), ["a/x", "b/y", "c/z"])
    (s0, i0), (s1, i1) = index.search(np.eye(3, dtype=np.float32)[:2], 3, exclude=[0, None])
    assert list(i0) == [1, 2] or list(i0) == [2, 1]
    assert len(i1) == 3 and i1[0] == 1          # a row that excludes nothing keeps every task
    solo = TaskIndex.from_embeddings(np.ones((1, 3), np.float32), ["a/x"])
    assert list(solo.search(np.ones((1, 3)), 1, exclude=[None])[0][1]) == [0]
    with pytest.raises(ValueError, match="no task left"):
        solo.search(np.ones((1, 3)), 1, exclude=[0])
    with pytest.raises(ValueError, match=r"shape \(1, 4\); this index takes \(n, 3\)"):
        index.search(np.ones((1, 4)), 1)
    with pytest.raises(ValueError, match="sample labels"):
        TaskIndex(["a/x"], np.ones((1, 3), np.float32), np.ones((2, 3), np.float32), np.array([0, 1]))


def test_top3_accuracy_ranks_three_tasks_whatever_top_k(catalog, encoder):
    router = make_router("centroid", catalog)
    texts, keys = [q for q, _ in QUERIES], [k for _, k in QUERIES]
    wrong = [keys[1], keys[2], keys[0]]   # every truth ranks second or third, never first
    res = evaluate_routing(router, texts, wrong, embed=encoder.encode, top_k=1)
    assert res["top1_task_acc"] == 0.0 and res["top3_task_acc"] == 1.0


def test_bad_requests_and_unknown_task(catalog):
    with pytest.raises(ValueError, match="text is empty"):
        RouteRequest("  ")
    with pytest.raises(ValueError, match="top_k"):
        RouteRequest("x", top_k=9)
    for bad in (0, 1e-45, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be in"):
            RouteRequest("x", temperature=bad)
    with pytest.raises(UnknownTaskError, match="unknown task 'fin/nope'"):
        make_router("fixed", catalog).route([RouteRequest("x", task="fin/nope")])
    with pytest.raises(ValueError, match="unknown router"):
        make_router("oracle", catalog)


def test_templates():
    assert render(template_for(["Classify it."]), "a {b}") == "### Instruction:\nClassify it.\n### Input:\na {b}\n### Output:\n"
    assert template_for(["one", "two"]) == DEFAULT_TEMPLATE
    assert template_for(["one"], "instruction+input") == DEFAULT_TEMPLATE


def test_routing_package_never_imports_ray_serve_app_or_training():
    root = Path(__file__).resolve().parents[1] / "routing"
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                assert name.split(".")[0] not in {"ray", "serve_app", "training"}, f"{path} imports {name}"
