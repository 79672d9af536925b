"""Classifier router: the catalog's sentence encoder fine-tuned as a classifier over its task keys.

The model is the encoder (mean pooling, L2-normalised, as sentence-transformers pools it) followed
by a cosine head: one learned prototype per task,

    e = normalise(mean_pool(encoder(prefix + text)))          # (B, d)
    logits = exp(log_scale) * e @ normalise(prototypes).T     # (B, T)

Training (`training/router_training.py::train_classifier`) starts the prototypes at task centroids
of the training texts, so before any step the classifier ranks tasks as a LoRAuter centroid router
would; fine-tuning then moves encoder and prototypes (cross-entropy, optionally with part of each
target spread over the task's domain peers, `domain_soft_targets`). A calibration temperature `T_cal` (temperature scaling, fitted
on held-out training records) turns logits into probabilities p = softmax(logits / T_cal).

How a request's top-K and temperature τ turn probabilities into a decision: `probabilistic.py`.

Artefact (`catalog.router_path("classifier")`), safetensors and JSON only:
    model.safetensors, config.json       the fine-tuned encoder (transformers AutoModel format)
    tokenizer.json, tokenizer_config.json, ...
    head.safetensors                     `prototypes` (T, d), `log_scale` ()
    labels.json                          the catalog keys in label order
    router.json                          text prefix, text_mode, max_length, truncation, T_cal, training facts
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..catalog import Catalog, CatalogError
from .probabilistic import ProbabilisticRouter, read_artefact, write_artefact

HEAD_FILE = "head.safetensors"
INFERENCE_BATCH = 64


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states under the attention mask, L2-normalised: (B, L, d), (B, L) -> (B, d)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)                          # (B, L, 1)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)          # (B, d)
    return nn.functional.normalize(pooled, dim=-1)


def tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, list[list[int]]]:
    """Token ids with head+tail truncation: a text over `max_length` keeps its first and last halves.

    Task cues sit at either end of a prompt (an instruction before the input, or a question and
    its options after it), so cutting only the tail loses half of them (Sun et al., 2019, §5.3.1).
    """
    enc = tokenizer(texts, verbose=False)
    head = max_length // 2
    out = {k: [] for k in enc.keys()}
    for i in range(len(texts)):
        for k in out:
            v = enc[k][i]
            out[k].append(v if len(v) <= max_length else v[:head] + v[len(v) - (max_length - head):])
    return out


class TaskClassifier(nn.Module):
    """Encoder + cosine head. `forward` returns {"loss", "logits"} as transformers' Trainer expects.

    `targets` (T, T), training only: row i is the target distribution for label i (soft labels,
    see `domain_soft_targets`); None trains on hard labels.
    """

    def __init__(self, encoder: nn.Module, prototypes: torch.Tensor, log_scale: float,
                 targets: torch.Tensor | None = None):
        super().__init__()
        self.encoder = encoder
        self.prototypes = nn.Parameter(prototypes.clone().float())   # (T, d)
        self.log_scale = nn.Parameter(torch.tensor(float(log_scale)))
        self.register_buffer("targets", targets, persistent=False)

    def embed(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        return mean_pool(hidden, attention_mask)                     # (B, d)

    def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None) -> dict:
        e = self.embed(input_ids, attention_mask, token_type_ids)
        logits = self.log_scale.exp() * e @ nn.functional.normalize(self.prototypes, dim=-1).T  # (B, T)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits, labels if self.targets is None else self.targets[labels])
        return {"loss": loss, "logits": logits}

    def save(self, out: Path, tokenizer, labels: list[str], settings: dict) -> None:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        save_file({"prototypes": self.prototypes.detach().cpu().contiguous(),
                   "log_scale": self.log_scale.detach().cpu().reshape(())}, str(out / HEAD_FILE))
        write_artefact(out, labels, settings)


def domain_soft_targets(keys: list[str], smoothing: float) -> torch.Tensor:
    """(T, T) targets: 1 - smoothing on the task, smoothing shared by the other tasks of its domain.

    Teaches the classifier that a same-domain task is the next best answer, which is what the
    out-of-pool regime (own task excluded) scores; a task alone in its domain keeps a hard label.
    """
    domains = [k.split("/")[0] for k in keys]
    t = torch.eye(len(keys))
    for i, d in enumerate(domains):
        peers = [j for j, e in enumerate(domains) if e == d and j != i]
        if peers and smoothing > 0:
            t[i, i] = 1 - smoothing
            t[i, peers] = smoothing / len(peers)
    return t


def load_classifier(path: Path) -> tuple[TaskClassifier, object, list[str], dict]:
    """(model in eval mode, tokenizer, labels, settings) from an artefact directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    labels, settings = read_artefact(path, "classifier")
    try:
        head = load_file(str(path / HEAD_FILE))
        prototypes, log_scale = head["prototypes"], float(head["log_scale"])
        encoder = AutoModel.from_pretrained(str(path), use_safetensors=True)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise CatalogError(f"classifier {path}: unreadable artefact ({type(e).__name__}: {e})") from None
    if prototypes.shape != (len(labels), encoder.config.hidden_size):
        raise CatalogError(f"classifier {path}: head prototypes of shape {tuple(prototypes.shape)} for "
                           f"{len(labels)} labels of a {encoder.config.hidden_size}-wide encoder")
    model = TaskClassifier(encoder, prototypes, log_scale)
    return model.eval(), AutoTokenizer.from_pretrained(str(path)), labels, settings


class ClassifierRouter(ProbabilisticRouter):
    """Fine-tuned encoder classifier over the catalog's tasks."""

    name = "classifier"
    artefacts = ("classifier",)

    def __init__(self, catalog: Catalog):
        path = catalog.router_path("classifier")   # CatalogError when the catalog has none
        self.model, self.tokenizer, labels, self.settings = load_classifier(path)
        super().__init__(catalog, labels)
        self.prefix: str = self.settings.get("prefix", "")
        self.max_length: int = int(self.settings.get("max_length", 128))
        self.calibration: float = float(self.settings.get("calibration_temperature", 1.0))

    def to(self, device: str | torch.device) -> "ClassifierRouter":
        """Move the classifier to `device` (kept in float32: a small encoder, and calibrated logits)."""
        self.model.to(device)
        return self

    @torch.inference_mode()
    def logits(self, texts: list[str]) -> np.ndarray:
        """Calibrated logits (N, T) = raw logits / T_cal, in label order. Length-sorted batches."""
        out = np.zeros((len(texts), len(self.labels)), np.float32)
        enc = tokenize(self.tokenizer, [self.prefix + t for t in texts], self.max_length)
        order = np.argsort([len(ids) for ids in enc["input_ids"]])
        device = next(self.model.parameters()).device
        for lo in range(0, len(texts), INFERENCE_BATCH):
            rows = order[lo: lo + INFERENCE_BATCH]
            batch = self.tokenizer.pad({k: [v[i] for i in rows] for k, v in enc.items()}, return_tensors="pt")
            logits = self.model(**{k: v.to(device) for k, v in batch.items()})["logits"]
            out[rows] = (logits / self.calibration).float().cpu().numpy()
        return out
