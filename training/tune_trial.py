"""One sweep trial, as Ray Tune runs it: train an adapter (or the AS selector), report eval loss and the
score (the task metric; the selector's routing top-1) every `eval_every` steps (the early-stopping
scheduler's input, shown live in the Ray dashboard), then score the saved artefact once more and report
that as the trial's final result.

The final score is measured on the adapter as exported (PiSSA already converted to a plain LoRA
delta on the unmodified base), so the sweep's "best" is the artefact the catalog will serve.
Also here: `PerTaskASHA`, which keeps trials of different tasks from competing.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import TrainerCallback

from routing.metrics import score
from routing.templates import render
from training.adapter import LoraSpec, TrainSpec, _Collator, _encode, generate_answers
from training.distributed import train_one
from training.records import Record


# ---- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def eval_loss(model, tokenizer, records: list[Record], template: str, text_mode: str, max_length: int,
              batch_size: int = 8) -> float:
    """Mean answer-token loss (the training loss) on held-out rows. Small batches: a trial evaluates
    beside its training state, and full-vocabulary logits of 32 rows cost GBs on a 2-core, 24 GB node."""
    examples, _ = _encode(tokenizer, records, template, text_mode, max_length)
    collate = _Collator(tokenizer.pad_token_id)
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(examples[i:i + batch_size]).items()}
        n = int((batch["labels"][:, 1:] != -100).sum())  # tokens the loss averages over (shifted labels)
        total += model(**batch).loss.item() * n
        tokens += n
    return total / max(tokens, 1)


@torch.no_grad()
def evaluate(model, tokenizer, task: dict, text_mode: str, max_length: int) -> dict[str, float]:
    """A trial's figures on its task's validation rows: the eval loss, and the score: the task metric
    of greedy answers, or for the selector (`task["selector"]`) its routing top-1, macro over tasks,
    scored exactly as the `selector` router scores (`routing.selector_model`)."""
    was_training = model.training
    model.eval()
    records, selector = task["val"], task.get("selector")
    if selector is None:
        loss = eval_loss(model, tokenizer, records, task["template"], text_mode, max_length)
        answer_tokens = max(len(tokenizer(r.output, add_special_tokens=False)["input_ids"]) for r in records)
        prompts = [render(task["template"], r.text(text_mode)) for r in records]
        answers = generate_answers(model, tokenizer, prompts, max_new_tokens=answer_tokens + 2)
        value = sum(score(task["metric"], a, r.output) for a, r in zip(answers, records)) / len(records)
    else:
        from routing.selector_model import SelectorModel
        from training.selector import per_task_accuracy, selector_examples

        how = selector["how"]
        loss = eval_loss(model, tokenizer, selector_examples(records, text_mode, how["prompt"]), task["template"],
                         "input", max_length)
        judge = SelectorModel.over(model, tokenizer, selector["labels"], how["prompt"], max_length)
        accuracy = per_task_accuracy(judge, records, text_mode)
        value = sum(accuracy.values()) / len(accuracy)
    model.train(was_training)
    return {"eval_loss": loss, "score": value}


def evaluate_saved(base_path: Path, adapter: Path, task: dict, text_mode: str, max_length: int) -> dict[str, float]:
    """`evaluate` on an adapter directory loaded onto a fresh copy of the base model."""
    from peft import PeftModel

    from routing.base_models import load_causal_lm

    model, tokenizer = load_causal_lm(base_path)
    return evaluate(PeftModel.from_pretrained(model, str(adapter)), tokenizer, task, text_mode, max_length)


class TrialMetrics:
    """A trial's reports as Ray metrics (`ray_switchboard_trial_*` on each node's metrics port, so Prometheus and
    the dashboard's Metrics view follow a sweep while it runs). Labels: the task key and the trial tag, both
    bounded by the sweep's grid."""

    NAMES = ("eval_loss", "score", "step")

    def __init__(self, task: str, trial: str):
        self.tags = {"task": task, "trial": trial}

    def report(self, values: dict[str, Any]) -> None:
        """Made in the process that reports (the callback is pickled to Ray Train workers; gauges are not)."""
        from ray.util import metrics

        for name in self.NAMES:
            if isinstance(values.get(name), (int, float)):
                if name not in _GAUGES:
                    _GAUGES[name] = metrics.Gauge(f"switchboard_trial_{name}", f"The trial's last reported {name}.",
                                                  tag_keys=tuple(self.tags))
                _GAUGES[name].set(float(values[name]), self.tags)


_GAUGES: dict[str, Any] = {}   # one per metric name and process


class ReportEvery(TrainerCallback):
    """Every `every` optimizer steps (not at the last: the final report follows from the saved adapter),
    evaluate on rank 0 and report to Ray: `ray.tune.report` in a single-process trial,
    `ray.train.report` on every rank of a Ray Train worker group (a collective call there); rank 0 also sets
    the trial's Ray metrics (`exported`)."""

    def __init__(self, base_path: Path, task: dict, text_mode: str, max_length: int, every: int, steps: int,
                 distributed: bool, exported: TrialMetrics | None = None):
        self.base_path, self.task, self.text_mode, self.max_length = base_path, task, text_mode, max_length
        self.every, self.steps, self.distributed = every, steps, distributed
        self.exported = exported
        self.tokenizer = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % self.every or step >= self.steps:
            return
        metrics: dict[str, Any] = {}
        if state.is_world_process_zero:
            if self.tokenizer is None:
                from routing.base_models import load_tokenizer

                self.tokenizer = load_tokenizer(self.base_path)
            metrics = evaluate(model, self.tokenizer, self.task, self.text_mode, self.max_length)
        metrics.update(step=step, final=False)
        if self.exported is not None and state.is_world_process_zero:
            self.exported.report(metrics)
        if self.distributed:
            import ray.train

            ray.train.report(metrics)
        else:
            from ray import tune

            tune.report(metrics)


# ---- the trainable ------------------------------------------------------------------------------
def trial_tag(point: dict) -> str:
    return (f"{point['variant']}-r{point['r']}-a{point['alpha']}-lr{point['lr']:g}-d{point['dropout']:g}"
            f"-s{point['seed']}")


def trial_specs(point: dict, data: dict) -> tuple[LoraSpec, TrainSpec, Path]:
    """What a grid point trains, and where its adapter goes."""
    s = data["settings"]
    lora = LoraSpec(variant=point["variant"], r=point["r"], alpha=point["alpha"], dropout=point["dropout"],
                    target_modules=tuple(s["target_modules"]))
    train = TrainSpec(**{**s["schedule"], "lr": point["lr"], "seed": point["seed"]})
    return lora, train, Path(s["output"]) / "trials" / point["task"] / trial_tag(point)


def train_point(point: dict, data: dict, callbacks: list = ()) -> dict:
    """Train (or resume, or find finished) a grid point's adapter, then score the saved adapter."""
    task, s, base_path = data["tasks"][point["task"]], data["settings"], Path(data["base_path"])
    lora, train, out = trial_specs(point, data)
    started = time.monotonic()
    selector = task.get("selector")
    train_one(base_path, task["train"], task["template"], out, lora=lora, train=train,
              text_mode="input" if selector else s["text_mode"], workers=s["workers"], use_gpu=s["use_gpu"],
              deepspeed=s["deepspeed"], progress=False, callbacks=callbacks, storage=s["storage"], name="trial")
    if selector:
        from training.selector import finish_artefact

        finish_artefact(out, selector["selection"], selector["labels"], selector["how"], train.max_length)
    final = evaluate_saved(base_path, out, task, s["text_mode"], train.max_length)
    return {**final, "step": task["steps"], "adapter": str(out), "train_seconds": round(time.monotonic() - started, 2)}


def run_trial(config: dict, data: dict) -> None:
    """Ray Tune function trainable. `config["point"]` is one grid point; `data` what every trial shares."""
    from ray import tune

    point, s = config["point"], data["settings"]
    task = data["tasks"][point["task"]]
    torch.set_num_threads(s["threads"])
    _, train, _ = trial_specs(point, data)
    exported = TrialMetrics(point["task"], trial_tag(point))
    reporter = ReportEvery(Path(data["base_path"]), task, s["text_mode"], train.max_length, s["eval_every"],
                           task["steps"], distributed=s["workers"] > 0, exported=exported)
    final = train_point(point, data, [reporter])
    exported.report(final)
    tune.report({**final, "final": True})


def reports_per_trial(steps: int, every: int) -> int:
    """Intermediate reports at every multiple of `every` below `steps`, then the final one."""
    return math.ceil(steps / every)


# ---- scheduling ---------------------------------------------------------------------------------
def per_task_asha(make: Callable[[], Any]):
    """A scheduler holding one ASHA per task (`config["point"]["task"]`): a hard task's trials are only
    compared with each other, never cut because an easy task's trials score higher."""
    from ray.tune.schedulers import FIFOScheduler

    class PerTaskASHA(FIFOScheduler):
        def __init__(self):
            super().__init__()
            self._by_task: dict[str, Any] = {}

        def _of(self, trial):
            key = trial.config["point"]["task"]
            if key not in self._by_task:
                self._by_task[key] = make()
            return self._by_task[key]

        def on_trial_add(self, tune_controller, trial):
            self._of(trial).on_trial_add(tune_controller, trial)

        def on_trial_result(self, tune_controller, trial, result):
            return self._of(trial).on_trial_result(tune_controller, trial, result)

        def on_trial_complete(self, tune_controller, trial, result):
            self._of(trial).on_trial_complete(tune_controller, trial, result)

        def on_trial_remove(self, tune_controller, trial):
            self._of(trial)._trial_info.pop(trial.trial_id, None)

        def debug_string(self) -> str:
            return "\n".join(f"{key}: {s.debug_string()}" for key, s in sorted(self._by_task.items()))

    return PerTaskASHA()
