"""LoRAuter's three regimes: OOD routes by routers that never saw the held-out tasks."""

import pytest

from routing.calibration import calibrate
from routing.catalog import Catalog
from routing.routers import make_router
from training.catalog_build import build_catalog
from training.demo_corpus import demo_records
from training.ood_evaluation import evaluate_regime, task_folds, without_tasks
from training.router_training import train_lexical


def test_task_folds_partition_the_tasks():
    keys = [f"d/t{i}" for i in range(7)]
    folds = task_folds(keys, 3, seed=1)
    assert sorted(k for f in folds for k in f) == sorted(keys) and sorted(map(len, folds)) == [2, 2, 3]
    with pytest.raises(ValueError, match="folds"):
        task_folds(keys, 1)


def test_ood_retrains_the_lexical_router_without_the_held_out_tasks(tmp_path, encoder):
    val, train, test = (demo_records(s) for s in ("val", "train", "test"))
    catalog = train_lexical(build_catalog(val, tmp_path / "cat"), train, tmp_path / "lexical", progress=False)
    texts, keys = [r.input for r in test], [r.key for r in test]
    sub = without_tasks(catalog, ["fin/ticker", "med/lab"], tmp_path / "sub")
    assert "fin/ticker" not in sub.keys and "fin/ticker" not in sub.index.keys and "lexical" not in sub.routers
    assert sub.calibration == calibrate(sub.index)   # refitted to the smaller index

    non = evaluate_regime(catalog, "lexical", texts, keys, "non-ood", embed=encoder.encode)
    semi = evaluate_regime(catalog, "lexical", texts, keys, "semi-ood", embed=encoder.encode)
    assert non["top1_task_acc"] == semi["top1_task_acc"] >= 0.9   # same routes: only the adapter differs
    with pytest.raises(ValueError, match="give its training records"):
        evaluate_regime(catalog, "lexical", texts, keys, "ood", embed=encoder.encode)
    ood = evaluate_regime(catalog, "lexical", texts, keys, "ood", embed=encoder.encode, train_records=train, folds=3)
    assert ood["retrained"] and ood["n"] == len(test) and len(ood["folds"]) == 3
    assert sorted(k for f in ood["folds"] for k in f["held_out"]) == sorted(catalog.keys)
    assert 0 <= ood["domain_acc"] <= 1
    # The leaky proxy (the trained router told to skip the task) is what this replaces; they differ.
    leaky = make_router("lexical", Catalog.load(catalog.root))
    from routing.evaluation import evaluate_routing

    proxy = evaluate_routing(leaky, texts, keys, embed=encoder.encode, ood=True)["domain_acc"]
    print(f"lexical OOD domain: retrained {ood['domain_acc']:.3f}, leaky proxy {proxy:.3f}")
    centroid = evaluate_regime(catalog, "centroid", texts, keys, "ood", embed=encoder.encode)
    assert centroid["top1_task_acc"] == 0.0 and not centroid["retrained"]


def test_ood_retrains_the_selector_with_its_own_recipe(tmp_path, tiny_base, encoder):
    """The AS selector under OOD: each fold's selector is retrained without the fold's tasks, with the recipe
    of the catalog's own selector (base, selection, LoRA, schedule), and never names a held-out task."""
    import json

    from training.adapter import TrainSpec
    from training.ood_evaluation import retrain
    from training.selector import selection_config, train_selector

    keys = ["fin/ticker", "fin/sentiment", "legal/motion", "med/lab"]
    val, train, test = ([r for r in demo_records(s) if r.key in keys] for s in ("val", "train", "test"))
    catalog, _ = train_selector(build_catalog(val, tmp_path / "cat", encoder=encoder), train, tmp_path / "sel",
                                tiny_base, per_task=6, embed="base-embeddings", metric="l2",
                                train=TrainSpec(max_steps=8, batch_size=8), progress=False)
    sub = retrain("selector", without_tasks(catalog, ["med/lab"], tmp_path / "sub"),
                  [r for r in train if r.key != "med/lab"], tmp_path / "fold", "input", recipe=catalog)
    new, old = sub.router_path("selector"), catalog.router_path("selector")
    assert json.loads((new / "labels.json").read_text()) == sorted(set(keys) - {"med/lab"})
    assert selection_config(new) == selection_config(old)   # per task, base-embeddings, l2, prompt, window
    assert [json.loads((p / "training.json").read_text())["train"]["max_steps"] for p in (new, old)] == [8, 8]

    texts, true = [r.input for r in test], [r.key for r in test]
    ood = evaluate_regime(catalog, "selector", texts, true, "ood", embed=encoder.encode, train_records=train, folds=2)
    assert ood["retrained"] and ood["n"] == len(test) and len(ood["folds"]) == 2 and 0 <= ood["domain_acc"] <= 1
