"""Typed configs for a training run (`RunConfig`) and a hyper-parameter sweep (`SweepConfig`).

Both come from YAML or JSON files through `load_run_config` / `load_sweep_config`, which reject
unknown keys and name the bad key in every message (`sweep.yaml: lora.r: must be >= 1`). Relative
paths in a config are relative to the working directory, like command-line arguments; they are made
absolute at load time, because Ray workers and Tune trials run in other directories.

    # run.yaml: one adapter per task, on 2 Ray Train workers with DeepSpeed ZeRO-2
    base_model: tiny
    tasks: demo                   # or a records path (JSONL, JSON, AS config, <domain>/<task>/ tree)
    task: [fin/sentiment]         # optional filter (task keys); default: every task
    lora: {variant: lora, r: 8, alpha: 16}
    train: {lr: 3.0e-3, max_steps: 200, batch_size: 16}
    workers: 2                    # 0 or 1: a single process (no Ray)
    deepspeed: examples/deepspeed-zero2.json
    output: runs/adapters         # adapters land in <output>/<domain>/<task>
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from routing.devices import DeviceName, DtypeName
from training.adapter import DEFAULT_TARGETS, VARIANTS, LoraSpec, TrainSpec, Variant
from training.records import TextMode

DEMO = "demo"
_LORA, _TRAIN = LoraSpec(), TrainSpec()  # defaults come from training.adapter, so the two never disagree


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _abspath(v: str | None) -> str | None:
    return None if v is None else str(Path(v).expanduser().resolve())


def _check_records(v: str) -> str:
    """'demo' or a path, made absolute. Existence is checked when the records load (`load_records` names
    the file), so a config written for another machine (a k8s ConfigMap) still validates here."""
    return v if v == DEMO else _abspath(v)


class LoraConfig(_Strict):
    """The adapter to train (see `training.adapter.LoraSpec`)."""

    variant: Variant = Field(_LORA.variant, description="lora | rslora | dora | pissa")
    r: int = Field(_LORA.r, ge=1, description="rank")
    alpha: int = Field(_LORA.alpha, ge=1, description="scale numerator (alpha / r, or alpha / sqrt(r) for rslora)")
    dropout: float = Field(_LORA.dropout, ge=0, lt=1)
    target_modules: list[str] = Field(list(DEFAULT_TARGETS), min_length=1, description="module names LoRA wraps")

    def to_spec(self) -> LoraSpec:
        return LoraSpec(variant=self.variant, r=self.r, alpha=self.alpha, dropout=self.dropout,
                        target_modules=tuple(self.target_modules))


class _Schedule(_Strict):
    epochs: float = Field(_TRAIN.epochs, gt=0, description="used when max_steps is null")
    max_steps: int | None = Field(_TRAIN.max_steps, ge=1, description="optimizer steps; null: from epochs")
    batch_size: int = Field(_TRAIN.batch_size, ge=1, description="global batch: split across workers, so any "
                                                                 "worker count sees the same batches")
    seed: int = _TRAIN.seed
    max_length: int = Field(_TRAIN.max_length, ge=8, description="prompt + answer tokens")
    save_steps: int = Field(_TRAIN.save_steps, ge=1, description="checkpoint every this many steps (resume point)")
    warmup_steps: int = Field(_TRAIN.warmup_steps, ge=0)
    device: DeviceName = Field("auto", description="auto: the GPU when the process has one (a Ray Train worker: "
                                                   "use_gpu), else the CPU; cuda without CUDA is an error")
    dtype: DtypeName = Field("auto", description="auto: bf16 mixed precision on GPU (fp16 where bf16 is "
                                                 "unsupported), fp32 on CPU; LoRA weights stay fp32")

    def to_spec(self, lr: float) -> TrainSpec:
        return TrainSpec(lr=lr, epochs=self.epochs, max_steps=self.max_steps, batch_size=self.batch_size,
                         seed=self.seed, max_length=self.max_length, save_steps=self.save_steps,
                         warmup_steps=self.warmup_steps, device=self.device, dtype=self.dtype)


class TrainConfig(_Schedule):
    """How long and how fast (see `training.adapter.TrainSpec`)."""

    lr: float = Field(_TRAIN.lr, gt=0)

    def to_spec(self, lr: float | None = None) -> TrainSpec:
        return super().to_spec(self.lr if lr is None else lr)


class _Placement(_Strict):
    """Where training runs: shared by RunConfig and by each sweep trial."""

    workers: int = Field(0, ge=0, description="Ray Train workers; 0 or 1 = a single process without Ray")
    use_gpu: bool = Field(False, description="one GPU per Ray Train worker (needs workers >= 1)")
    deepspeed: str | dict[str, Any] | None = Field(
        None, description="DeepSpeed config: a JSON file or an inline dict (ZeRO stage 1 or 2); runs under Ray Train")

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed(cls, v):
        if isinstance(v, str):
            path = Path(v).expanduser()
            if not path.is_file():
                raise ValueError(f"no such file: {path}")
            try:
                v = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: malformed JSON: {e.msg} (line {e.lineno})") from None
        if v is not None:
            zero = (v.get("zero_optimization") or {}) if isinstance(v, dict) else None
            if not isinstance(zero, dict):
                raise ValueError("expected a DeepSpeed config object, with zero_optimization an object "
                                 "(examples/deepspeed-zero2.json)")
            stage = zero.get("stage", 0)
            if stage not in (0, 1, 2):
                raise ValueError(f"zero_optimization.stage {stage!r} is not supported here; use 1 or 2 "
                                 f"(stage 3 shards the LoRA weights, and saving them needs a gather)")
        return v

    def train_workers(self) -> int:
        """Ray Train workers to start: 0 means run in this process."""
        if self.deepspeed is not None or self.use_gpu:
            return max(1, self.workers)
        return self.workers if self.workers >= 2 else 0

    def _check_placement(self, train: "_Schedule") -> None:
        n = max(1, self.train_workers())
        if train.batch_size % n:
            raise ValueError(f"train.batch_size {train.batch_size} must be divisible by workers={n} "
                             f"(each worker takes batch_size / workers rows per step)")
        if train.device == "cpu" and self.use_gpu:
            raise ValueError("train.device cpu contradicts use_gpu: true")
        if train.device == "cuda" and self.train_workers() and not self.use_gpu:
            raise ValueError("train.device cuda under Ray Train needs use_gpu: true (a worker sees only the GPUs "
                             "Ray gives it)")


class _Selection(_Strict):
    """How the AS selector's training data is chosen (`training.selection`): K-means representatives."""

    per_task: int = Field(100, ge=1, description="K-means representatives per task")
    embed: Literal["encoder", "base-embeddings"] = Field(
        "encoder", description="what K-means clusters (base-embeddings: the AS paper's way)")
    metric: Literal["l2", "ip", "cos"] = Field("cos", description="the K-means distance")
    prompt: Literal["ours", "paper"] = Field("ours", description="the selector's prompt (paper: AS App. A)")


class RunConfig(_Placement, _Selection):
    """One training run: adapters (one per task) or the AS selector router (the selection fields: selector only)."""

    kind: Literal["adapters", "selector"] = Field("adapters", description="what to train")
    base_model: str = Field("tiny", description="tiny | tiny-test | smollm2 | a Hugging Face model directory")
    tasks: str = Field(DEMO, description="records path, or 'demo' for the demo corpus's train split")
    task: list[str] | None = Field(None, description="only these task keys (domain/task); default: all")
    text_mode: TextMode = "input"
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    output: str = Field(description="adapters: <output>/<domain>/<task>; selector: the new catalog directory")
    catalog: str | None = Field(None, description="selector only: the catalog the selector routes over")
    progress: bool = True

    @field_validator("output", "catalog")
    @classmethod
    def _absolute(cls, v):
        return _abspath(v)

    @field_validator("tasks")
    @classmethod
    def _records(cls, v: str) -> str:
        return _check_records(v)

    @model_validator(mode="after")
    def _cross(self) -> "RunConfig":
        self._check_placement(self.train)
        if self.kind == "selector" and self.catalog is None:
            raise ValueError("catalog: required when kind is 'selector'")
        return self


class AshaConfig(_Strict):
    """ASHA (async successive halving): at each rung a trial continues only if it is in the top 1/reduction_factor
    of the trials that reached that rung so far. Time is counted in reports (every `eval_every` steps)."""

    metric: Literal["eval_loss", "score"] = Field("eval_loss", description="what rungs compare (smooth: eval_loss)")
    grace_period: int = Field(1, ge=1, description="reports before a trial can be stopped")
    reduction_factor: float = Field(2, gt=1)


class SelectorSweep(_Selection):
    """Sweep the AS selector (one LoRA naming the task of every request) instead of per-task adapters."""

    catalog: str = Field(description="the catalog the selector routes over; the best trial becomes its child "
                                     "version (under the sweep's `catalog` directory)")

    @field_validator("catalog")
    @classmethod
    def _absolute(cls, v):
        return _abspath(v)


class SweepConfig(_Placement):
    """A Ray Tune sweep over variant x r x alpha x lr (x dropout): for every task (its adapter, best trial per
    task exported), or for the AS selector (`selector:`, best trial exported with the selector inside)."""

    base_model: str = "tiny"
    tasks: str = Field(DEMO, description="records path, or 'demo' (train split; the demo val split evaluates)")
    task: list[str] | None = Field(None, description="only these task keys; default: every task in the data")
    val: str | None = Field(None, description="validation records; default: demo val, or val_fraction held out")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    val_per_task: int = Field(20, ge=1, description="validation rows scored per task at each report")
    text_mode: TextMode = "input"
    variants: list[Variant] = Field(list(VARIANTS), min_length=1)
    r: list[int] = Field([8], min_length=1)
    alpha: list[int] = Field([16], min_length=1)
    lr: list[float] = Field([3e-3], min_length=1)
    dropout: list[float] = Field([0.0], min_length=1)
    target_modules: list[str] = Field(list(DEFAULT_TARGETS), min_length=1)
    train: _Schedule = _Schedule()
    eval_every: int | None = Field(None, ge=1, description="steps between reports; default: a quarter of the run")
    scheduler: Literal["asha", "fifo"] = Field("asha", description="fifo: no early stopping")
    asha: AshaConfig = AshaConfig()
    metric: Literal["score", "eval_loss"] = Field("score", description="picks the best trial (score: the task's "
                                                                       "metric on val, higher is better)")
    num_samples: int = Field(1, ge=1, description="repeats of the whole grid (different seeds)")
    max_concurrent: int | None = Field(None, ge=1, description="default: as many trials as the CPUs hold")
    cpus_per_trial: float = Field(1, gt=0, description="single-process trials; Ray Train trials take 1 per worker")
    shuffle_seed: int = Field(0, description="trial order (ASHA stops a trial only when better ones got there first)")
    export_dora: bool = Field(False, description="DoRA trials may win 'best' only when true; serving refuses DoRA")
    output: str = Field("runs/sweep", validate_default=True, description="results, plot and trial adapters")
    catalog: str | None = Field(None, description="parent dir of the exported catalog version (default: "
                                                  "<output>/catalogs)")
    storage: str | None = Field(None, description="Ray Tune storage_path (shared by all nodes; default <output>/ray)")
    dashboard: bool = Field(True, description="start the Ray dashboard when it is installed")
    selector: SelectorSweep | None = Field(None, description="sweep the selector over this catalog's tasks; score: "
                                                             "its routing top-1 on the validation split")

    @field_validator("output", "catalog", "storage")
    @classmethod
    def _absolute(cls, v):
        return _abspath(v)

    @field_validator("tasks", "val")
    @classmethod
    def _records(cls, v):
        return None if v is None else _check_records(v)

    @field_validator("r", "alpha", "lr", "dropout")
    @classmethod
    def _space(cls, v: list, info):
        bad = {"r": lambda x: x < 1, "alpha": lambda x: x <= 0, "lr": lambda x: x <= 0,
               "dropout": lambda x: not 0 <= x < 1}[info.field_name]
        rule = {"r": ">= 1", "alpha": "> 0", "lr": "> 0", "dropout": "in [0, 1)"}[info.field_name]
        for x in v:
            if bad(x):
                raise ValueError(f"every value must be {rule}, got {x!r}")
        if len(set(v)) != len(v):
            raise ValueError(f"values repeat: {v}")
        return v

    @model_validator(mode="after")
    def _cross(self) -> "SweepConfig":
        self._check_placement(self.train)
        return self

    @property
    def catalog_dir(self) -> Path:
        return Path(self.catalog) if self.catalog else Path(self.output) / "catalogs"

    @property
    def storage_dir(self) -> Path:
        return Path(self.storage) if self.storage else Path(self.output) / "ray"

    def grid_size(self) -> int:
        return (len(self.variants) * len(self.r) * len(self.alpha) * len(self.lr) * len(self.dropout)
                * self.num_samples)


# ---- loading ------------------------------------------------------------------------------------
_MESSAGES = {
    "greater_than_equal": "must be >= {ge}", "greater_than": "must be > {gt}", "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}", "extra_forbidden": "unknown key", "missing": "required",
    "too_short": "must have at least {min_length} item(s)", "literal_error": "must be one of {expected}",
}


def _message(err: dict) -> str:
    where = ".".join(str(p) for p in err["loc"])
    template = _MESSAGES.get(err["type"])
    if template:
        try:
            return f"{where}: {template.format(**err.get('ctx', {}))}" if where else template
        except KeyError:
            pass
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg  # cross-field checks name their keys themselves


def _read(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p.name}: not UTF-8 text (byte {e.start + 1})") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{p.name}: malformed {'JSON' if p.suffix == '.json' else 'YAML'}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p.name}: expected a mapping of keys, got {type(data).__name__}")
    return data


def _parse(model: type[BaseModel], data: dict, name: str):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        raise ConfigError("\n".join(f"{name}: {_message(err)}" for err in errors)) from None


def load_run_config(path: str | Path) -> RunConfig:
    """Read a run config (YAML or JSON); raise `ConfigError` naming the file and every bad key."""
    return _parse(RunConfig, _read(path), Path(path).name)


def load_sweep_config(path: str | Path) -> SweepConfig:
    """Read a sweep config (YAML or JSON); raise `ConfigError` naming the file and every bad key."""
    return _parse(SweepConfig, _read(path), Path(path).name)


def run_config(**kwargs) -> RunConfig:
    """A RunConfig from keyword arguments, with the same error messages as a file."""
    return _parse(RunConfig, kwargs, "config")


def sweep_config(**kwargs) -> SweepConfig:
    return _parse(SweepConfig, kwargs, "config")
