"""The catalog: everything serving needs, in one immutable, versioned directory.

    <catalog>/catalog.json          manifest: base model, encoder, tasks, router artefacts, version
    <catalog>/index.npz             task index (centroids + the sample embeddings they came from)
    <catalog>/adapters/<d>/<t>/     one peft adapter per task (safetensors only)
    <catalog>/routers/<name>/       trained router artefacts (selector LoRA, classifier, lexical), optional
    <catalog>/multitask/            one adapter trained on every task's data (the papers' baseline), optional

The version is a hash of the manifest and every file, so two catalogs with the same version are the
same bytes. Loading re-checks everything a hostile or stale directory could get wrong: adapter
paths confined to the directory, pickled weights refused, adapters trained on another base refused,
and content matching the version. A new adapter set or router is a new catalog, never an edit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .adapter_config import AdapterLoadError, read_adapter_config
from .calibration import calibrate
from .encoder import check_encoder
from .metrics import METRICS
from .task_index import TaskIndex, TaskIndexError

FORMAT = 1
MANIFEST = "catalog.json"
INDEX_FILE = "index.npz"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
MULTITASK_DIR = "multitask"
LABELS_FILE = "labels.json"   # in a trained router's directory: the task keys it scores, in its output order


class CatalogError(ValueError):
    """A catalog directory that must not be served, with the reason."""


@dataclass(frozen=True)
class TaskEntry:
    domain: str
    task: str
    template: str
    metric: str = "exact"               # routing.metrics name; catalogs before per-task metrics all say exact
    adapter: str | None = None          # path relative to the catalog root, or None (routing-only)
    lora: dict[str, Any] | None = None  # variant, r, alpha, target modules: what the adapter was trained with

    @property
    def key(self) -> str:
        return f"{self.domain}/{self.task}"


@dataclass(frozen=True)
class Catalog:
    root: Path
    version: str
    base_model: dict[str, str] | None   # {"name": "tiny", "id": "<dir>@<hash>"}; None for routing-only
    encoder: dict[str, Any]             # {"name", "prefix", "text_mode"[, "fingerprint"]}
    tasks: dict[str, TaskEntry]
    index: TaskIndex
    routers: dict[str, str] = field(default_factory=dict)  # router name -> artefact dir (relative)
    parent: str | None = None           # the version this one was derived from
    calibration: dict[str, float] = field(default_factory=dict)  # fitted to this index, e.g. routing.calibration
    multitask: str | None = None        # the multi-task adapter's directory (relative), for `eval generation`

    @property
    def keys(self) -> list[str]:
        return list(self.tasks)

    def adapter_path(self, key: str) -> Path | None:
        rel = self.tasks[key].adapter
        return None if rel is None else self.root / rel

    def router_path(self, name: str) -> Path:
        if name not in self.routers:
            raise CatalogError(f"catalog {self.version} has no trained {name!r} router; train one with "
                               f"`switchboard train router --kind {name}`")
        return self.root / self.routers[name]

    @classmethod
    def load(cls, root: str | Path, verify: bool = True) -> "Catalog":
        root = Path(root)
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise CatalogError(f"{root} is not a catalog (no {MANIFEST})")
        try:
            m = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CatalogError(f"{manifest_path}: malformed JSON: {e}") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            got = m.get("format") if isinstance(m, dict) else f"a JSON {type(m).__name__}"
            raise CatalogError(f"{manifest_path}: unsupported catalog format {got!r} (expected {FORMAT})")
        _check_manifest_shape(m, manifest_path)
        index_path = root / _confined(root, m.get("index", INDEX_FILE), "index")
        try:
            index = TaskIndex.load(index_path)
        except OSError as e:
            raise CatalogError(f"{index_path}: not a readable task index ({e.strerror})") from None
        except TaskIndexError as e:
            raise CatalogError(f"{index_path}: {e}") from None
        except (ValueError, KeyError) as e:   # numpy's own text suggests unpickling, which catalogs never do
            raise CatalogError(f"{index_path}: not a readable task index (an .npz of plain arrays "
                               f"keys, centroids, embeddings, labels; {type(e).__name__})") from None
        try:
            tasks = {k: TaskEntry(**v) for k, v in m["tasks"].items()}
            catalog = cls(root, m["version"], m.get("base_model"), m["encoder"], tasks, index,
                          m.get("routers", {}), m.get("parent"), m.get("calibration", {}), m.get("multitask"))
        except (KeyError, TypeError) as e:   # a missing field, or one TaskEntry does not have
            raise CatalogError(f"{manifest_path}: bad manifest: {e}") from None
        catalog._validate(verify)
        return catalog

    def _validate(self, verify: bool) -> None:
        for key, entry in self.tasks.items():
            if key != entry.key:
                raise CatalogError(f"task {key!r} is listed with domain/task {entry.key!r}")
            if not isinstance(entry.template, str) or "{text}" not in entry.template:
                raise CatalogError(f"task {key}: template has no {{text}} placeholder")
            if entry.metric not in METRICS:
                raise CatalogError(f"task {key}: unknown metric {entry.metric!r}; known: {', '.join(sorted(METRICS))}")
            if entry.adapter is not None:
                self._check_adapter(key, entry.adapter)
        if self.multitask is not None:
            self._check_adapter("multitask", self.multitask)
        try:
            check_encoder(self.encoder)
        except ValueError as e:
            raise CatalogError(str(e)) from None
        if sorted(self.index.keys) != sorted(self.tasks):
            raise CatalogError(f"task index covers {sorted(self.index.keys)} but the catalog lists {sorted(self.tasks)}")
        for name, rel in self.routers.items():
            _confined(self.root, rel, f"router {name}")
            labels = router_labels(self.root / rel)
            if labels is not None and sorted(labels) != sorted(self.tasks):
                raise CatalogError(f"router {name} scores tasks {sorted(labels)}, but the catalog lists "
                                   f"{sorted(self.tasks)}; retrain it (`switchboard train router --kind {name}`)")
        if verify and content_version(self.root) != self.version:
            raise CatalogError(f"{self.root}: content does not match version {self.version} (edited after it was written?)")

    def _check_adapter(self, key: str, rel: str) -> None:
        path = self.root / _confined(self.root, rel, f"task {key} adapter")
        if not path.is_dir():
            raise CatalogError(f"task {key}: adapter directory {rel} is missing")
        pickled = [f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES]
        if pickled:
            raise CatalogError(f"task {key}: adapter {rel} holds pickled weights {pickled}; "
                               f"only safetensors are loaded (re-save with safe_serialization=True)")
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise CatalogError(f"task {key}: adapter {rel} has no {ADAPTER_WEIGHTS}")
        try:
            config = read_adapter_config(path, key)   # what the fused layers would refuse, refused here
        except AdapterLoadError as e:
            raise CatalogError(f"task {key}: {e}") from None
        trained_on = config.get("base_model_name_or_path")
        expected = (self.base_model or {}).get("id")
        if expected is None:
            raise CatalogError(f"task {key}: catalog has adapters but names no base model")
        if trained_on != expected:
            raise CatalogError(f"task {key}: adapter {rel} was trained on base model {trained_on!r}, "
                               f"but this catalog serves {expected!r}")


# Top-level manifest fields and the JSON types they must have (absent optional ones are fine).
_MANIFEST_TYPES: dict[str, tuple[type, ...]] = {
    "version": (str,), "encoder": (dict,), "tasks": (dict,), "index": (str,), "routers": (dict,),
    "base_model": (dict, type(None)), "parent": (str, type(None)), "calibration": (dict,), "multitask": (str,)}


def _check_manifest_shape(m: dict, path: Path) -> None:
    """Name the field when a hand-edited manifest has the wrong JSON type somewhere."""
    for name, types in _MANIFEST_TYPES.items():
        if name in m and not isinstance(m[name], types):
            raise CatalogError(f"{path}: {name}: expected {' or '.join(t.__name__ for t in types)}, "
                               f"got {type(m[name]).__name__}")
    for name, types in (("tasks", dict), ("routers", str), ("calibration", (int, float))):
        for key, value in m.get(name, {}).items():
            if not isinstance(value, types) or isinstance(value, bool):
                expected = types.__name__ if isinstance(types, type) else "number"
                raise CatalogError(f"{path}: {name}.{key}: expected {expected}, got {type(value).__name__}")


def _confined(root: Path, rel: str, what: str) -> str:
    """Refuse absolute paths, `..` and symlinks that lead out of the catalog directory."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or ".." in Path(rel).parts:
        raise CatalogError(f"{what}: path {rel!r} must be relative and inside the catalog")
    real_root = root.resolve()
    target = (root / rel).resolve()
    if target != real_root and real_root not in target.parents:
        raise CatalogError(f"{what}: path {rel!r} resolves outside the catalog (symlink?)")
    for sub in [target, *target.rglob("*")] if target.is_dir() else [target]:
        if sub.is_symlink() and real_root not in sub.resolve().parents:
            raise CatalogError(f"{what}: {sub.relative_to(root.resolve()) if sub.is_relative_to(real_root) else sub} "
                               f"is a symlink out of the catalog")
    return rel


def content_version(root: Path) -> str:
    """Hash of every file under the catalog except the manifest's own `version` field."""
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        data = f.read_bytes()
        if rel == MANIFEST:
            m = json.loads(data)
            m.pop("version", None)
            data = json.dumps(m, sort_keys=True).encode()
        h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()[:16]


def check_new_catalog_dir(out: str | Path) -> None:
    """`out` can become a new catalog: absent or an empty directory (catalogs are never edited).

    Commands call it before their expensive part, so a bad `--out` fails first, not last."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CatalogError(f"{out} already exists and is not an empty directory; catalogs are immutable, "
                           f"write a new directory")


def write_catalog(out: str | Path, *, tasks: dict[str, TaskEntry], index: TaskIndex, encoder: dict[str, str],
                  base_model: dict[str, str] | None = None, adapter_dirs: dict[str, Path] | None = None,
                  router_dirs: dict[str, Path] | None = None, parent: str | None = None,
                  calibration: dict[str, float] | None = None, multitask_dir: Path | None = None,
                  versioned: bool = False) -> Catalog:
    """Write a new catalog directory atomically and return it loaded (and so validated).

    `adapter_dirs` / `router_dirs` / `multitask_dir` are copied in (only their safetensors and JSON files), so the
    catalog owns its bytes. `out` must not exist yet, or be empty: catalogs are never edited. With
    `versioned`, `out` is a parent directory and the catalog lands in `out/<version>`; writing the
    same content twice returns the existing one.
    """
    out = Path(out)
    if not versioned:
        check_new_catalog_dir(out)
    staging = out if versioned else out.parent
    staging.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".new-catalog.", dir=staging))
    try:
        tasks = dict(sorted(tasks.items()))
        for key, src in (adapter_dirs or {}).items():
            rel = f"adapters/{key}"
            _copy_artefact(Path(src), tmp / rel)
            tasks[key] = TaskEntry(**{**asdict(tasks[key]), "adapter": rel})
        routers = {}
        for name, src in (router_dirs or {}).items():
            routers[name] = f"routers/{name}"
            _copy_artefact(Path(src), tmp / routers[name])
        index.save(tmp / INDEX_FILE)
        manifest = {"format": FORMAT, "base_model": base_model, "encoder": encoder, "index": INDEX_FILE,
                    "tasks": {k: asdict(v) for k, v in tasks.items()}, "routers": routers, "parent": parent}
        if calibration:   # absent when empty: catalogs without one keep their manifest (and version)
            manifest["calibration"] = calibration
        if multitask_dir is not None:   # likewise
            _copy_artefact(Path(multitask_dir), tmp / MULTITASK_DIR)
            manifest["multitask"] = MULTITASK_DIR
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        manifest["version"] = content_version(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        Catalog.load(tmp)   # validated before it becomes visible: a refused catalog leaves nothing behind
        if versioned:
            out = out / manifest["version"]
        if versioned and out.exists():
            shutil.rmtree(tmp)
        else:
            if out.exists():
                out.rmdir()
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Catalog.load(out)


def router_labels(path: Path) -> list[str] | None:
    """The task keys a trained router directory scores (`LABELS_FILE`), or None if it has none."""
    file = path / LABELS_FILE
    if not file.is_file():
        return None
    try:
        labels = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CatalogError(f"{file}: malformed JSON: {e}") from None
    distinct = isinstance(labels, list) and all(isinstance(k, str) for k in labels) and len(set(labels)) == len(labels)
    if not distinct:
        raise CatalogError(f"{file}: expected a JSON list of distinct task keys")
    return labels


def _copy_artefact(src: Path, dst: Path) -> None:
    """Copy an adapter/router directory, keeping only safetensors, JSON and tokenizer files."""
    if not src.is_dir():
        raise CatalogError(f"{src}: not a directory")
    pickled = [f.name for f in src.iterdir() if f.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise CatalogError(f"{src} holds pickled weights {pickled}; only safetensors are accepted")
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix in (".safetensors", ".json", ".jsonl", ".txt", ".model", ".jinja"):
            shutil.copy2(f, dst / f.name)


def derive_catalog(base: Catalog, out: str | Path, *, router_dirs: dict[str, Path] | None = None,
                   tasks: dict[str, TaskEntry] | None = None, index: TaskIndex | None = None,
                   adapter_dirs: dict[str, Path] | None = None, versioned: bool = False) -> Catalog:
    """A new catalog version from `base`: same content except what is given, `parent` = base's version.

    `router_dirs` adds or replaces trained routers; `tasks`/`index`/`adapter_dirs` replace the task
    set (adapters of kept tasks are carried over from `base` unless given). A trained router of
    `base` that scores another task set than the new one is left behind (it would be refused). A
    calibrated `base` gets its calibration refitted when a new index is given (`routing.calibration`).
    The multi-task adapter is carried over while the task set stays the one it was trained on.
    """
    tasks = dict(tasks if tasks is not None else base.tasks)
    adapters = {k: base.adapter_path(k) for k in tasks if k in base.tasks and base.tasks[k].adapter}
    adapters.update(adapter_dirs or {})
    routers = {name: base.router_path(name) for name in base.routers
               if sorted(router_labels(base.router_path(name)) or tasks) == sorted(tasks)}
    routers.update(router_dirs or {})
    multitask = base.root / base.multitask if base.multitask and sorted(tasks) == sorted(base.tasks) else None
    return write_catalog(out, tasks={k: TaskEntry(**{**asdict(t), "adapter": None}) for k, t in tasks.items()},
                         index=index if index is not None else base.index, encoder=base.encoder,
                         base_model=base.base_model, adapter_dirs=adapters, router_dirs=routers,
                         parent=base.version, versioned=versioned, multitask_dir=multitask,
                         calibration=base.calibration if index is None else calibrate(index, bool(base.calibration)))
