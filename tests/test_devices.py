"""Placement (device and precision) of every model-holding component, and FAISS on the GPU.

Without CUDA: the rule itself, the start-up error for `cuda`, and the CPU paths the placement
parameters reach. With CUDA (`gpu` marker): the same components on the GPU, answers checked against
their CPU selves.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from routing.devices import Placement, PlacementError, resolve_placement
from routing.task_index import TaskIndex, faiss_gpus

CUDA = torch.cuda.is_available()


def test_auto_is_cpu_float32_without_an_assigned_gpu():
    assert resolve_placement(gpu_assigned=False, who="Generator") == Placement(torch.device("cpu"), torch.float32)
    assert resolve_placement("cpu", "bfloat16", gpu_assigned=True, who="x").dtype == torch.bfloat16


@pytest.mark.skipif(CUDA, reason="checks the error a machine without CUDA gives")
def test_cuda_without_cuda_is_a_start_up_error_naming_who():
    with pytest.raises(PlacementError, match="Embedder: device 'cuda' was asked for, but CUDA is not available"):
        resolve_placement("cuda", gpu_assigned=False, who="Embedder")
    # auto with a GPU assigned by Ray but no CUDA in the process (driver missing): the CPU, not a crash
    assert resolve_placement("auto", gpu_assigned=True, who="Generator").device.type == "cpu"


def test_bad_names_are_refused():
    with pytest.raises(PlacementError, match="Selector: device 'tpu'"):
        resolve_placement("tpu", gpu_assigned=False, who="Selector")
    with pytest.raises(PlacementError, match="dtype 'int8'"):
        resolve_placement("cpu", "int8", gpu_assigned=False, who="Selector")


def test_training_placement_follows_the_serving_rule():
    """Training resolves device and precision as serving does; half precision is the Trainer's mixed precision."""
    from training.adapter import TrainSpec, precision_args

    cpu = dict(gpu_assigned=CUDA, who="adapter fin/sa")
    if not CUDA:
        assert precision_args(TrainSpec(), **cpu) == {"use_cpu": True, "bf16": False, "fp16": False}
        with pytest.raises(PlacementError, match="adapter fin/sa: device 'cuda' was asked for"):
            precision_args(TrainSpec(device="cuda"), **cpu)
    assert precision_args(TrainSpec(device="cpu", dtype="bfloat16"), **cpu) == {"use_cpu": True, "bf16": True,
                                                                              "fp16": False}
    with pytest.raises(PlacementError, match="float16 training needs a GPU"):
        precision_args(TrainSpec(device="cpu", dtype="float16"), **cpu)


def test_run_configs_refuse_contradictory_placements(tmp_path):
    from training.run_config import ConfigError, load_run_config

    def config(**fields):
        path = tmp_path / "run.json"
        path.write_text(json.dumps({"output": str(tmp_path / "out"), **fields}))
        return load_run_config(path)

    assert config(train={"dtype": "bfloat16"}).train.to_spec().dtype == "bfloat16"
    with pytest.raises(ConfigError, match="train.device cpu contradicts use_gpu"):
        config(use_gpu=True, workers=1, train={"device": "cpu"})
    with pytest.raises(ConfigError, match="under Ray Train needs use_gpu"):
        config(workers=2, train={"device": "cuda"})
    with pytest.raises(ConfigError, match="device"):
        config(train={"device": "tpu"})


def test_an_adapter_trains_in_bf16_on_the_cpu_and_keeps_its_fingerprint(tiny_base, tmp_path):
    """Mixed precision really runs (CPU autocast), saves a float32 adapter, and where it trains does not
    change what it trains: the fp32 run's adapter counts as up to date."""
    from safetensors.torch import load_file

    from training.adapter import TrainSpec, train_adapter
    from training.demo_corpus import demo_records

    rows = [r for r in demo_records("train") if r.key == "fin/sentiment"][:16]
    quick = dict(max_steps=2, batch_size=4, save_steps=2, warmup_steps=0)
    out = train_adapter(tiny_base, rows, "{text}", tmp_path / "a", train=TrainSpec(device="cpu", dtype="bfloat16",
                                                                                      **quick), progress=False)
    summary = json.loads((out / "training.json").read_text())
    assert summary["train"]["dtype"] == "bfloat16" and summary["steps"] == 2
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    stamp = (out / "adapter_model.safetensors").stat().st_mtime_ns
    train_adapter(tiny_base, rows, "{text}", tmp_path / "a", train=TrainSpec(**quick), progress=False)
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == stamp


def test_app_args_take_device_and_dtype(tmp_path):
    from serve_app.config import AppArgs

    (tmp_path / "catalog.json").write_text("{}")
    args = AppArgs(catalog=str(tmp_path), device="cpu", dtype="bfloat16")
    assert (args.device, args.dtype) == ("cpu", "bfloat16")
    assert (AppArgs(catalog=str(tmp_path)).device, AppArgs(catalog=str(tmp_path)).dtype) == ("auto", "auto")
    with pytest.raises(ValidationError, match="device"):
        AppArgs(catalog=str(tmp_path), device="gpu")


def test_replica_placement_outside_ray_has_no_gpu(tmp_path):
    from serve_app.config import AppArgs
    from serve_app.placement import gpu_assigned, replica_placement

    (tmp_path / "catalog.json").write_text("{}")
    assert gpu_assigned() is False
    assert replica_placement(AppArgs(catalog=str(tmp_path)), "Router").device.type == "cpu"


def test_faiss_gpus_is_guarded():
    assert faiss_gpus() >= 0  # 0 on faiss-cpu, whatever its build exposes


def random_index(seed: int = 0) -> tuple[TaskIndex, np.ndarray]:
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(200, 48)).astype(np.float32)
    keys = [f"d{i % 7}/t{i % 23}" for i in range(200)]
    return TaskIndex.from_embeddings(emb, keys), rng.normal(size=(30, 48)).astype(np.float32)


def brute_force(index: TaskIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = q @ index.centroids.T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, 1), ids


def test_task_index_search_is_exact():
    index, queries = random_index()
    got = index.search(queries, 5)
    want_scores, want_ids = brute_force(index, queries, 5)
    np.testing.assert_array_equal(np.stack([i for _, i in got]), want_ids)
    np.testing.assert_allclose(np.stack([s for s, _ in got]), want_scores, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(faiss_gpus() == 0, reason="needs faiss-gpu and a GPU")
def test_faiss_gpu_index_and_kmeans_match_cpu(monkeypatch):
    """The same answers as the CPU: the task index's search, and `data select`'s K-means selection."""
    import training.selection as selection
    from routing import task_index

    index, queries = random_index(1)
    assert "Gpu" in type(index._faiss).__name__
    got = index.search(queries, 5)
    want_scores, want_ids = brute_force(index, queries, 5)
    np.testing.assert_array_equal(np.stack([i for _, i in got]), want_ids)
    np.testing.assert_allclose(np.stack([s for s, _ in got]), want_scores, atol=1e-4)

    rng = np.random.default_rng(0)  # 8 well-separated blobs: a selection both devices must agree on
    centres = rng.normal(size=(8, 32)).astype(np.float32) * 20
    points = (centres[rng.integers(0, 8, 400)] + rng.normal(size=(400, 32))).astype(np.float32)
    on_gpu = {m: selection.kmeans_representatives(points, 8, m, seed=0) for m in ("l2", "cos", "ip")}
    monkeypatch.setattr(selection, "faiss_gpus", lambda: 0)
    monkeypatch.setattr(task_index, "faiss_gpus", lambda: 0)
    for metric, kept in on_gpu.items():
        cpu = selection.kmeans_representatives(points, 8, metric, seed=0)
        assert sorted(kept.tolist()) == sorted(cpu.tolist()), metric


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_auto_on_an_assigned_gpu_is_cuda_half_precision_and_models_land_there(tiny_base):
    from routing.base_models import load_causal_lm
    from routing.encoder import Encoder

    p = resolve_placement(gpu_assigned=True, who="Generator")
    assert p.device.type == "cuda" and p.dtype in (torch.bfloat16, torch.float16)
    model, tok = load_causal_lm(tiny_base, p.dtype, p.device)
    assert {(q.device.type, q.dtype) for q in model.parameters()} == {("cuda", p.dtype)}
    cpu_model, _ = load_causal_lm(tiny_base)
    ids = tok(["hello there"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = model(input_ids=ids.to(p.device)).logits.float().cpu()
        want = cpu_model(input_ids=ids).logits
    assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()  # bf16 weights: ~1% per layer
    cpu, gpu = Encoder(), Encoder(device=p.device, dtype=p.dtype)
    a, b = cpu.encode(["a sentence to embed"]), gpu.encode(["a sentence to embed"])
    assert b.dtype == np.float32 and float((a * b).sum()) > 0.99
