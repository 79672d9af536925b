"""Adapter training under Ray Train (2 workers, gloo) and Ray Train + DeepSpeed ZeRO-2: the adapters
go into a catalog like single-process ones and hold the same weights (same global batches)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safetensors.torch import load_file

from routing.catalog import Catalog
from training.catalog_build import build_catalog
from training.demo_corpus import demo_records
from training.distributed import train_from_config
from training.run_config import ConfigError, run_config

REPO = Path(__file__).resolve().parents[1]
TASKS = ["fin/ticker", "legal/motion"]   # tickers are 1-4 tokens: workers hold unequal answer-token counts
TRAIN = {"lr": 3.0e-3, "max_steps": 16, "batch_size": 8, "save_steps": 8, "warmup_steps": 4}
# LoRA dropout draws its masks from each worker's own RNG, so only a run without it can equal the single
# process weight for weight (the default follows the AS paper: 0.05).
LORA = {"dropout": 0.0}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from training.distributed import ensure_ray

    ensure_ray(dashboard=False, num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_base) -> Path:
    out = tmp_path_factory.mktemp("single")
    result = train_from_config(run_config(base_model="tiny-test", task=TASKS, train=TRAIN, lora=LORA, output=str(out),
                                          progress=False))
    assert result["mode"] == "single"
    return out


def _same_weights(a: Path, b: Path, key: str) -> float:
    wa, wb = load_file(a / key / "adapter_model.safetensors"), load_file(b / key / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def _catalog(adapters: Path, tmp_path: Path, tiny_base: Path, encoder, keys: list[str]) -> Catalog:
    records = [r for r in demo_records("val") if r.key in keys]
    built = build_catalog(records, tmp_path / "catalog", adapters=adapters, base_model=("tiny-test", tiny_base),
                          encoder=encoder)
    catalog = Catalog.load(built.root)
    assert sorted(catalog.tasks) == sorted(keys)
    for key in keys:
        assert catalog.tasks[key].lora["variant"] == "lora" and catalog.tasks[key].lora["r"] == 8
    return catalog


def test_ray_train_two_workers(ray_local, single, tmp_path, tiny_base, encoder):
    out = tmp_path / "ray"
    result = train_from_config(run_config(base_model="tiny-test", task=TASKS, train=TRAIN, lora=LORA, workers=2,
                                          output=str(out), progress=False))
    assert result["mode"] == "ray_train" and result["workers"] == 2
    for key in TASKS:
        info = result["adapters"][key]
        assert info["steps"] == 16
        assert info["distributed"] == {"world_size": 2, "backend": "gloo", "deepspeed": False}
        # 2 workers x 4 rows = the single process's 8-row batches, in the same order.
        assert _same_weights(single, out, key) < 1e-5
        config = json.loads((out / key / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"].startswith("tiny-")
    assert not (out / ".ray-train").exists()
    _catalog(out, tmp_path, tiny_base, encoder, TASKS)


def test_ray_train_deepspeed_zero2(ray_local, single, tmp_path, tiny_base, encoder):
    out = tmp_path / "ds"
    result = train_from_config(run_config(base_model="tiny-test", task=TASKS[:1], train=TRAIN, lora=LORA, workers=2,
                                          deepspeed=str(REPO / "examples" / "deepspeed-zero2.json"),
                                          output=str(out), progress=False))
    assert result["mode"] == "ray_train+deepspeed"
    ran = result["adapters"][TASKS[0]]["distributed"]
    print("DeepSpeed ran with:", json.dumps(ran))
    assert ran["deepspeed"] is True and ran["zero_stage"] == 2 and ran["backend"] == "gloo"
    assert ran["world_size"] == 2 and ran["micro_batch_per_worker"] == 4 and ran["train_batch_size"] == 8
    assert ran["optimizer"] == "DeepSpeedZeroOptimizer" and ran["base_optimizer"] == "AdamW"  # torch's, nothing compiled
    assert _same_weights(single, out, TASKS[0]) < 1e-5
    assert not any(out.rglob("global_step*")), "DeepSpeed checkpoint shards left behind"
    _catalog(out, tmp_path, tiny_base, encoder, TASKS[:1])


def test_placement_checks():
    with pytest.raises(ConfigError, match="train.batch_size 8 must be divisible by workers=3"):
        run_config(output="x", workers=3, train=TRAIN)
    with pytest.raises(ConfigError, match="deepspeed: zero_optimization.stage 3"):
        run_config(output="x", workers=2, train=TRAIN, deepspeed={"zero_optimization": {"stage": 3}})
    assert run_config(output="x", workers=1).train_workers() == 0        # one worker = a single process
    assert run_config(output="x", workers=2, train=TRAIN).train_workers() == 2
    assert run_config(output="x", workers=0, deepspeed={}).train_workers() == 1  # DeepSpeed always runs under Ray
    from training.adapter import LoraSpec, TrainSpec
    from training.distributed import train_one

    with pytest.raises(ValueError, match="init_adapter.*one process"):   # refused before anything starts
        train_one("base", [], "{text}", "out", lora=LoraSpec(), train=TrainSpec(), workers=2, init_adapter=Path("a"))


def test_train_from_config_selector(ray_local, tmp_path, tiny_base, encoder):
    """kind: selector trains the AS selector over a catalog into a new catalog version, in one process, on 2
    Ray Train workers and with DeepSpeed ZeRO-2 from the same run config: the same selection, the same
    global batches, so the same weights, and every version routes with its selector."""
    from routing.decision import RouteRequest
    from routing.routers import make_router

    base = build_catalog([r for r in demo_records("val") if r.key in TASKS], tmp_path / "base", encoder=encoder)
    config = dict(kind="selector", base_model="tiny-test", task=TASKS, catalog=str(base.root), per_task=8,
                  train=TRAIN, lora=LORA, progress=False)
    runs = {"single": {}, "ray_train": {"workers": 2},
            "ray_train+deepspeed": {"workers": 2, "deepspeed": str(REPO / "examples" / "deepspeed-zero2.json")}}
    selectors = {}
    for mode, placement in runs.items():
        result = train_from_config(run_config(**config, **placement, output=str(tmp_path / mode)))
        assert result["kind"] == "selector" and result["mode"] == mode and result["parent"] == base.version
        assert result["steps"] == TRAIN["max_steps"]
        new = Catalog.load(result["catalog"])
        assert "selector" in new.routers and new.parent == base.version
        selectors[mode] = new.router_path("selector")
        assert (result["distributed"] or {}).get("world_size", 1) == (2 if placement else 1)
        decisions = make_router("selector", new).route([RouteRequest("Summarise the motion to dismiss.", top_k=1)])
        assert decisions[0].top in TASKS
    assert json.loads((selectors["ray_train+deepspeed"] / "training.json").read_text())["distributed"]["zero_stage"] == 2
    for mode in ("ray_train", "ray_train+deepspeed"):
        assert _same_weights(selectors["single"].parent, selectors[mode].parent, "selector") < 1e-5, mode
