"""Train the `classifier` and `lexical` routers for a catalog and write them into a new catalog version.

    from training.router_training import train_classifier, train_lexical
    new = train_classifier(catalog, records, Path("catalogs/with-classifier"), text_mode="input")
    fast = train_lexical(catalog, records, Path("catalogs/with-lexical"))   # seconds, no encoder training

What `train_classifier` does (all seeded by `seed`):
  1. every task keeps a few records apart for calibration (10%, at least 1, at most
     `calibration_per_task`, 50 by default);
  2. a balanced sample of at most `per_task` of the rest per task is the training set;
  3. the catalog's encoder gets a cosine head whose prototypes start at the task centroids of
     (up to 64 per task of) the training texts, so step 0 is a centroid router already;
  4. transformers' `Trainer` fine-tunes encoder + head with cross-entropy (length-grouped batches);
  5. on the calibration records: a temperature for the probabilities (temperature scaling);
  6. the lexical router is fitted too, on all the non-calibration records (seconds to a minute or
     two), so the catalog can serve the `ensemble` router;
  7. the artefacts are written to a temp dir and `derive_catalog` makes the new catalog version.

CPU defaults: max_length 128, batch 32, 2 epochs, lr 5e-5 (encoder) / 2e-3 (head). 12 tasks x 300
records (max_length 64) train in about 3 min on two cores; the lexical model on TASA's 31,500
records adds 1.5 min.
"""

from __future__ import annotations

import json
import math
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from routing.catalog import Catalog, check_new_catalog_dir, derive_catalog
from routing.encoder import _encoder_path
from routing.routers.classifier import TaskClassifier, domain_soft_targets, mean_pool, tokenize
from routing.routers.lexical import LexicalModel
from routing.routers.probabilistic import fit_temperature

from .adapter import ProgressBar
from .records import Record, TEXT_MODES, group_by_task

ClassifierTextMode = Literal["input", "instruction+input", "both"]
CALIBRATION_FRACTION = 0.1
CALIBRATION_MAX = 50
MIN_CALIBRATION = 20       # fewer calibration texts than this: no temperature is fitted (T_cal = 1)
PROTOTYPE_SAMPLES = 64
INIT_SCALE = 20.0          # 1 / 0.05: cosine gaps of ~0.1 between tasks become logit gaps of ~2


def hf_encoder_dir(name: str) -> str:
    """The transformers directory inside a sentence-transformers model (its Transformer module)."""
    root = Path(_encoder_path(name))
    modules = root / "modules.json"
    if modules.is_file():
        for m in json.loads(modules.read_text()):
            if m.get("type", "").endswith("Transformer"):
                return str(root / m.get("path", ""))
    return str(root)


def texts_for(record: Record, text_mode: ClassifierTextMode) -> list[str]:
    """The query renderings a record trains on; "both" trains on input-only and instruction+input."""
    if text_mode == "both":
        return list(dict.fromkeys(record.text(m) for m in TEXT_MODES))
    return [record.text(text_mode)]


def split_for_training(records: list[Record], keys: list[str], seed: int, calibration_per_task: int = CALIBRATION_MAX
                       ) -> tuple[dict[str, list[Record]], dict[str, list[Record]]]:
    """Per task: (the training records in a seeded order, calibration records). Unknown keys raise."""
    groups = group_by_task(records)
    unknown = sorted(set(groups) - set(keys))
    if unknown:
        raise ValueError(f"{len(unknown)} task key(s) in the records are not in the catalog: {unknown}; "
                         f"the catalog has {keys}")
    missing = [k for k in keys if k not in groups]
    if missing:
        raise ValueError(f"no records for catalog task(s) {missing}: a classifier cannot learn a task it never sees")
    train, calib = {}, {}
    for key in keys:
        rows = list(groups[key])
        random.Random(f"{seed}:{key}:classifier").shuffle(rows)
        n_cal = min(calibration_per_task, max(1, round(len(rows) * CALIBRATION_FRACTION))) if len(rows) > 1 else 0
        calib[key], rest = rows[:n_cal], rows[n_cal:]
        train[key] = rest
    return train, calib


class _Examples(torch.utils.data.Dataset):
    def __init__(self, encodings: dict[str, list], labels: list[int]):
        self.encodings, self.labels = encodings, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.encodings.items()}, "labels": self.labels[i]}


@torch.inference_mode()
def _embed(encoder, tokenizer, texts: list[str], max_length: int, batch: int = 64,
           progress: bool = False, desc: str = "") -> torch.Tensor:
    """Mean-pooled, normalised embeddings (N, d) of `texts` (already prefixed), length-sorted batches."""
    from tqdm.auto import tqdm

    enc = tokenize(tokenizer, texts, max_length)
    order = np.argsort([len(x) for x in enc["input_ids"]])
    out = torch.zeros(len(texts), encoder.config.hidden_size)
    device = next(encoder.parameters()).device
    for lo in tqdm(range(0, len(texts), batch), desc=desc, disable=not progress, file=sys.stderr):
        rows = order[lo: lo + batch]
        b = tokenizer.pad({k: [v[i] for i in rows] for k, v in enc.items()}, return_tensors="pt")
        b = {k: v.to(device) for k, v in b.items()}
        out[torch.as_tensor(rows)] = mean_pool(encoder(**b).last_hidden_state, b["attention_mask"]).float().cpu()
    return out


def train_classifier(catalog: Catalog, records: list[Record], out: str | Path, *,
                     text_mode: ClassifierTextMode = "input", per_task: int | None = 300, epochs: float = 2.0,
                     seed: int = 0, progress: bool = True, prefix: str = "", max_length: int = 128,
                     batch_size: int = 32, learning_rate: float = 5e-5, head_learning_rate: float = 2e-3,
                     domain_smoothing: float = 0.1, calibration_per_task: int = CALIBRATION_MAX,
                     log: Callable[[str], None] | None = None) -> Catalog:
    """Fine-tune the catalog's encoder as a classifier over its task keys; return the derived catalog.

    `records` may cover only some tasks of a bigger corpus but every key must be in the catalog
    (unknown keys raise, listing them) and every catalog task needs records. `prefix` is prepended
    to every text at training and routing time. `domain_smoothing` moves that much of each target
    onto the other tasks of its domain (see `domain_soft_targets`). The lexical router is fitted
    into the same catalog version (see the module docstring).
    """
    from transformers import (AutoModel, AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments,
                              set_seed)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    log = _logger("classifier", progress, log)
    keys = catalog.keys
    everything, calib = _prepare(records, keys, out, text_mode, seed, calibration_per_task)
    train = {k: rows if per_task is None else rows[:per_task] for k, rows in everything.items()}
    set_seed(seed)
    started = time.perf_counter()
    hf_dir = hf_encoder_dir(catalog.encoder["name"])
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    encoder = AutoModel.from_pretrained(hf_dir, use_safetensors=True)

    texts, labels = [], []
    for i, key in enumerate(keys):
        for r in train[key]:
            for t in texts_for(r, text_mode):
                texts.append(prefix + t)
                labels.append(i)
    log(f"{len(keys)} tasks, {len(texts)} training texts ({text_mode}), "
        f"{sum(map(len, calib.values()))} calibration records")

    # Prototypes start at the centroids of a few training texts per task.
    labels_np = np.array(labels)
    rng = np.random.default_rng(seed)
    proto_rows = np.concatenate([rng.permutation(np.flatnonzero(labels_np == i))[:PROTOTYPE_SAMPLES]
                                 for i in range(len(keys))])
    emb = _embed(encoder, tokenizer, [texts[j] for j in proto_rows], max_length, progress=progress,
                 desc="prototypes")
    prototypes = torch.stack([emb[labels_np[proto_rows] == i].mean(0) for i in range(len(keys))])
    model = TaskClassifier(encoder, torch.nn.functional.normalize(prototypes, dim=-1), math.log(INIT_SCALE),
                           targets=domain_soft_targets(keys, domain_smoothing) if domain_smoothing else None)

    enc = tokenize(tokenizer, texts, max_length)
    # The word-embedding table is half of MiniLM's weights; freezing it halves the backward and
    # optimizer cost on CPU and keeps rare words where pre-training put them (small data).
    model.encoder.get_input_embeddings().weight.requires_grad_(False)
    body = [p for p in model.encoder.parameters() if p.requires_grad]
    head = [model.prototypes, model.log_scale]
    optimizer = torch.optim.AdamW([{"params": body, "lr": learning_rate, "weight_decay": 0.01},
                                   {"params": head, "lr": head_learning_rate, "weight_decay": 0.0}], foreach=True)
    with tempfile.TemporaryDirectory(prefix="sb-classifier-") as tmp:
        args = TrainingArguments(
            output_dir=str(Path(tmp) / "trainer"), per_device_train_batch_size=batch_size, num_train_epochs=epochs,
            learning_rate=learning_rate, warmup_steps=max(1, int(0.06 * epochs * len(texts) / batch_size)),
            lr_scheduler_type="linear", save_strategy="no", logging_strategy="no", report_to="none",
            seed=seed, train_sampling_strategy="group_by_length",
            dataloader_pin_memory=False, remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=_Examples(dict(enc), labels),
                          data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
                          optimizers=(optimizer, None))
        for printer in (PrinterCallback, ProgressCallback):   # both print the run's metrics to stdout
            trainer.remove_callback(printer)
        trainer.add_callback(ProgressBar("classifier", progress))
        trainer.train()
        model = trainer.model.eval()
        train_s = time.perf_counter() - started

        settings = {"prefix": prefix, "text_mode": text_mode, "max_length": max_length, "truncation": "head+tail",
                    "encoder": catalog.encoder["name"], "calibration_temperature": 1.0,
                    "training": {"records_per_task": {k: len(v) for k, v in train.items()}, "texts": len(texts),
                                 "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
                                 "head_learning_rate": head_learning_rate, "domain_smoothing": domain_smoothing,
                                 "seed": seed, "seconds": round(train_s, 1)}}
        cal_records = [(r, i) for i, key in enumerate(keys) for r in calib[key]]
        if cal_records:
            settings.update(_calibrate(model, tokenizer, cal_records, text_mode, prefix, max_length, progress))
            log(f"calibration: {json.dumps({k: v for k, v in settings.items() if k.startswith('calib')})}")
        router_dirs = {"classifier": Path(tmp) / "classifier", "lexical": Path(tmp) / "lexical"}
        model.save(router_dirs["classifier"], tokenizer, keys, settings)
        _fit_lexical(everything, calib, keys, text_mode, seed, router_dirs["lexical"], log)
        new = derive_catalog(catalog, out, router_dirs=router_dirs)
    log(f"trained in {time.perf_counter() - started:.0f}s; catalog {new.version} (parent {catalog.version}) "
        f"at {new.root}")
    return new


def train_lexical(catalog: Catalog, records: list[Record], out: str | Path, *,
                  text_mode: ClassifierTextMode = "input", seed: int = 0, progress: bool = True,
                  calibration_per_task: int = CALIBRATION_MAX, log: Callable[[str], None] | None = None) -> Catalog:
    """Fit only the lexical router (all non-calibration records, seconds); return the derived catalog.

    The same record checks and calibration split as `train_classifier`.
    """
    log = _logger("lexical", progress, log)
    train, calib = _prepare(records, catalog.keys, out, text_mode, seed, calibration_per_task)
    with tempfile.TemporaryDirectory(prefix="sb-lexical-") as tmp:
        _fit_lexical(train, calib, catalog.keys, text_mode, seed, Path(tmp) / "lexical", log)
        new = derive_catalog(catalog, out, router_dirs={"lexical": Path(tmp) / "lexical"})
    log(f"catalog {new.version} (parent {catalog.version}) at {new.root}")
    return new


def _logger(kind: str, progress: bool, log: Callable[[str], None] | None) -> Callable[[str], None]:
    return log or (lambda msg: print(f"[train {kind}] {msg}", file=sys.stderr, flush=True) if progress else None)


def _prepare(records: list[Record], keys: list[str], out: str | Path, text_mode: str, seed: int,
             calibration_per_task: int) -> tuple[dict[str, list[Record]], dict[str, list[Record]]]:
    """Checks shared by both trainers; (every non-calibration record, calibration records) per task."""
    if text_mode not in (*TEXT_MODES, "both"):
        raise ValueError(f"text_mode must be one of {(*TEXT_MODES, 'both')}, got {text_mode!r}")
    check_new_catalog_dir(out)
    return split_for_training(records, keys, seed, calibration_per_task)


def _fit_lexical(train: dict[str, list[Record]], calib: dict[str, list[Record]], keys: list[str],
                 text_mode: ClassifierTextMode, seed: int, dest: Path, log: Callable[[str], None]) -> None:
    """Fit the lexical model on `train`, calibrate it on `calib`, write its artefact to `dest`."""
    started = time.perf_counter()
    pairs = [(t, i) for i, key in enumerate(keys) for r in train[key] for t in texts_for(r, text_mode)]
    model = LexicalModel.fit([t for t, _ in pairs], np.array([i for _, i in pairs]), len(keys))
    settings = {"text_mode": text_mode, "calibration_temperature": 1.0,
                "training": {"texts": len(pairs), "features": int(model.coef.shape[1]), "seed": seed,
                             "seconds": round(time.perf_counter() - started, 1)}}
    cal = [(r, i) for i, key in enumerate(keys) for r in calib[key]]
    if cal:
        modes = TEXT_MODES if text_mode == "both" else (text_mode,)
        settings.update(_calibration(model.logits([r.text(m) for m in modes for r, _ in cal]),
                                     np.array([i for _ in modes for _, i in cal])))
    model.save(dest, keys, settings)
    log(f"lexical: {len(pairs)} texts, {model.coef.shape[1]} n-gram features, fitted in "
        f"{settings['training']['seconds']}s; calibration top-1 {settings.get('calibration_top1', float('nan')):.3f}")


def _calibrate(model: TaskClassifier, tokenizer, cal: list[tuple[Record, int]], text_mode: ClassifierTextMode,
               prefix: str, max_length: int, progress: bool) -> dict:
    """Temperature scaling of the classifier on the held-out calibration records."""
    modes = TEXT_MODES if text_mode == "both" else (text_mode,)
    texts = [prefix + r.text(m) for m in modes for r, _ in cal]
    emb = _embed(model.encoder, tokenizer, texts, max_length, progress=progress, desc="calibration")
    with torch.no_grad():
        prototypes = torch.nn.functional.normalize(model.prototypes.detach().float().cpu(), dim=-1)
        logits = (model.log_scale.detach().float().cpu().exp() * emb @ prototypes.T).numpy()   # (N, T)
    return _calibration(logits, np.array([i for _ in modes for _, i in cal]))


def _calibration(logits: np.ndarray, truth: np.ndarray) -> dict:
    """The temperature for `logits` and the top-1 accuracy measured on the calibration records."""
    # Too few records to fit a temperature reliably: keep the trained scale as it is.
    temperature = fit_temperature(logits, truth) if len(truth) >= MIN_CALIBRATION else 1.0
    return {"calibration_temperature": temperature,
            "calibration_top1": float(np.mean(logits.argmax(1) == truth)), "calibration_n": len(truth)}
