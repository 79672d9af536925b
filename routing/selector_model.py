"""The Adapters-Selector LM: a LoRA on the base model that reads a request and names its task.

The AS paper lets the selector generate `domain` and `task` freely; a free generation can name a task
that does not exist. Here the selector *scores* every catalog label instead: one prefill of the
prompt, then each label's few tokens on top of the cached prompt (the cache is cropped back after
each label), so the answer is always a valid task and comes with a distribution over tasks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel

from .base_models import load_causal_lm, locate_base_model

SELECTOR_TEMPLATE = "### Which task is this request for?\n{text}\n### Task:\n"
LABELS_FILE = "labels.json"


def label_text(key: str) -> str:
    """What the selector is trained to write for a task key `domain/task`."""
    domain, task = key.split("/", 1)
    return f"domain: {domain}, task: {task}"


class SelectorModel:
    def __init__(self, artefact: str | Path, base_model: str | Path | None = None, max_length: int = 256):
        artefact = Path(artefact)
        self.labels: list[str] = json.loads((artefact / LABELS_FILE).read_text())
        config = json.loads((artefact / "adapter_config.json").read_text())
        base_dir = locate_base_model(config["base_model_name_or_path"], base_model)
        model, self.tokenizer = load_causal_lm(base_dir)
        self.model = PeftModel.from_pretrained(model, str(artefact)).eval()
        self.max_length = max_length
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        self.label_ids = [self.tokenizer(label_text(k), add_special_tokens=False)["input_ids"] + eos
                          for k in self.labels]

    @torch.inference_mode()
    def log_likelihoods(self, texts: list[str]) -> torch.Tensor:
        """(B, L) log p(label | prompt) for every catalog label, summed over the label's tokens."""
        prompts = [SELECTOR_TEMPLATE.replace("{text}", t) for t in texts]
        self.tokenizer.truncation_side = "left"  # keep the end of long inputs, next to "### Task:"
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, truncation=True,
                               max_length=self.max_length, padding_side="left")
        mask = batch["attention_mask"]                                   # (B, P)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)                   # (B, P): left padding shifts positions
        out = self.model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, use_cache=True)
        cache = out.past_key_values
        first = torch.log_softmax(out.logits[:, -1].float(), -1)         # (B, V): next-token after the prompt
        next_pos = positions[:, -1:] + 1                                 # (B, 1)
        scores = torch.empty(len(texts), len(self.labels))
        for j, ids in enumerate(self.label_ids):
            label = torch.tensor(ids).expand(len(texts), -1)             # (B, m)
            total = first[:, ids[0]].clone()
            if len(ids) > 1:
                ext = torch.cat([mask, torch.ones(len(texts), len(ids) - 1, dtype=mask.dtype)], -1)
                step = self.model(input_ids=label[:, :-1], attention_mask=ext, past_key_values=cache, use_cache=True,
                                  position_ids=next_pos + torch.arange(len(ids) - 1))
                logp = torch.log_softmax(step.logits.float(), -1)        # (B, m-1, V)
                total += logp.gather(-1, label[:, 1:, None]).squeeze(-1).sum(-1)
                cache.crop(-(len(ids) - 1))                              # drop this label's tokens again
            scores[:, j] = total
        return scores
