"""Ray Tune sweeps: a 4-trial sweep end to end (results, plot, early stops, exported catalog), the
choice of the exported trial (DoRA never, except for the selector), a selector sweep end to end, and the
sweep configs we ship."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from routing.catalog import Catalog
from training.run_config import ConfigError, load_sweep_config, sweep_config
from training.sweep import NOT_EXPORTED, RESUMED, SELECTOR, grid, pick_best, run_sweep, sweep_data

REPO = Path(__file__).resolve().parents[1]
TASK = "fin/ticker"


def test_small_sweep_end_to_end(tmp_path, tiny_base):
    cfg = sweep_config(
        base_model="tiny-test", tasks="demo", task=[TASK], variants=["lora", "rslora", "dora", "pissa"], r=[4],
        alpha=[8], lr=[6.0e-3], train={"max_steps": 24, "batch_size": 8, "save_steps": 12, "warmup_steps": 2},
        eval_every=6, val_per_task=10, max_concurrent=1,  # one at a time: which trials ASHA stops is deterministic
        output=str(tmp_path / "sweep"), dashboard=False)
    result = run_sweep(cfg)
    print(json.dumps(result, indent=1))

    assert result["trials"] == 4 and result["variants"] == ["dora", "lora", "pissa", "rslora"]
    assert result["stopped_early"] >= 1, "ASHA stopped nothing"
    assert result["completed"] + result["stopped_early"] == 4 and result["errors"] == 0
    assert result["reports_per_trial"] == 4

    out = tmp_path / "sweep"
    rows = json.loads((out / "results.json").read_text())
    with (out / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4
    assert Path(result["results"]["plot"]).stat().st_size > 10_000
    for row in rows:
        if row["status"] == "stopped_early":
            assert row["step"] < 24 and row["adapter"] is None
        else:
            assert row["step"] == 24 and Path(row["adapter"], "training.json").is_file()

    best = result["best"][TASK]
    assert best["variant"] != "dora"
    assert set(best) >= {"variant", "r", "alpha", "lr", "metric"}
    catalog = Catalog.load(result["catalog"])
    assert catalog.version == result["catalog_version"] and Path(result["catalog"]).parent == out / "catalogs"
    assert catalog.keys == [TASK]
    assert catalog.tasks[TASK].lora["variant"] == best["variant"]
    exported = catalog.adapter_path(TASK) / "adapter_model.safetensors"
    assert exported.read_bytes() == (Path(best["adapter"]) / "adapter_model.safetensors").read_bytes()
    # servable: the fused multi-LoRA layer (what the Generator runs) takes the exported adapter
    from routing.base_models import load_causal_lm
    from routing.lora import FusedLoraModel

    fused = FusedLoraModel(load_causal_lm(tiny_base)[0], max_loras=2, max_rank=16)
    fused.load_adapter(TASK, catalog.adapter_path(TASK))


def test_selector_sweep_exports_the_best_selector(tmp_path, tiny_base, encoder):
    """`selector:` sweeps the AS selector's variants: every trial trains on one shared selection, its score
    is the routing top-1 on the validation rows (recomputed here with the router's own scorer), and the best
    trial is exported as a child version of the catalog it routes over (DoRA included: the selector is not
    served by the fused path)."""
    from routing.selector_model import SelectorModel
    from training.catalog_build import build_catalog
    from training.demo_corpus import demo_records
    from training.selector import per_task_accuracy

    keys = ["fin/ticker", "legal/motion"]
    parent = build_catalog([r for r in demo_records("val") if r.key in keys], tmp_path / "parent", encoder=encoder)
    cfg = sweep_config(
        base_model="tiny-test", tasks="demo", task=keys, variants=["lora", "dora"], r=[4], alpha=[8], lr=[6.0e-3],
        train={"max_steps": 16, "batch_size": 8, "save_steps": 8, "warmup_steps": 2}, eval_every=8, val_per_task=6,
        scheduler="fifo", max_concurrent=1, selector={"catalog": str(parent.root), "per_task": 8},
        output=str(tmp_path / "sweep"), dashboard=False)
    result = run_sweep(cfg)
    print(json.dumps(result, indent=1))

    assert result["kind"] == SELECTOR and result["trials"] == 2 and result["completed"] == 2
    rows = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert {row["variant"] for row in rows} == {"lora", "dora"} and all(0 <= row["score"] <= 1 for row in rows)
    assert len({json.dumps(json.loads((Path(row["adapter"]) / "selection.jsonl").read_text().splitlines()[0]))
                for row in rows}) == 1   # one selection, shared
    best = result["best"][SELECTOR]
    assert best["score"] == max(row["score"] for row in rows)
    exported = Catalog.load(result["catalog"])
    assert exported.parent == parent.version and exported.keys == sorted(keys) and "selector" in exported.routers
    assert Path(result["catalog"]).parent == tmp_path / "sweep" / "catalogs"
    val = [r for rows_ in sweep_data(cfg)[1].values() for r in rows_]
    accuracy = per_task_accuracy(SelectorModel(exported.router_path("selector")), val, "input")
    assert sorted(accuracy) == sorted(keys)
    assert sum(accuracy.values()) / len(accuracy) == pytest.approx(best["score"], abs=1e-4)


def _row(variant, score, loss, status="completed", **kw):
    return {"task": TASK, "variant": variant, "r": 4, "alpha": 8, "lr": 1e-3, "dropout": 0.0, "seed": 0,
            "status": status, "reports": 4, "score": score, "eval_loss": loss,
            "adapter": f"/a/{variant}" if status != "stopped_early" else None, **kw}


def test_best_is_servable_and_dora_is_reported():
    rows = [_row("dora", 1.0, 0.1), _row("lora", 0.9, 0.3), _row("pissa", 0.9, 0.2),
            _row("rslora", 1.0, 0.05, status="stopped_early")]
    best, passed = pick_best(rows, "score", NOT_EXPORTED)
    assert best[TASK]["variant"] == "pissa"          # tie on score: lower eval loss; stopped trials never
    assert passed[TASK]["variant"] == "dora" and "refused" in passed[TASK]["reason"]
    best, passed = pick_best(rows, "eval_loss", NOT_EXPORTED)
    assert best[TASK]["variant"] == "pissa" and passed[TASK]["variant"] == "dora"
    best, _ = pick_best([_row("dora", 1.0, 0.1), _row("lora", 0.5, 0.5, status=RESUMED)], "score", NOT_EXPORTED)
    assert best[TASK]["variant"] == "lora"          # finished after the sweep: exportable
    assert pick_best([_row("dora", 1.0, 0.1)], "score", NOT_EXPORTED)[0] == {}
    assert pick_best([_row("dora", 1.0, 0.1)], "score", {})[0][TASK]["variant"] == "dora"  # a selector may


def test_grid_is_shuffled_and_complete():
    cfg = sweep_config(variants=["lora", "dora"], r=[4, 8], alpha=[8, 16], lr=[1.0e-3, 3.0e-3], num_samples=2)
    points = grid(cfg, ["a/b", "c/d"])
    assert len(points) == 2 * cfg.grid_size() == 64
    assert len({json.dumps(p, sort_keys=True) for p in points}) == 64
    ordered = sorted(points, key=lambda p: (p["task"], p["variant"], p["r"], p["alpha"], p["lr"], p["seed"]))
    assert points != ordered
    assert points == grid(cfg, ["a/b", "c/d"])      # the order is a function of shuffle_seed


def test_shipped_sweep_configs_validate(tmp_path):
    smoke = load_sweep_config(REPO / "examples" / "sweep-smoke.yaml")
    selector = load_sweep_config(REPO / "examples" / "sweep-selector.yaml")
    assert selector.selector.catalog.endswith("runs/catalog-demo") and selector.grid_size() == 8
    assert smoke.variants == ["lora", "rslora", "dora", "pissa"] and len(smoke.task) == 2
    configmap = yaml.safe_load((REPO / "k8s" / "sweep-configmap.yaml").read_text())
    path = tmp_path / "sweep.yaml"
    path.write_text(configmap["data"]["sweep.yaml"])
    k8s = load_sweep_config(path)
    assert k8s.train_workers() == 2 and k8s.use_gpu and k8s.scheduler == "asha"
    assert str(k8s.catalog_dir) == "/mnt/catalogs" and k8s.output.startswith("/mnt/switchboard/")


@pytest.mark.parametrize("bad, message", [
    ({"r": [4, 0]}, "sweep.yaml: r: every value must be >= 1, got 0"),
    ({"variants": ["lora", "qlora"]}, "sweep.yaml: variants.1: must be one of"),
    ({"scheduler": "pbt"}, "sweep.yaml: scheduler: must be one of 'asha' or 'fifo'"),
    ({"asha": {"reduction_factor": 1}}, "sweep.yaml: asha.reduction_factor: must be > 1"),
    ({"lr": []}, "sweep.yaml: lr: must have at least 1 item(s)"),
    ({"workers": 2, "train": {"batch_size": 5}}, "train.batch_size 5 must be divisible by workers=2"),
    ({"epochs": 3}, "sweep.yaml: epochs: unknown key"),
])
def test_bad_sweep_config_names_the_key(tmp_path, bad, message):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError) as e:
        load_sweep_config(path)
    assert message in str(e.value)


def test_a_task_too_small_to_split_is_refused_not_dropped(tmp_path):
    rows = [{"input": f"q{i}", "output": "a", "domain": "fin", "task": "big"} for i in range(10)]
    rows.append({"input": "only one", "output": "a", "domain": "fin", "task": "solo"})
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"tasks \['fin/solo'\]: too few records"):
        sweep_data(sweep_config(tasks=str(tmp_path / "tasks.jsonl")))
    train, val = sweep_data(sweep_config(tasks=str(tmp_path / "tasks.jsonl"), task=["fin/big"]))   # not swept
    assert list(train) == list(val) == ["fin/big"]
