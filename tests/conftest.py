"""Shared fixtures. Tests run offline, on CPU, and leave nothing behind outside pytest's temp dirs."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)
# Without CUDA, Triton kernels run in Triton's CPU interpreter (tests/test_backends.py). The mode is
# fixed when triton is first imported (transformers/peft import it), so it must be set here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory) -> Path:
    """Base models, caches and Ray's session files go to a temp dir, unless SWITCHBOARD_HOME is set."""
    home = Path(os.environ.get("SWITCHBOARD_HOME") or tmp_path_factory.mktemp("switchboard-home"))
    os.environ["SWITCHBOARD_HOME"] = str(home)
    # Ray's socket paths must stay short: a short dir under /tmp rather than pytest's deep tmp paths.
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="sbray-", dir="/tmp"))
    return home


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    from training.base_model import resolve_base_model

    return resolve_base_model("tiny-test", progress=False)


@pytest.fixture(scope="session")
def encoder():
    from routing.encoder import shared_encoder

    return shared_encoder()


@pytest.fixture(scope="session")
def free_port():
    """A function returning a loopback port nobody listens on."""

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick


@pytest.fixture(scope="session")
def shared_data():
    """A function giving a path under ../shared/data, or skipping the test when the real data is absent."""

    def find(*parts: str) -> Path:
        path = SHARED_DATA.joinpath(*parts)
        if not path.exists():
            pytest.skip(f"real data not available at {path}")
        return path

    return find


@pytest.fixture(scope="session")
def small_catalog(tmp_path_factory, tiny_base):
    """A servable catalog in seconds: two demo tasks, adapters of two steps on the tiny base (for ops tests,
    where what is served matters less than that it is served)."""
    from training.adapter import TrainSpec, train_adapters
    from training.catalog_build import build_catalog
    from training.demo_corpus import demo_records

    keys = ("fin/sentiment", "med/dose")
    work = tmp_path_factory.mktemp("small-catalog")
    train_adapters(tiny_base, [r for r in demo_records("train") if r.key in keys], work / "adapters",
                   train=TrainSpec(max_steps=2), progress=False)
    return build_catalog([r for r in demo_records("val") if r.key in keys], work / "catalog",
                         adapters=work / "adapters", base_model=("tiny-test", tiny_base))
