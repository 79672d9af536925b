"""Answers, not routes: every test record answered under each way users combine adapters, scored by its
task's catalog metric (`switchboard eval generation`).

Modes, all from one catalog and one base model:
    base       no adapter
    oracle     the query's own task adapter (the reference every mode is normalised by)
    routed     the catalog's default router (`auto`), top-1
    fused      the same router's top-K (FUSED_TOP_K) with its weights, fused in output space
    uniform    every adapter of the pool fused with equal weights
    merged     the pool's adapters merged in weight space, equal weights (peft `add_weighted_adapter`, linear)
    ties       the same merge by TIES (density TIES_DENSITY); applies because all adapters share one rank
    multitask  the catalog's multi-task adapter (one LoRA on all tasks' data, the papers' baseline)
    selector   the AS selector's top-1 (the catalog must carry a trained selector)

Prompts: in-process, every mode renders the query's own task template (the task's instruction travels
with the query, as in LoRAuter's prompts), so the modes differ only in the adapters they run. Over
`--endpoint` the app renders the routed task's template, as it serves; the modes the app cannot run
(uniform, merged, ties, multitask, and any under `ood`) are refused there.

`ood` (LoRAuter's unseen-task regime): the query's own adapter leaves the pool; routers are asked to
exclude its task, fusion and merges use the others. The trained routers and the multi-task adapter
still saw that task in training (`training.ood_evaluation` retrains routers per fold; this does not),
so their OOD figures are upper bounds; the centroid router's are exact.

Answers are generated greedily by the continuous-batching `Engine` over a `FusedLoraModel`: the
Generator's own path. Short-answer metrics stop at the first newline after SHORT_ANSWER_TOKENS at most;
the others (ROUGE-L, BLEU) get `long_answer_tokens`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from routing.adapter_config import read_adapter_config
from routing.base_models import load_causal_lm, locate_base_model
from routing.catalog import Catalog
from routing.decision import DEFAULT_TEMPERATURE, RouteRequest
from routing.devices import Placement
from routing.evaluation import save_figure
from routing.encoder import Encoder
from routing.engine import Engine, EngineConfig, NeverFitsError
from routing.lora import AdapterStore, FusedLoraModel
from routing.metrics import get_metric, score
from routing.routers import carries, make_router
from routing.templates import render

from .records import Problem, Record, RecordError

MODES: tuple[str, ...] = ("base", "oracle", "routed", "fused", "uniform", "merged", "ties", "multitask", "selector")
ENDPOINT_MODES = ("base", "oracle", "routed", "fused", "selector")   # what a running app can be asked for
FUSED_TOP_K = 3        # LoRAuter's K
TIES_DENSITY = 0.5     # share of each adapter's entries TIES keeps (peft `density`)
MERGES = {"merged": "linear", "ties": "ties"}
SHORT_ANSWER_TOKENS = 16
LONG_ANSWER_TOKENS = 128

Route = list[tuple[str, float]]
# (mode, records) -> one answer per record; the in-process engine or a running app
Answerer = Callable[[str, list[Record]], list[str]]


def answer_budget(metric: str, long_answer_tokens: int = LONG_ANSWER_TOKENS) -> tuple[int, tuple[str, ...]]:
    """(max new tokens, stop strings) an answer scored by `metric` needs."""
    return (SHORT_ANSWER_TOKENS, ("\n",)) if get_metric(metric).short else (long_answer_tokens, ())


def parse_modes(spec: str) -> list[str]:
    """`base,oracle,...` -> the modes, checked; `all` is every mode."""
    modes = list(MODES) if spec.strip() == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"--modes {spec!r}: unknown mode(s) {unknown}; known: {', '.join(MODES)} (or all)")
    return list(dict.fromkeys(modes))


def check_records(catalog: Catalog, records: list[Record], source: str) -> None:
    """Refuse records `eval generation` cannot score: a task the catalog does not list (so no metric, no
    adapter), or an empty reference output. Line numbers are given when `source` is one JSONL file."""
    lines = _record_lines(Path(source))
    problems = []
    for i, r in enumerate(records):
        line = lines[i] if lines and i < len(lines) else None
        if r.key not in catalog.tasks:
            problems.append(Problem(source, line, "task", f"task {r.key} is not in catalog {catalog.version}, so it "
                                                          f"has no metric or adapter there"))
        elif not r.output.strip():
            problems.append(Problem(source, line, "output", "empty: nothing to score the answer against"))
    if problems:
        raise RecordError(problems)


def _record_lines(path: Path) -> list[int] | None:
    """The line number of each record of a JSONL file (blank lines hold none), or None for other sources."""
    if not (path.is_file() and path.suffix == ".jsonl"):
        return None
    with path.open("rb") as f:
        return [n for n, raw in enumerate(f, start=1) if raw.strip()]


def check_modes(catalog: Catalog, modes: Sequence[str], *, endpoint: bool = False, ood: bool = False) -> None:
    """Refuse a mode this catalog (or a running app) cannot serve, before anything runs."""
    if catalog.base_model is None:
        raise ValueError(f"catalog {catalog.version} is routing-only (no adapters): nothing to answer with")
    missing = [k for k, t in catalog.tasks.items() if t.adapter is None]
    if missing and any(m != "base" for m in modes):
        raise ValueError(f"catalog {catalog.version}: tasks {missing} have no adapter; eval generation needs one "
                         f"per task")
    if "multitask" in modes and catalog.multitask is None:
        raise ValueError(f"mode multitask: catalog {catalog.version} carries no multi-task adapter (train one with "
                         f"`switchboard train adapter --multitask`, build with `catalog build --multitask DIR`)")
    if "selector" in modes and not carries(catalog, "selector"):
        raise ValueError(f"mode selector: catalog {catalog.version} has no trained selector "
                         f"(`switchboard train router --kind selector`)")
    if ood and len(catalog.keys) < 2:
        raise ValueError("--ood leaves each query's task out of the pool: the catalog needs at least 2 tasks")
    if {"merged", "ties"} & set(modes):
        ranks = {json.dumps(sorted(_rank_of(catalog.adapter_path(k)).items())) for k in catalog.keys}
        if len(ranks) > 1:
            raise ValueError(f"modes merged/ties: peft's linear and TIES merges need adapters of one rank; catalog "
                             f"{catalog.version} mixes {sorted(ranks)}")
    if endpoint:
        refused = [m for m in modes if m not in ENDPOINT_MODES]
        if refused:
            raise ValueError(f"--endpoint: a running app cannot answer mode(s) {refused} (only "
                             f"{', '.join(ENDPOINT_MODES)}); run them in-process, without --endpoint")
        if ood:
            raise ValueError("--endpoint with --ood: the app's API cannot leave a task out of the pool; run in-process")


def _rank_of(adapter: Path) -> dict[str, int]:
    config = read_adapter_config(adapter, adapter.name)
    return {"r": int(config["r"]), **{k: int(v) for k, v in (config.get("rank_pattern") or {}).items()}}


def limit_per_task(records: list[Record], limit: int | None) -> list[Record]:
    """The first `limit` records of each task, in file order."""
    if limit is None:
        return list(records)
    seen: dict[str, int] = defaultdict(int)
    out = []
    for r in records:
        if seen[r.key] < limit:
            seen[r.key] += 1
            out.append(r)
    return out


# ---- in-process answers -------------------------------------------------------------------------
@dataclass
class InProcessAnswerer:
    """Routes with the catalog's routers and answers with the Generator's engine, in this process.

    Merged adapters are written under `work` (content-addressed, so a second run reuses them)."""

    catalog: Catalog
    work: Path
    base_dir: Path | None = None
    ood: bool = False
    long_answer_tokens: int = LONG_ANSWER_TOKENS
    max_prompt_tokens: int | None = None   # keep only the prompt's last tokens (as training cuts long prompts)
    progress: bool = True
    placement: Placement = Placement(torch.device("cpu"), torch.float32)   # the base model's and encoder's

    def __post_init__(self) -> None:
        c = self.catalog
        base_dir = locate_base_model(c.base_model["id"], self.base_dir)
        model, self.tokenizer = load_causal_lm(base_dir, self.placement.dtype, self.placement.device)
        self.base_path = base_dir
        paths = {k: c.adapter_path(k) for k in c.keys}
        if c.multitask is not None:
            paths["multitask"] = c.root / c.multitask
        rank = max(max(_rank_of(p).values()) for p in paths.values())
        # one slot per catalog adapter, and for the merges of each pool (one pool in-pool, one per task OOD)
        slots = len(paths) + 2 * (len(c.keys) if self.ood else 1)
        fused = FusedLoraModel(model, max_loras=slots, max_rank=rank)
        self.store = AdapterStore(fused, paths)
        self.engine = Engine(fused, self.tokenizer, self.store, EngineConfig(max_waiting=1 << 20),
                             context=getattr(model.config, "max_position_embeddings", None))
        self.encoder = Encoder(c.encoder["name"], c.encoder["prefix"], self.placement.device, self.placement.dtype)
        self._routers: dict[str, object] = {}

    def __call__(self, mode: str, records: list[Record]) -> list[str]:
        routes = self.routes(mode, records)
        prompts = [render(self.catalog.tasks[r.key].template, r.text(self.catalog.encoder["text_mode"]))
                   for r in records]
        budgets = [answer_budget(self.catalog.tasks[r.key].metric, self.long_answer_tokens) for r in records]
        return self.generate(prompts, routes, budgets, desc=mode)

    def pool(self, record: Record) -> list[str]:
        """The adapters a query may use: every task's, less its own under OOD."""
        return [k for k in self.catalog.keys if not (self.ood and k == record.key)]

    def routes(self, mode: str, records: list[Record]) -> list[Route]:
        if mode == "base":
            return [[] for _ in records]
        if mode == "oracle":
            return [[(r.key, 1.0)] for r in records]
        if mode in ("routed", "fused", "selector"):
            return self._routed("selector" if mode == "selector" else "auto", records,
                                FUSED_TOP_K if mode == "fused" else 1)
        if mode == "uniform":
            return [[(k, 1.0 / len(p)) for k in p] for p in map(self.pool, records)]
        if mode in MERGES:
            return [[(self._merged(MERGES[mode], tuple(self.pool(r))), 1.0)] for r in records]
        if mode == "multitask":
            return [[("multitask", 1.0)] for _ in records]
        raise ValueError(f"unknown mode {mode!r}")

    def _routed(self, name: str, records: list[Record], top_k: int) -> list[Route]:
        router = self._routers.get(name) or self._routers.setdefault(name, make_router(name, self.catalog))
        texts = [r.text(self.catalog.encoder["text_mode"]) for r in records]
        embeddings = self.encoder.encode(texts) if router.needs_embedding else [None] * len(texts)
        k = min(top_k, len(self.catalog.keys) - (1 if self.ood else 0))
        requests = [RouteRequest(t, top_k=k, temperature=DEFAULT_TEMPERATURE, embedding=e,
                                 exclude=r.key if self.ood else None) for t, e, r in zip(texts, embeddings, records)]
        return [list(d.tasks) for d in router.route(requests)]

    def _merged(self, combination: str, pool: tuple[str, ...]) -> str:
        """The pool's adapters merged with equal weights by peft (`combination`), loaded under its name."""
        paths = [self.catalog.adapter_path(k) for k in pool]
        h = hashlib.sha256(json.dumps([combination, TIES_DENSITY]).encode())
        for p in paths:
            h.update((p / "adapter_model.safetensors").read_bytes())
        name = f"{combination}-{h.hexdigest()[:12]}"
        out = self.work / "merged" / name
        if not (out / "adapter_config.json").is_file():
            _merge(self.base_path, paths, combination, out)
        if name not in self.store.paths:
            self.store.swap_catalog({**self.store.paths, name: out})
        return name

    def generate(self, prompts: list[str], routes: list[Route], budgets: list[tuple[int, tuple[str, ...]]],
                 desc: str = "answers") -> list[str]:
        """Every prompt through the engine at once (it batches them continuously); the answers' text."""
        texts: dict[str, list[str]] = {}
        for i, (prompt, route, (budget, stop)) in enumerate(zip(prompts, routes, budgets)):
            ids = self.tokenizer(prompt).input_ids
            if self.max_prompt_tokens is not None:
                ids = ids[-self.max_prompt_tokens:]
            try:
                self.engine.add(str(i), ids, route, budget, stop=stop)
            except NeverFitsError as e:
                raise NeverFitsError(f"query {i + 1} ({desc}): {e}; cut prompts with --max-prompt-tokens") from None
            texts[str(i)] = []
        with tqdm(total=len(prompts), desc=desc, file=sys.stderr, disable=not self.progress) as bar:
            while self.engine.has_work:
                for event in self.engine.step():
                    if event.error is not None:
                        raise RuntimeError(f"the engine failed on a request: {event.error}") from event.error
                    texts[event.request_id].append(event.text)
                    bar.update(event.done)
        return ["".join(texts[str(i)]) for i in range(len(prompts))]


def _merge(base_path: Path, adapters: list[Path], combination: str, out: Path) -> None:
    """peft `add_weighted_adapter` over `adapters` with equal weights, saved as a plain adapter at `out`
    (written aside and renamed, so a half-written merge is never reused)."""
    from peft import PeftModel

    model, _ = load_causal_lm(base_path)
    peft_model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="a0")
    for i, path in enumerate(adapters[1:], start=1):
        peft_model.load_adapter(str(path), adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapters))]
    peft_model.add_weighted_adapter(names, [1.0 / len(names)] * len(names), "merged", combination_type=combination,
                                    density=TIES_DENSITY if combination == "ties" else None)
    tmp = Path(tempfile.mkdtemp(prefix=".merge.", dir=out.parent if out.parent.exists() else None))
    try:
        peft_model.save_pretrained(str(tmp), selected_adapters=["merged"], safe_serialization=True)
        saved = tmp / "merged"
        config = json.loads((saved / "adapter_config.json").read_text())
        # the base id the catalog's adapters carry, so the merge is recognised as trained on this base
        config["base_model_name_or_path"] = read_adapter_config(adapters[0], "a0")["base_model_name_or_path"]
        (saved / "adapter_config.json").write_text(json.dumps(config, indent=2))
        out.parent.mkdir(parents=True, exist_ok=True)
        saved.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- evaluation ---------------------------------------------------------------------------------
def evaluate_generation(catalog: Catalog, records: list[Record], modes: Sequence[str], answer: Answerer, *,
                        ood: bool = False) -> dict:
    """Answer `records` under each mode with `answer` and score them by their task's catalog metric.

    Returns per_task (task -> mode -> mean score), macro (mode -> mean over tasks), vs_oracle (mode ->
    macro / oracle's macro, when oracle ran), n (records), n_per_task, metric (task -> name), and
    answers for the first record of each task (a look at what the modes say)."""
    if not records:
        raise ValueError("no records to evaluate")
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    samples: dict[str, dict[str, str]] = defaultdict(dict)
    first = {}
    for i, r in enumerate(records):
        first.setdefault(r.key, i)
    for mode in modes:
        answers = answer(mode, records)
        for i, (r, a) in enumerate(zip(records, answers)):
            scores[r.key][mode].append(score(catalog.tasks[r.key].metric, a, r.output))
            if first[r.key] == i:
                samples[r.key][mode] = a
    per_task = {k: {m: round(float(np.mean(v)), 4) for m, v in by_mode.items()} for k, by_mode in sorted(scores.items())}
    macro = {m: round(float(np.mean([per_task[k][m] for k in per_task])), 4) for m in modes}
    vs_oracle = ({m: round(macro[m] / macro["oracle"], 4) if macro["oracle"] > 0 else None for m in modes}
                 if "oracle" in macro else {})
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        counts[r.key] += 1
    return {"catalog_version": catalog.version, "ood": ood, "modes": list(modes), "per_task": per_task,
            "macro": macro, "vs_oracle": vs_oracle, "n": len(records), "n_per_task": dict(sorted(counts.items())),
            "metric": {k: catalog.tasks[k].metric for k in per_task}, "fused_top_k": FUSED_TOP_K,
            "samples": {k: samples[k] for k in per_task}}


def format_table(result: dict) -> str:
    """The per-task x mode table, then the macro and vs_oracle rows."""
    modes = result["modes"]
    width = max(22, *(len(k) + 2 for k in result["per_task"]))
    head = f"{'task':<{width}}{'metric':<10}{'n':>5}" + "".join(f"{m:>10}" for m in modes)
    lines = [head, "-" * len(head)]
    for key, row in result["per_task"].items():
        lines.append(f"{key:<{width}}{result['metric'][key]:<10}{result['n_per_task'][key]:>5}"
                     + "".join(f"{row[m]:>10.3f}" for m in modes))
    lines.append(f"{'macro':<{width}}{'':<10}{result['n']:>5}" + "".join(f"{result['macro'][m]:>10.3f}" for m in modes))
    if result["vs_oracle"]:
        lines.append(f"{'vs oracle':<{width}}{'':<15}"
                     + "".join(f"{v:>10.3f}" if v is not None else f"{'-':>10}" for v in result["vs_oracle"].values()))
    return "\n".join(lines)


def plot_table(result: dict, path: str | Path) -> Path:
    """The per-task x mode scores as a heatmap PNG, macro as the last row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes, tasks = result["modes"], list(result["per_task"])
    grid = np.array([[result["per_task"][k][m] for m in modes] for k in tasks] + [[result["macro"][m] for m in modes]])
    rows = [f"{k} ({result['metric'][k]})" for k in tasks] + ["macro"]
    fig, ax = plt.subplots(figsize=(1.0 * len(modes) + 3, 0.45 * len(rows) + 1.5))
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(modes)), modes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for i, j in np.ndindex(grid.shape):
        ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                color="black" if grid[i, j] > 0.6 else "white")
    regime = "OOD (own adapter left out)" if result["ood"] else "in pool"
    ax.set_title(f"answers by mode, {regime}; catalog {result['catalog_version'][:12]}, n={result['n']}", fontsize=9)
    return save_figure(fig, ax, image, path)

