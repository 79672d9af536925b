"""Training one LoRA adapter for one task (or a set of tasks), with transformers' Trainer and peft.

The prompt is the task's template filled with what a client sends (`record.text(text_mode)`); the
target is `record.output` plus EOS, and only target tokens carry loss. The result is a peft adapter
directory (safetensors) whose `adapter_config.json` names the base model by
`routing.base_models.base_model_id`, which catalogs check.

Lifecycle of `out_dir`:
- `checkpoints/` holds Trainer checkpoints every `save_steps`; a call that finds them resumes from
  the last complete one (and says so on stderr). A checkpoint of a different run (other records,
  base or specs) is discarded, not resumed.
- On success the adapter files are moved in (weights first, config second) and `training.json` is
  written last: **a directory is a finished adapter exactly when `training.json` exists**. A second
  call with the same inputs finds it and returns at once; checkpoints are removed.
- PiSSA trains on a residual base; the saved adapter is converted to a plain LoRA delta on the
  unmodified base (rank and alpha doubled) so serving shares one base for every adapter.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence, get_args

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from routing.base_models import base_model_id, load_causal_lm
from routing.devices import PlacementError, resolve_placement
from routing.templates import render, template_for
from training.records import Record, group_by_task

Variant = Literal["lora", "rslora", "dora", "pissa"]
VARIANTS: tuple[str, ...] = get_args(Variant)
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")  # moved in this order
DONE_MARKER = "training.json"
CHECKPOINTS = "checkpoints"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Template = str | Mapping[str, str]   # one template, or one per task key


def _log(msg: str) -> None:
    print(f"[adapter] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class LoraSpec:
    """Which low-rank adapter to train. `variant` picks the peft flavour:
    `lora` (plain), `rslora` (scale alpha/sqrt(r)), `dora` (weight-decomposed, has a magnitude vector),
    `pissa` (initialised from the principal singular vectors; saved as a plain LoRA delta)."""

    variant: Variant = "lora"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05      # the AS paper's Table 1 (r=8, alpha=16, dropout 0.05)
    target_modules: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown LoRA variant {self.variant!r}; choose from {', '.join(VARIANTS)}")
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r must be an integer >= 1, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")

    def to_peft(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=list(self.target_modules),
            bias="none", task_type="CAUSAL_LM", use_rslora=self.variant == "rslora", use_dora=self.variant == "dora",
            init_lora_weights="pissa" if self.variant == "pissa" else True)


@dataclass(frozen=True)
class TrainSpec:
    """How long and how fast. Steps are `max_steps` when set, else `ceil(epochs * len(records) / batch_size)`.
    The defaults train a demo adapter on the `tiny` base in about 15 s of CPU."""

    lr: float = 3e-3            # LoRA on a small model tolerates (and needs) a high rate for a short run
    epochs: float = 8.0
    max_steps: int | None = 300
    batch_size: int = 16
    seed: int = 0
    max_length: int = 128       # prompt + answer tokens; longer prompts lose their start
    save_steps: int = 50
    warmup_steps: int = 10
    device: str = "auto"        # auto|cpu|cuda and auto|float32|bfloat16|float16 (routing/devices.py): where
    dtype: str = "auto"         # it trains, not what: neither enters the fingerprint

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.max_steps is None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0 when max_steps is not set, got {self.epochs!r}")
        for name in ("batch_size", "max_length", "save_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps!r}")

    def steps_for(self, n_records: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * n_records / self.batch_size))


# ---- data ---------------------------------------------------------------------------------------
def _encode(tokenizer: PreTrainedTokenizerBase, records: list[Record], template: Template, text_mode: str,
            max_length: int) -> tuple[list[dict[str, list[int]]], int]:
    """Prompt ids (as generation will see them) + answer ids + EOS; labels mask the prompt. `template`
    is one for all records, or one per task key (a multi-task adapter sees each task's own prompt)."""
    prompts = tokenizer([render(template if isinstance(template, str) else template[r.key], r.text(text_mode))
                         for r in records])["input_ids"]
    answers = tokenizer([r.output for r in records], add_special_tokens=False)["input_ids"]
    examples, truncated = [], 0
    for prompt, answer in zip(prompts, answers):
        answer = answer + [tokenizer.eos_token_id]
        if len(prompt) + len(answer) > max_length:
            truncated += 1
            keep = max_length - len(answer)
            if keep < 1:
                raise ValueError(f"an answer of {len(answer)} tokens does not fit max_length={max_length}")
            prompt = prompt[-keep:]
        examples.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return examples, truncated


def _schedule(examples: list, steps: int, batch_size: int, seed: int) -> list:
    """The whole run's example order, epoch after epoch, each epoch shuffled by its own seed.

    Fixing the order up front (and reading it sequentially) makes a resumed run see exactly the
    batches an uninterrupted one would.
    """
    order: list = []
    epoch = 0
    while len(order) < steps * batch_size:
        idx = list(range(len(examples)))
        random.Random(f"{seed}:{epoch}").shuffle(idx)
        order += [examples[i] for i in idx]
        epoch += 1
    return order[:steps * batch_size]


class _Collator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # (B, T), right-padded
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class _AnswerLossTrainer(Trainer):
    """Computes logits only where there is a target (the schedule is read in order: `_schedule`)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The causal-LM loss (mean over answer tokens), with the LM head applied to answer positions
        only: prompts carry no loss, and on a small model the head over every position costs a fifth of
        the step. A wrapped model (DDP, DeepSpeed) takes the standard path: its forward syncs gradients,
        and the Trainer weighs the loss by the answer tokens of the whole global batch, not of this
        worker's share. (DeepSpeed's engine passes attribute lookups through to the model, so the test
        is identity, not `hasattr`.)"""
        causal_lm = model.get_base_model() if model is self.model else None
        if return_outputs or not (hasattr(causal_lm, "model") and hasattr(causal_lm, "lm_head")):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        hidden = causal_lm.model(input_ids=inputs["input_ids"],
                                 attention_mask=inputs["attention_mask"]).last_hidden_state  # (B, T, H)
        targets = inputs["labels"][:, 1:]  # (B, T-1): the token at t+1 is predicted at t
        keep = targets != -100
        logits = causal_lm.lm_head(hidden[:, :-1][keep])  # (N answer tokens, V)
        return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


class ProgressBar(TrainerCallback):
    """A Trainer's progress on stderr (transformers' own bar writes its log lines to stdout, where a
    command's JSON result goes), with the last logged loss."""

    def __init__(self, desc: str, enabled: bool):
        self.desc, self.enabled, self.bar = desc, enabled, None

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.desc, file=sys.stderr,
                        disable=not self.enabled)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


# ---- checkpoints and the finished directory ------------------------------------------------------
def _fingerprint(base_id: str, records: list[Record], template: Template, text_mode: str, lora: LoraSpec,
                 train: TrainSpec, init_adapter: Path | None = None) -> str:
    what = {k: v for k, v in asdict(train).items() if k not in ("device", "dtype")}
    h = hashlib.sha256(json.dumps({"base": base_id, "template": template, "text_mode": text_mode,
                                   "lora": asdict(lora), "train": what}, sort_keys=True).encode())
    if init_adapter is not None:
        h.update((init_adapter / "adapter_model.safetensors").read_bytes())
    for r in records:
        h.update(r.to_json().encode() + b"\n")
    return h.hexdigest()[:16]


def _last_checkpoint(ckpt_dir: Path) -> tuple[Path, int] | None:
    """The newest checkpoint that was written completely (Trainer writes trainer_state.json last)."""
    found = []
    for d in ckpt_dir.glob("checkpoint-*"):
        step = d.name.removeprefix("checkpoint-")
        if step.isdigit() and (d / "trainer_state.json").is_file() and (d / "adapter_model.safetensors").is_file():
            found.append((int(step), d))
    if not found:
        return None
    step, d = max(found)
    return d, step


def _is_done(out: Path, fingerprint: str) -> bool:
    marker = out / DONE_MARKER
    if not marker.is_file() or not all((out / f).is_file() for f in ADAPTER_FILES):
        return False
    try:
        return json.loads(marker.read_text()).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        return False


def _prepare(out: Path, fingerprint: str) -> Path:
    """Drop a stale finished adapter and foreign checkpoints; return the checkpoint folder."""
    (out / DONE_MARKER).unlink(missing_ok=True)  # first, so the directory never looks finished meanwhile
    for f in ADAPTER_FILES:
        (out / f).unlink(missing_ok=True)
    ckpt = out / CHECKPOINTS
    owner = ckpt / "fingerprint.txt"
    if ckpt.exists() and (not owner.is_file() or owner.read_text().strip() != fingerprint):
        _log(f"discarding checkpoints in {ckpt}: they belong to another run")
        shutil.rmtree(ckpt)
    ckpt.mkdir(parents=True, exist_ok=True)
    owner.write_text(fingerprint + "\n")
    return ckpt


def _publish(staging: Path, out: Path, base_id: str, summary: dict) -> None:
    config_path = staging / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_id
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in ADAPTER_FILES:
        os.replace(staging / name, out / name)
    tmp = out / (DONE_MARKER + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / DONE_MARKER)


def _peft_model(base_path: Path, lora: LoraSpec, seed: int, staging: Path | None,
                init_adapter: Path | None = None):
    """The base model with a new adapter (or `init_adapter`, to train further), seeded.

    PITFALLS.md: a PiSSA run keeps its untrained adapter, saved as a plain init into `staging`
    (None: another process does), for the conversion to a plain delta at save time. The init is a
    deterministic SVD of the base, so a resumed run recomputes the same one.
    """
    from peft import PeftModel, get_peft_model

    torch.manual_seed(seed)
    model, tokenizer = load_causal_lm(base_path)
    if init_adapter is not None:
        peft_model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    else:
        peft_model = get_peft_model(model, lora.to_peft())
    if lora.variant == "pissa":
        peft_model.peft_config["default"].init_lora_weights = True
        if staging is not None:
            peft_model.save_pretrained(staging / "pissa-init")
    return peft_model, tokenizer


def precision_args(train: TrainSpec, *, gpu_assigned: bool, who: str) -> dict[str, bool]:
    """TrainingArguments for `train.device` / `train.dtype` by the serving rule (routing/devices.py): auto is
    the GPU when this process has one, in bf16 (fp16 where bf16 is unsupported), else the CPU in fp32.
    Half precision is the Trainer's mixed precision: LoRA weights and optimizer state stay fp32 and the
    saved adapter is the same format either way. Raises `PlacementError` naming `who`."""
    where = resolve_placement(train.device, train.dtype, gpu_assigned=gpu_assigned, who=who)
    if not where.is_cuda and where.dtype == torch.float16:
        raise PlacementError(f"{who}: float16 training needs a GPU (the Trainer's fp16 is CUDA-only); "
                             "use bfloat16 or float32 on the CPU")
    return {"use_cpu": not where.is_cuda, "bf16": where.dtype == torch.bfloat16, "fp16": where.dtype == torch.float16}


def _trainer(peft_model, tokenizer, examples: list[dict], ckpt_dir: Path, train: TrainSpec, steps: int,
             per_device_batch: int, callbacks: list[TrainerCallback], **placement) -> "_AnswerLossTrainer":
    """The Trainer every placement uses; `placement` adds its TrainingArguments (use_cpu, bf16, deepspeed, ...)."""
    args = TrainingArguments(
        output_dir=str(ckpt_dir), per_device_train_batch_size=per_device_batch, learning_rate=train.lr,
        max_steps=steps, num_train_epochs=1, lr_scheduler_type="linear", warmup_steps=min(train.warmup_steps, steps),
        weight_decay=0.0, logging_steps=max(1, min(10, steps // 10)), save_strategy="steps", save_steps=train.save_steps,
        save_total_limit=2, seed=train.seed, data_seed=train.seed, report_to=[], disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, train_sampling_strategy="sequential",  # `_schedule`
        **placement)
    trainer = _AnswerLossTrainer(model=peft_model, args=args,
                                  train_dataset=_schedule(examples, steps, train.batch_size, train.seed),
                                  data_collator=_Collator(tokenizer.pad_token_id), callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # it prints every log line to stdout; ProgressBar shows the loss
    return trainer


def _save(trainer, peft_model, lora: LoraSpec, out: Path, staging: Path, base_id: str, summary: dict) -> None:
    """Publish the trained adapter (PiSSA converted to a plain delta on the unmodified base) with its
    summary, then drop the staging area and the checkpoints."""
    if lora.variant == "pissa":
        peft_model.save_pretrained(staging / "adapter", safe_serialization=True,
                                   path_initial_model_for_weight_conversion=str(staging / "pissa-init"))
    else:
        peft_model.save_pretrained(staging / "adapter", safe_serialization=True)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    summary = {**summary, "steps": trainer.state.global_step, "final_loss": round(losses[-1], 5) if losses else None}
    _publish(staging / "adapter", out, base_id, summary)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)


# ---- training -----------------------------------------------------------------------------------
def train_adapter(base_path: str | Path, records: list[Record], template: Template, out_dir: str | Path,
                  lora: LoraSpec = LoraSpec(), train: TrainSpec = TrainSpec(), text_mode: str = "input",
                  progress: bool = True, callbacks: Sequence[TrainerCallback] = (),
                  init_adapter: str | Path | None = None) -> Path:
    """Train (or resume, or find already trained) the adapter for `records`; return `out_dir`.

    `init_adapter` continues training a saved adapter (a second fine-tuning, as the AS selector's
    updates do) instead of starting from peft's initialisation; `lora` must describe it.
    `callbacks` are extra Trainer callbacks (tests use one to interrupt a run).
    """
    if not records:
        raise ValueError("no records to train on")
    base_path, out = Path(base_path), Path(out_dir)
    base_id = base_model_id(base_path)
    init_adapter = Path(init_adapter) if init_adapter is not None else None
    if init_adapter is not None and lora.variant == "pissa":
        raise ValueError("init_adapter: a saved PiSSA adapter is a plain LoRA delta; continue it as variant 'lora'")
    fingerprint = _fingerprint(base_id, records, template, text_mode, lora, train, init_adapter)
    keys = sorted(group_by_task(records))
    name = ",".join(keys) if len(keys) <= 3 else f"{len(keys)} tasks"
    if _is_done(out, fingerprint):
        _log(f"{name}: up to date in {out}")
        return out

    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = _prepare(out, fingerprint)
    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)

    peft_model, tokenizer = _peft_model(base_path, lora, train.seed, staging, init_adapter)
    examples, truncated = _encode(tokenizer, records, template, text_mode, train.max_length)
    if truncated:
        _log(f"{name}: {truncated} of {len(records)} prompts cut to max_length={train.max_length} (start dropped)")
    steps = train.steps_for(len(records))
    resume = _last_checkpoint(ckpt_dir)
    if resume:
        _log(f"{name}: resumed from step {resume[1]}")
    trainer = _trainer(peft_model, tokenizer, examples, ckpt_dir, train, steps, train.batch_size,
                       [ProgressBar(f"adapter {name}", progress), *callbacks],
                       **precision_args(train, gpu_assigned=torch.cuda.is_available(), who=f"adapter {name}"))
    trainer.train(resume_from_checkpoint=str(resume[0]) if resume else None)
    _save(trainer, peft_model, lora, out, staging, base_id, {
        "tasks": keys, "n_records": len(records), "seconds": round(time.monotonic() - started, 2),
        "resumed_from_step": resume[1] if resume else None, "base_model_id": base_id, "template": template,
        "text_mode": text_mode, "lora": asdict(lora), "train": asdict(train), "fingerprint": fingerprint})
    return out


# ---- evaluation helper --------------------------------------------------------------------------
@torch.inference_mode()
def generate_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                     max_new_tokens: int = 16, batch_size: int = 32) -> list[str]:
    """Greedy answers for already-rendered prompts: left-padded batches, new tokens only, cut at the
    first newline (generation stops at EOS). For tests and accuracy checks; serving has its own path."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    answers: list[str] = []
    for i in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, padding_side="left")
        batch = batch.to(model.device)
        generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                                   eos_token_id=tokenizer.eos_token_id)
        new = generated[:, batch["input_ids"].shape[1]:]  # (B, new tokens)
        for text in tokenizer.batch_decode(new, skip_special_tokens=True):
            answers.append(text.split("\n", 1)[0].strip())
    return answers


def train_adapters(base_path: str | Path, records: list[Record], out_dir: str | Path, *, lora: LoraSpec = LoraSpec(),
                   train: TrainSpec = TrainSpec(), tasks: Sequence[str] | None = None, text_mode: str = "input",
                   progress: bool = True) -> dict[str, Path]:
    """One adapter per task into `out_dir/<domain>/<task>` (the layout `catalog build --adapters` reads).

    Each task's template comes from `routing.templates.template_for`, the function the catalog uses
    too, so training and serving render identical prompts. Up-to-date adapters are skipped.
    """
    groups = group_by_task(records)
    unknown = sorted(set(tasks or ()) - set(groups))
    if unknown:
        raise ValueError(f"no records for task(s) {unknown}; the data has {sorted(groups)}")
    done = {}
    for key in tasks or groups:
        rows = groups[key]
        template = template_for((r.instruction for r in rows), text_mode)
        done[key] = train_adapter(base_path, rows, template, Path(out_dir) / key, lora=lora, train=train,
                                  text_mode=text_mode, progress=progress)
    return done


def train_multitask(base_path: str | Path, records: list[Record], out_dir: str | Path, *, lora: LoraSpec = LoraSpec(),
                    train: TrainSpec = TrainSpec(), text_mode: str = "input", progress: bool = True) -> Path:
    """One adapter on every task's records together, into `out_dir`: the papers' single multi-task LoRA
    baseline (AS Table 3). Each record is rendered with its own task's template, as the per-task
    adapters and serving render it, so the baseline differs from them only in sharing one adapter.
    `_schedule` shuffles the records, so tasks mix within a batch."""
    groups = group_by_task(records)
    if len(groups) < 2:
        raise ValueError(f"a multi-task adapter needs records of at least 2 tasks, got {sorted(groups)}")
    templates = {key: template_for((r.instruction for r in rows), text_mode) for key, rows in groups.items()}
    return train_adapter(base_path, records, dict(sorted(templates.items())), out_dir, lora=lora, train=train,
                         text_mode=text_mode, progress=progress)
