"""Interrupted training resumes: `switchboard train adapter --config` killed (SIGKILL) after its first
checkpoint, run again, says `resumed from step N` and ends with the weights of an uninterrupted run.
Once in a single process, once on 2 Ray Train workers with DeepSpeed ZeRO-2 (its checkpoints hold
per-rank optimizer shards; a killed driver's workers may outlive it by a few steps, and the new run
waits for them through the adapter directory's lock)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TASK = "fin/sentiment"


PLACEMENTS = {"single": {"workers": 0},
              "zero2": {"workers": 2, "deepspeed": str(REPO / "examples" / "deepspeed-zero2.json")}}
# Long enough that a killed run's Ray workers (which outlive the driver by a few steps) cannot finish it.
STEPS = {"single": 60, "zero2": 240}


def _config(tmp_path: Path, name: str, placement: str = "single") -> Path:
    cfg = {"base_model": "tiny-test", "tasks": "demo", "task": [TASK], "lora": {"variant": "lora", "r": 4, "alpha": 8},
           "train": {"lr": 3.0e-3, "max_steps": STEPS[placement], "batch_size": 8, "save_steps": 10, "warmup_steps": 5},
           "output": str(tmp_path / name), "progress": False, **PLACEMENTS[placement]}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _command(config: Path) -> list[str]:
    return [sys.executable, "-m", "serve_app.cli", "train", "adapter", "--config", str(config)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _run(config: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(_command(config), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _weights(out: Path) -> dict:
    return load_file(out / TASK / "adapter_model.safetensors")


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_killed_run_resumes_and_matches_an_uninterrupted_one(tmp_path, tiny_base, placement):
    reference = _run(_config(tmp_path, "uninterrupted", placement))
    assert "resumed from step" not in reference.stderr

    config = _config(tmp_path, "interrupted", placement)
    ckpts = tmp_path / "interrupted" / TASK / "checkpoints"
    proc = subprocess.Popen(_command(config), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list(ckpts.glob("checkpoint-*/trainer_state.json")):
            assert proc.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "interrupted" / TASK / "training.json").exists(), "killed too late: it had finished"

    resumed = _run(config)
    assert "resumed from step" in resumed.stderr, resumed.stderr[-3000:]
    result = json.loads(resumed.stdout.strip().splitlines()[-1])
    step = result["adapters"][TASK]["resumed_from_step"]
    assert step is not None and 10 <= step < STEPS[placement], result
    assert result["adapters"][TASK]["steps"] == STEPS[placement]

    a, b = _weights(tmp_path / "uninterrupted"), _weights(tmp_path / "interrupted")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"{placement}: killed after a checkpoint, resumed from step {step}; "
          f"max |w_resumed - w_uninterrupted| = {worst:.2e}")
    assert worst < 1e-5, f"resumed weights differ from the uninterrupted run's by {worst}"
    assert max(v.abs().max().item() for v in a.values()) > 1e-3  # the adapter did train


def test_bad_config_names_the_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"tasks": "demo", "output": str(tmp_path / "o"), "lora": {"r": 0}}))
    done = subprocess.run(_command(path), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "run.yaml: lora.r: must be >= 1" in done.stderr
