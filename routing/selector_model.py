"""The Adapters-Selector LM: a LoRA on the base model that reads a request and names its task.

The AS paper lets the selector generate `domain` and `task` freely; a free generation can name a task
that does not exist. Here the selector *scores* every catalog label instead: one prefill of the
prompt, then the labels' tokens on top of the cached prompt, walked as a radix tree (a run that
several labels share, "domain: fin, task:", is fed once; the cache is cropped back after each
branch), so the answer is always a valid task and comes with a distribution over tasks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import Cache

from .base_models import load_causal_lm, locate_base_model
from .catalog import LABELS_FILE
from .devices import Placement

SELECTOR_TEMPLATE = "### Which task is this request for?\n{text}\n### Task:\n"
# The AS paper's selector prompt (App. A): the instruction and the lists of domains and tasks to pick from.
PAPER_TEMPLATE = ("Determine which of the following datapoint is\nin which domain, what is the task.\ninput:{text}\n"
                  "Select from below list:\nDomains:{domains}\nTasks:{tasks}\nResults:\n")
PROMPTS = ("ours", "paper")
PROMPT_KEY = "prompt"   # in SELECTION_CONFIG; selectors from before it was recorded used "ours"
# Tokens of prompt + label the selector trains on by default (`training.selector`). The window it
# trained on is recorded in its artefact and scoring uses that one, so a prompt is judged as it was
# learned; longer prompts lose their start in both. Artefacts from before the record trained on 128.
SELECTOR_MAX_LENGTH = 256
SELECTION_CONFIG = "selection_config.json"
WINDOW_KEY, LEGACY_WINDOW = "max_length", 128


def label_text(key: str, prompt: str = "ours") -> str:
    """What the selector is trained to write for a task key `domain/task` under `prompt`."""
    domain, task = key.split("/", 1)
    return f"Domain:{domain}\nTask:{task}" if prompt == "paper" else f"domain: {domain}, task: {task}"


def selector_template(prompt: str, labels: list[str]) -> str:
    """The selector's prompt template (one `{text}` placeholder) for `prompt` over task keys `labels`:
    ours names nothing; the paper's lists the distinct domains and tasks (in label order)."""
    if prompt not in PROMPTS:
        raise ValueError(f"unknown selector prompt {prompt!r}; use one of {', '.join(PROMPTS)}")
    if prompt == "ours":
        return SELECTOR_TEMPLATE
    domains = list(dict.fromkeys(k.split("/", 1)[0] for k in labels))
    tasks = list(dict.fromkeys(k.split("/", 1)[1] for k in labels))
    return PAPER_TEMPLATE.replace("{domains}", ", ".join(domains)).replace("{tasks}", ", ".join(tasks))


def _recorded(artefact: Path) -> dict:
    file = artefact / SELECTION_CONFIG
    return json.loads(file.read_text()) if file.is_file() else {}


def trained_window(artefact: Path) -> int:
    """The prompt + label window the selector at `artefact` was trained on."""
    return int(_recorded(artefact).get(WINDOW_KEY, LEGACY_WINDOW))


def trained_prompt(artefact: Path) -> str:
    """The prompt form the selector at `artefact` was trained with."""
    return str(_recorded(artefact).get(PROMPT_KEY, "ours"))


class SelectorModel:
    def __init__(self, artefact: str | Path, base_model: str | Path | None = None, placement: Placement | None = None):
        """`placement`: device and dtype of the base model and its selector LoRA (default: CPU, float32)."""
        artefact = Path(artefact)
        placement = placement or Placement(torch.device("cpu"), torch.float32)
        labels = json.loads((artefact / LABELS_FILE).read_text())
        config = json.loads((artefact / "adapter_config.json").read_text())
        base_dir = locate_base_model(config["base_model_name_or_path"], base_model)
        model, tokenizer = load_causal_lm(base_dir, placement.dtype, placement.device)
        self._setup(PeftModel.from_pretrained(model, str(artefact)).eval(), tokenizer, labels,
                    trained_prompt(artefact), trained_window(artefact))

    @classmethod
    def over(cls, model, tokenizer, labels: list[str], prompt: str, window: int) -> "SelectorModel":
        """Score with a selector LoRA already in memory (a sweep trial judging its model mid-training),
        exactly as the saved artefact of it would be scored. The caller puts `model` in eval mode."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer, labels, prompt, window)
        return self

    def _setup(self, model, tokenizer, labels: list[str], prompt: str, window: int) -> None:
        self.model, self.tokenizer, self.labels = model, tokenizer, list(labels)
        self.device = model.device
        self.template = selector_template(prompt, self.labels)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.label_ids = [tokenizer(label_text(k, prompt), add_special_tokens=False)["input_ids"] + eos
                          for k in self.labels]
        # Training fit prompt + label in its window; the prompt here keeps room for the longest label.
        self.max_length = window - max(map(len, self.label_ids))

    @torch.inference_mode()
    def log_likelihoods(self, texts: list[str]) -> torch.Tensor:
        """(B, L) log p(label | prompt) for every catalog label, summed over the label's tokens."""
        prompts = [self.template.replace("{text}", t) for t in texts]
        self.tokenizer.truncation_side = "left"  # keep the end of long inputs, next to "### Task:"
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, truncation=True,
                               max_length=self.max_length, padding_side="left").to(self.device)
        mask = batch["attention_mask"]                                   # (B, P)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)                   # (B, P): left padding shifts positions
        out = self.model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, use_cache=True)
        scores = torch.empty(len(texts), len(self.labels), device=self.device)
        self._score_labels(list(range(len(self.labels))), 0, torch.log_softmax(out.logits[:, -1].float(), -1),
                           torch.zeros(len(texts), device=self.device), out.past_key_values, mask,
                           positions[:, -1:] + 1, scores)
        return scores.cpu()

    def _score_labels(self, labels: list[int], depth: int, next_logp: torch.Tensor, prefix_logp: torch.Tensor,
                      cache: Cache, mask: torch.Tensor, next_pos: torch.Tensor, scores: torch.Tensor) -> None:
        """Score `labels`, which share their first `depth` tokens (already in `cache`), into `scores`.

        A walk over the labels' radix tree: each run of tokens that several labels share ("domain: fin,
        task:") is fed once for all of them, then the cache is cropped back before the next sibling.
        `next_logp` (B, V) is the distribution of token `depth`; `prefix_logp` (B,) the shared tokens' sum.
        """
        groups: dict[int, list[int]] = {}
        for j in labels:
            groups.setdefault(self.label_ids[j][depth], []).append(j)
        for group in groups.values():
            ids = [self.label_ids[j] for j in group]
            end = depth + 1
            while all(len(x) > end for x in ids) and len({x[end] for x in ids}) == 1:
                end += 1
            run = ids[0][depth:end]                                      # the tokens every label here shares
            rest = [j for j, x in zip(group, ids) if len(x) > end]
            feed = run if rest else run[:-1]                             # a leaf needs no logits after its last token
            total = prefix_logp + next_logp[:, run[0]]
            if feed:
                tokens = torch.tensor(feed, device=self.device).expand(len(mask), -1)  # (B, f)
                grown = torch.cat([mask, torch.ones_like(tokens)], -1)
                step = self.model(input_ids=tokens, attention_mask=grown, past_key_values=cache, use_cache=True,
                                  position_ids=next_pos + torch.arange(len(feed), device=self.device))
                logp = torch.log_softmax(step.logits.float(), -1)        # (B, f, V)
                targets = torch.tensor(run[1:], dtype=torch.long, device=self.device).expand(len(mask), -1)
                total = total + logp[:, :len(run) - 1].gather(-1, targets[..., None]).squeeze(-1).sum(-1)
                child = logp[:, -1].clone() if rest else None            # (B, V); the rest of logp is freed
                del step, logp
                if rest:
                    self._score_labels(rest, end, child, total, cache, grown, next_pos + len(feed), scores)
                cache.crop(-len(feed))                                   # back to this node for the next sibling
            for j, x in zip(group, ids):
                if len(x) == end:
                    scores[:, j] = total
