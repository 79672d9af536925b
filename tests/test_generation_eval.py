"""`switchboard eval generation` on the tiny base and three demo tasks: every in-process mode answers
through the engine as `generate` would, OOD leaves the query's own adapter out, merges are peft's and
reused, the multi-task adapter travels with the catalog, and bad data or modes are refused by name."""

import json

import pytest
import torch

from routing.base_models import load_causal_lm
from routing.catalog import Catalog, derive_catalog
from routing.lora import FusedLoraModel, generate
from routing.templates import render
from serve_app.cli import main
from training import generation_eval as ge
from training.adapter import TrainSpec, _encode, train_adapters, train_multitask
from training.catalog_build import build_catalog
from training.demo_corpus import demo_records
from training.ood_evaluation import without_tasks
from training.records import group_by_task, write_jsonl

KEYS = ("fin/sentiment", "legal/motion", "med/dose")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base):
    work = tmp_path_factory.mktemp("generation-eval")
    train = [r for r in demo_records("train") if r.key in KEYS]
    train_adapters(tiny_base, train, work / "adapters", train=TrainSpec(max_steps=3), progress=False)
    train_multitask(tiny_base, train, work / "multitask", train=TrainSpec(max_steps=3), progress=False)
    catalog = build_catalog([r for r in demo_records("val") if r.key in KEYS], work / "catalog",
                            adapters=work / "adapters", base_model=("tiny-test", tiny_base),
                            multitask=work / "multitask")
    test = ge.limit_per_task([r for r in demo_records("test") if r.key in KEYS], 2)
    write_jsonl(test, work / "test.jsonl")
    return dict(work=work, catalog=catalog, test=test, base=tiny_base)


def last_json(capsys) -> tuple[dict, str]:
    out, err = capsys.readouterr()
    return json.loads(out.strip().splitlines()[-1]), err


def test_every_in_process_mode_answers_and_is_scored_with_the_catalog_metric(world, capsys, tmp_path):
    modes = "base,oracle,routed,fused,uniform,merged,ties,multitask"
    code = main(["eval", "generation", "--catalog", str(world["catalog"].root), "--data",
                 str(world["work"] / "test.jsonl"), "--modes", modes, "--work", str(tmp_path / "work"),
                 "--plot", str(tmp_path / "table.png")])
    out, err = last_json(capsys)
    assert code == 0, err
    assert out["n"] == len(world["test"]) and set(out["per_task"]) == set(KEYS)
    assert out["metric"] == {k: world["catalog"].tasks[k].metric for k in KEYS}
    for row in out["per_task"].values():
        assert list(row) == modes.split(",") and all(0 <= v <= 1 for v in row.values())
    assert out["macro"]["oracle"] == pytest.approx(sum(r["oracle"] for r in out["per_task"].values()) / len(KEYS),
                                                   abs=1e-4)
    assert set(out["vs_oracle"]) == set(modes.split(","))
    header = next(line for line in err.splitlines() if line.startswith("task "))
    assert header.split()[3:] == modes.split(",") and "vs oracle" in err
    assert (tmp_path / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    merged = sorted(p.name for p in (tmp_path / "work" / "merged").iterdir())
    assert [m.split("-")[0] for m in merged] == ["linear", "ties"]


def test_engine_answers_equal_generate_and_ood_leaves_the_own_adapter_out(world):
    catalog, test = world["catalog"], world["test"]
    answerer = ge.InProcessAnswerer(catalog, world["work"] / "eval", progress=False)
    routes = answerer.routes("fused", test)
    got = answerer("fused", test)
    model, tokenizer = load_causal_lm(world["base"])
    fused = FusedLoraModel(model, max_loras=len(KEYS), max_rank=8)
    for k in KEYS:
        fused.load_adapter(k, catalog.adapter_path(k))
    prompts = [render(catalog.tasks[r.key].template, r.input) for r in test]
    want = generate(fused, tokenizer, prompts, routes, max_new_tokens=ge.SHORT_ANSWER_TOKENS, stop=[["\n"]] * len(test))
    assert got == [g.text for g in want]

    ood = ge.InProcessAnswerer(catalog, world["work"] / "eval", ood=True, progress=False)
    for mode in ("routed", "fused", "uniform"):
        for r, route in zip(test, ood.routes(mode, test)):
            assert r.key not in [k for k, _ in route] and sum(w for _, w in route) == pytest.approx(1)
    assert all(len(route) == len(KEYS) - 1 for route in ood.routes("uniform", test))
    merged = [route[0][0] for route in ood.routes("merged", test)]
    assert len(set(merged)) == len(KEYS)   # one merge per pool: each task's pool lacks its own adapter
    assert ood.routes("merged", test) == ood.routes("merged", test)   # and the second ask reuses it


def test_the_multitask_adapter_sees_each_tasks_own_template_and_travels_with_the_catalog(world, tmp_path):
    _, tokenizer = load_causal_lm(world["base"])
    groups = group_by_task(demo_records("train"))
    records = [groups[k][0] for k in KEYS]
    templates = {k: world["catalog"].tasks[k].template for k in KEYS}
    examples, _ = _encode(tokenizer, records, templates, "input", 128)
    for r, ex in zip(records, examples):
        prompt = tokenizer(render(templates[r.key], r.input))["input_ids"]
        assert ex["input_ids"][:len(prompt)] == prompt
    catalog = world["catalog"]
    assert catalog.multitask == "multitask" and (catalog.root / "multitask" / "adapter_model.safetensors").is_file()
    assert derive_catalog(catalog, tmp_path / "same").multitask == "multitask"
    assert without_tasks(catalog, [KEYS[0]], tmp_path / "fewer").multitask is None   # trained on another task set


@pytest.mark.parametrize("rows, modes, extra, message", [
    ([{"input": "x", "output": "y", "domain": "fin", "task": "nope"}], "base", [],
     "test.jsonl:1: task: task fin/nope is not in catalog"),
    ([{"input": "x", "output": "y", "domain": "fin", "task": "sentiment"}, {},
      {"input": "x", "output": " ", "domain": "fin", "task": "sentiment"}], "base", [],
     "test.jsonl:3: output: empty"),
    ([{"input": "x", "output": "y", "domain": "fin", "task": "sentiment"}], "selector", [],
     "mode selector: catalog"),
    ([{"input": "x", "output": "y", "domain": "fin", "task": "sentiment"}], "oracle,uniform",
     ["--endpoint", "127.0.0.1:1"], "cannot answer mode(s) ['uniform']"),
    ([{"input": "x", "output": "y", "domain": "fin", "task": "sentiment"}], "routed,bogus", [],
     "unknown mode(s) ['bogus']"),
    ([{"input": "word " * 300, "output": "y", "domain": "fin", "task": "sentiment"}], "base", [],
     "cut prompts with --max-prompt-tokens"),   # beyond the tiny base's 128-token context
    *([] if torch.cuda.is_available() else [
        ([{"input": "x", "output": "y", "domain": "fin", "task": "sentiment"}], "base", ["--device", "cuda"],
         "eval generation: device 'cuda' was asked for, but CUDA is not available")]),
])
def test_bad_data_and_modes_are_refused_by_name(world, capsys, tmp_path, rows, modes, extra, message):
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" if r else "\n" for r in rows))
    code = main(["eval", "generation", "--catalog", str(world["catalog"].root), "--data", str(data),
                 "--modes", modes, *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


def test_multitask_mode_needs_a_catalog_that_carries_one(world, tmp_path):
    plain = Catalog.load(world["catalog"].root)
    bare = build_catalog([r for r in demo_records("val") if r.key in KEYS], tmp_path / "bare",
                         adapters=world["work"] / "adapters", base_model=("tiny-test", world["base"]))
    ge.check_modes(plain, ["multitask"])
    with pytest.raises(ValueError, match="carries no multi-task adapter"):
        ge.check_modes(bare, ["multitask"])
