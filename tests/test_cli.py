"""The `switchboard` console script as users run it: JSON last on stdout, precise errors, exit codes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from serve_app.launch import load_config
from training.demo_corpus import write_demo_corpus

SWITCHBOARD = [str(Path(sys.executable).with_name("switchboard"))]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SWITCHBOARD, *args], capture_output=True, text=True, timeout=300)


def test_catalog_build_show_and_eval_routing(tmp_path):
    data = write_demo_corpus(tmp_path / "data")
    built = run("catalog", "build", "--tasks", str(data["val"]), "--out", str(tmp_path / "cat"))
    assert built.returncode == 0, built.stderr
    summary = json.loads(built.stdout.strip().splitlines()[-1])
    assert summary["base_model"] is None and len(summary["tasks"]) >= 9

    shown = json.loads(run("catalog", "show", str(tmp_path / "cat")).stdout.strip().splitlines()[-1])
    assert shown["version"] == summary["version"]

    for extra in (["--plot", str(tmp_path / "confusion.png")], ["--ood"]):
        res = run("eval", "routing", "--catalog", str(tmp_path / "cat"), "--data", str(data["test"]),
                  "--router", "centroid", *extra)
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert {"n", "top1_task_acc", "top3_task_acc", "domain_acc", "per_task", "confusion", "ms_per_query"} <= set(out)
        assert out["n"] == sum(1 for _ in data["test"].open())
        assert sum(n for row in out["confusion"].values() for n in row.values()) == out["n"]
        if not out["ood"]:
            correct = sum(row.get(truth, 0) for truth, row in out["confusion"].items())
            assert correct == round(out["top1_task_acc"] * out["n"])
            assert (tmp_path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out["ood"] is True and out["top1_task_acc"] == 0.0

    trained = run("train", "router", "--kind", "lexical", "--catalog", str(tmp_path / "cat"),
                  "--tasks", str(data["train"]), "--out", str(tmp_path / "cat-lexical"))
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stdout.strip().splitlines()[-1])["routers"] == ["lexical"]
    res = run("eval", "routing", "--catalog", str(tmp_path / "cat-lexical"), "--data", str(data["test"]))
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["router"] == "lexical" and out["top1_task_acc"] >= 0.9   # `auto` picks the trained router
    # OOD with a trained router retrains it without the held-out tasks: it needs their training records.
    res = run("eval", "routing", "--catalog", str(tmp_path / "cat-lexical"), "--data", str(data["test"]), "--ood")
    assert res.returncode == 2 and "give its training records (--train)" in res.stderr, res.stderr


def test_bad_input_exits_2_with_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "x", "output": "y", "domain": "fin", "task": "a"}\n{"input": "x", "domain": "fin"}\n')
    res = run("catalog", "build", "--tasks", str(bad), "--out", str(tmp_path / "cat"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{bad}:2: output: missing" in res.stderr and f"{bad}:2: task: missing" in res.stderr
    res = run("catalog", "show", str(tmp_path))
    assert res.returncode == 2 and "not a catalog" in res.stderr


def test_a_tree_with_a_test_split_beside_training_files_needs_files_named(tmp_path):
    """The layout real test splits come in: reading the whole tree would train on the test split."""
    for key, rows in (("fin/a", ["up", "down"]), ("med/b", ["dose", "lab"])):
        (tmp_path / "tree" / key).mkdir(parents=True)
        for split, text in zip(("train", "test"), rows):
            (tmp_path / "tree" / key / f"{split}.jsonl").write_text(json.dumps({"input": text, "output": "x"}) + "\n")
    build = ("catalog", "build", "--tasks", str(tmp_path / "tree"), "--out")
    res = run(*build, str(tmp_path / "all"))
    assert res.returncode == 2 and "holds a test split" in res.stderr and "--files" in res.stderr
    assert not (tmp_path / "all").exists()
    res = run(*build, str(tmp_path / "train"), "--files", "train*.jsonl")
    assert res.returncode == 0, res.stderr
    assert sorted(json.loads(res.stdout.strip().splitlines()[-1])["tasks"]) == ["fin/a", "med/b"]


def test_training_configs_are_validated_before_any_work(tmp_path):
    """`train adapter --config` and `sweep --config`: a bad key is named with its file, exit 2, nothing written."""
    run_cfg = tmp_path / "run.yaml"
    run_cfg.write_text(f"tasks: demo\noutput: {tmp_path / 'out'}\nlora: {{variant: lora, rank: 8}}\n")
    res = run("train", "adapter", "--config", str(run_cfg))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "run.yaml" in res.stderr and "lora.rank" in res.stderr, res.stderr
    sweep_cfg = tmp_path / "sweep.yaml"
    sweep_cfg.write_text("tasks: demo\nvariants: [lora, qlora]\n")
    res = run("sweep", "--config", str(sweep_cfg))
    assert res.returncode == 2 and "sweep.yaml" in res.stderr and "variants.1" in res.stderr, res.stderr
    res = run("train", "adapter", "--tasks", str(run_cfg))
    assert res.returncode == 2 and "give --config FILE, or --tasks and --out" in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["data", "select", "--tasks", "{data}", "--per-task", "2", "--out", "{dir}"], "--out {dir}: is a directory"),
    (["data", "select", "--tasks", "{data}", "--per-task", "2", "--seed", "99999999999", "--out", "{tmp}/s.jsonl"],
     "--seed: must be a 32-bit integer"),
    (["catalog", "build", "--tasks", "{data}", "--out", "{data}"], "already exists and is not an empty directory"),
    (["catalog", "build", "--tasks", "{data}", "--per-task", "0", "--out", "{tmp}/c"], "--per-task: must be at least 1"),
    (["eval", "routing", "--catalog", "{dir}", "--data", "{data}", "--plot", "{tmp}/confusion.txt"],
     "expected a .png file name"),
    (["serve", "--catalog", "{dir}"], "is not a catalog"),
    (["train", "adapter", "--config", "{tmp}/deepspeed.yaml"], "deepspeed: expected a DeepSpeed config object"),
    (["train", "adapter", "--config", "{tmp}/inf.yaml"], "train.epochs"),
])
def test_bad_paths_and_values_are_refused_before_any_work(tmp_path, args, message):
    """Each of these used to end in a traceback, or only after the expensive part of the command."""
    paths = {"tmp": tmp_path, "data": tmp_path / "d.jsonl", "dir": tmp_path / "full"}
    paths["data"].write_text('{"input": "x", "output": "y", "domain": "fin", "task": "a"}\n')
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    (tmp_path / "deepspeed.yaml").write_text("tasks: demo\noutput: out\ndeepspeed: {zero_optimization: 3}\n")
    (tmp_path / "inf.yaml").write_text("tasks: demo\noutput: out\ntrain: {max_steps: null, epochs: .inf}\n")
    res = run(*(a.format(**paths) for a in args))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert message.format(**paths) in res.stderr, res.stderr


def test_serve_config_must_be_a_serve_config(tmp_path):
    for text, message in [("- 1\n", "needs `applications:`"), ("applications: [\n", "not a readable Serve config"),
                          ("applications: [{name: x}]\n", "grpc_servicer_functions")]:
        (tmp_path / "serve.yaml").write_text(text)
        with pytest.raises(ValueError, match=message):
            load_config(tmp_path / "serve.yaml")
