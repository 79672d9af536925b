"""The classifier, lexical and ensemble routers, trained for real on a tiny 3-task corpus (seconds of CPU)."""

import json
import shutil

import numpy as np
import pytest

from routing.catalog import Catalog, CatalogError, TaskEntry, write_catalog
from routing.decision import RouteRequest
from routing.routers import make_router
from routing.routers.classifier import ClassifierRouter, domain_soft_targets
from routing.routers.ensemble import EnsembleRouter
from routing.routers.lexical import LexicalModel, LexicalRouter
from routing.routers.probabilistic import LABELS_FILE, fit_temperature
from routing.templates import DEFAULT_TEMPLATE
from training.catalog_build import build_catalog
from training.records import Record
from training.router_training import train_classifier, train_lexical

CORPUS = {
    "fin/stocks": ("Say whether the stock goes up or down.", [
        "Shares of Acme rose after strong quarterly earnings.", "The stock market fell sharply today.",
        "Investors bought bonds as interest rates climbed.", "The company's revenue beat analyst forecasts.",
        "Tech shares slid as the central bank raised rates.", "The index closed at a record high on Friday.",
        "Oil prices dropped after the OPEC meeting.", "The bank's profit margin narrowed this quarter.",
        "Traders sold the dollar ahead of the jobs report.", "The retailer cut its full-year sales guidance."]),
    "med/symptoms": ("Name the most likely diagnosis.", [
        "The patient reports chest pain and fever.", "She has had a persistent cough for two weeks.",
        "Blood pressure is elevated and the heart rate is fast.", "He complains of headaches and nausea.",
        "The child has a rash and a runny nose.", "An elderly man presents with shortness of breath.",
        "She feels dizzy and her ankles are swollen.", "The wound is red, warm and painful.",
        "He has lost weight and is always thirsty.", "The patient vomited twice and has abdominal cramps."]),
    "legal/contracts": ("Who is bound by this clause?", [
        "The tenant shall pay rent on the first day of each month.",
        "This agreement is governed by the laws of the state.",
        "The defendant breached the contract by failing to deliver.",
        "The court dismissed the appeal for lack of jurisdiction.",
        "The licensee may not sublicense the software.", "Either party may terminate with thirty days notice.",
        "The seller warrants that the goods are free of defects.", "The arbitrator's award shall be final and binding.",
        "The employee agrees not to disclose confidential information.",
        "Damages are limited to the fees paid under this agreement."]),
}
QUERIES = [("Stock prices dropped after the earnings report.", "fin/stocks"),
           ("The patient has a high fever and a sore throat.", "med/symptoms"),
           ("The lease obliges the landlord to repair the roof.", "legal/contracts"),
           ("Bond yields rose as investors sold treasuries.", "fin/stocks"),
           ("She complains of a sore knee and back pain.", "med/symptoms"),
           ("The buyer shall indemnify the seller against all claims.", "legal/contracts")]
RECORDS = [Record(instr, text, "out", *key.split("/")) for key, (instr, texts) in CORPUS.items() for text in texts]
# Routers that need a trained artefact: the same table as tests/test_routing.py, on a trained catalog.
TRAINED_ROUTERS = {"classifier": ClassifierRouter, "lexical": LexicalRouter, "ensemble": EnsembleRouter}

@pytest.fixture(scope="module")
def base_catalog(tmp_path_factory, encoder):
    return build_catalog(RECORDS, tmp_path_factory.mktemp("cls") / "base", encoder=encoder)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base_catalog):
    return train_classifier(base_catalog, RECORDS, tmp_path_factory.mktemp("cls") / "trained", epochs=2,
                            batch_size=8, max_length=32, domain_smoothing=0.1, progress=False)


@pytest.fixture(scope="module")
def routers(trained):
    return {name: cls(trained) for name, cls in TRAINED_ROUTERS.items()}


def _requests(encoder, router, **kw):
    emb = encoder.encode([q for q, _ in QUERIES]) if router.needs_embedding else [None] * len(QUERIES)
    return [RouteRequest(q, embedding=e, **kw) for (q, _), e in zip(QUERIES, emb)]


def test_training_derives_a_new_catalog_version(base_catalog, trained):
    assert trained.parent == base_catalog.version and trained.version != base_catalog.version
    assert set(trained.routers) == {"classifier", "lexical"} and trained.keys == base_catalog.keys
    artefact, lexical = trained.router_path("classifier"), trained.router_path("lexical")
    for path in (artefact, lexical):
        assert json.loads((path / LABELS_FILE).read_text()) == trained.keys
        assert not [f for f in path.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".pkl")]
        assert json.loads((path / "router.json").read_text())["calibration_temperature"] > 0
    assert {"model.safetensors", "head.safetensors", "config.json", "router.json", "tokenizer.json"} <= \
        {f.name for f in artefact.iterdir()}
    assert {"vocabulary.json", "lexical.safetensors"} <= {f.name for f in lexical.iterdir()}
    assert json.loads((artefact / "router.json").read_text())["training"]["domain_smoothing"] == 0.1
    for cls in TRAINED_ROUTERS.values():
        with pytest.raises(CatalogError, match="no trained '(classifier|lexical)' router"):
            cls(base_catalog)
    assert make_router("auto", trained).name == "ensemble" and make_router("auto", base_catalog).name == "centroid"


def test_lexical_alone_trains_in_one_step_and_auto_uses_it(base_catalog, routers, tmp_path):
    lexical = train_lexical(base_catalog, RECORDS, tmp_path / "lex", progress=False)
    assert set(lexical.routers) == {"lexical"} and lexical.parent == base_catalog.version
    assert make_router("auto", lexical).name == "lexical"
    # Reloaded from safetensors + JSON, it scores exactly as the one trained alongside the classifier.
    texts = [q for q, _ in QUERIES]
    assert np.allclose(LexicalRouter(lexical).logits(texts), routers["lexical"].logits(texts), atol=1e-5)


def test_lexical_model_with_two_tasks_keeps_one_logit_row_per_task():
    texts = [t for key in ("fin/stocks", "med/symptoms") for t in CORPUS[key][1]]
    labels = np.repeat([0, 1], 10)
    model = LexicalModel.fit(texts, labels, 2)   # scikit-learn stores a single row for two classes
    assert model.coef.shape[0] == 2 and (model.logits(texts).argmax(1) == labels).all()
    with pytest.raises(ValueError, match="every label needs training texts"):
        LexicalModel.fit(texts, labels, 3)


def test_ensemble_is_the_sum_of_its_members_log_probabilities(routers):
    texts = [q for q, _ in QUERIES]
    members = [routers[n].logits(texts) for n in ("classifier", "lexical")]
    log_p = sum(z - np.log(np.exp(z).sum(1, keepdims=True)) for z in members)
    assert np.allclose(routers["ensemble"].logits(texts), log_p, atol=1e-5)


@pytest.mark.parametrize("name", sorted(TRAINED_ROUTERS))
def test_router_table_valid_decisions(trained, routers, encoder, name):
    router = routers[name]
    decisions = router.route(_requests(encoder, router))
    assert [d.top for d in decisions] == [k for _, k in QUERIES]
    for d in decisions:
        assert d.router == name and d.catalog_version == trained.version
        assert abs(sum(w for _, w in d.tasks) - 1) < 1e-6 and all(k in trained.tasks for k, _ in d.tasks)
    assert router.route([]) == []


@pytest.mark.parametrize("name", sorted(TRAINED_ROUTERS))
def test_top_k_weights_and_temperature(routers, encoder, name):
    router = routers[name]
    sharp, default, flat = (router.route(_requests(encoder, router, top_k=3, temperature=t)) for t in (0.05, 0.2, 5.0))
    for s, d, f in zip(sharp, default, flat):
        assert len(d.tasks) == 3 and len({k for k, _ in d.tasks}) == 3
        assert [k for k, _ in s.tasks] == [k for k, _ in d.tasks] == [k for k, _ in f.tasks]
        for dec in (s, d, f):
            assert abs(sum(w for _, w in dec.tasks) - 1) < 1e-9
        assert s.tasks[0][1] >= d.tasks[0][1] >= f.tasks[0][1] >= 1 / 3
        # scores are the calibrated probabilities; at the default τ the weights are them, renormalised.
        assert np.allclose([w for _, w in d.tasks], np.array(d.scores) / sum(d.scores))
        assert list(d.scores) == sorted(d.scores, reverse=True) and 0 < sum(d.scores) <= 1 + 1e-9


@pytest.mark.parametrize("name", sorted(TRAINED_ROUTERS))
def test_exclude_drops_the_task_and_renormalises(routers, encoder, name):
    router = routers[name]
    emb = encoder.encode([q for q, _ in QUERIES])
    reqs = [RouteRequest(q, top_k=3, exclude=k, embedding=e) for (q, k), e in zip(QUERIES, emb)]
    for (_, truth), d in zip(QUERIES, router.route(reqs)):
        assert truth not in [k for k, _ in d.tasks] and len(d.tasks) == 2   # 3 tasks, one excluded
        assert abs(sum(w for _, w in d.tasks) - 1) < 1e-9


def test_labels_that_do_not_match_the_catalog_are_refused(trained, base_catalog, tmp_path):
    artefact = tmp_path / "art"
    shutil.copytree(trained.router_path("classifier"), artefact)
    shutil.copytree(trained.router_path("lexical"), tmp_path / "lex")
    tasks = {k: TaskEntry(*k.split("/"), DEFAULT_TEMPLATE) for k in trained.keys[:2]}
    keep = np.isin(base_catalog.index.labels, [0, 1])
    from routing.task_index import TaskIndex
    index = TaskIndex.from_embeddings(base_catalog.index.embeddings[keep],
                                      [base_catalog.index.keys[i] for i in base_catalog.index.labels[keep]])
    with pytest.raises(CatalogError, match=r"router classifier scores tasks \[.*\], but the catalog lists"):
        write_catalog(tmp_path / "two-tasks", tasks=tasks, index=index, encoder=base_catalog.encoder,
                      router_dirs={"classifier": artefact, "lexical": tmp_path / "lex"})
    assert not (tmp_path / "two-tasks").exists()


def test_training_rejects_records_for_unknown_tasks(base_catalog, tmp_path):
    bad = RECORDS + [Record("", "x", "y", "fin", "nope"), Record("", "z", "y", "zoo", "cats")]
    with pytest.raises(ValueError, match=r"not in the catalog: \['fin/nope', 'zoo/cats'\]"):
        train_classifier(base_catalog, bad, tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="no records for catalog task"):
        train_classifier(base_catalog, [r for r in RECORDS if r.domain != "med"], tmp_path / "y", progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_domain_soft_targets_and_temperature_scaling():
    t = domain_soft_targets(["a/x", "a/y", "a/z", "b/w"], 0.2).numpy()
    assert np.allclose(t.sum(1), 1) and np.allclose(t[0], [0.8, 0.1, 0.1, 0]) and np.allclose(t[3], [0, 0, 0, 1])
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 400)
    logits = rng.normal(size=(400, 4)) + 4.0 * np.eye(4)[truth]
    assert 0.7 < fit_temperature(logits * 3, truth) / 3 / fit_temperature(logits, truth) < 1.3   # scale-equivariant
    assert fit_temperature(logits, truth) < 1 < fit_temperature(-logits, truth)   # sharpen right ones, flatten wrong ones
    assert fit_temperature(10.0 * np.eye(4)[truth], truth) == 1.0   # all right: no minimum, no sharpening


@pytest.mark.parametrize("kind, file, damage", [
    ("lexical", "lexical.safetensors", lambda b: b[: len(b) // 2]),                # truncated
    ("lexical", "vocabulary.json", lambda b: b"{}"),                               # entries missing
    ("classifier", "head.safetensors", lambda b: b"not safetensors"),
    ("classifier", "router.json", lambda b: b"[1]"),                               # not an object
])
def test_a_damaged_artefact_is_refused_by_name(trained, tmp_path, kind, file, damage):
    copy = tmp_path / "copy"
    shutil.copytree(trained.root, copy)
    target = copy / trained.routers[kind] / file
    target.write_bytes(damage(target.read_bytes()))
    damaged = Catalog.load(copy, verify=False)
    with pytest.raises(CatalogError, match=f"{kind} .*unreadable artefact"):
        TRAINED_ROUTERS[kind](damaged)
