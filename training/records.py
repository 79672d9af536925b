"""Labelled records and their loaders.

A record is one `{instruction, input, output, domain, task}` example. Four on-disk shapes are accepted
(JSONL, a JSON list, the Adapters-Selector config `{domain: {task: path}}`, and a directory tree
`<domain>/<task>/*.jsonl`); every bad record is reported with file, line and field, and a load with
any error raises `RecordError` listing all of them: rows are never dropped silently.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Literal

TextMode = Literal["input", "instruction+input"]
TEXT_MODES: tuple[TextMode, ...] = ("input", "instruction+input")
REQUIRED = ("input", "output", "domain", "task")
TRAIN_FILES, TEST_FILES = "train*.jsonl", "test*.jsonl"   # a tree's splits, when it carries its own


@dataclass(frozen=True)
class Record:
    instruction: str
    input: str
    output: str
    domain: str
    task: str

    @property
    def key(self) -> str:
        """The catalog's task key, `domain/task`."""
        return f"{self.domain}/{self.task}"

    def text(self, mode: TextMode = "input") -> str:
        """What a client would send: the input alone (the instruction when there is no input), or both."""
        if not self.input.strip():
            return self.instruction
        if mode == "input" or not self.instruction:
            return self.input
        return f"{self.instruction}\n{self.input}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = self.file + (f":{self.line}" if self.line is not None else "")
        return f"{where}: {self.field + ': ' if self.field else ''}{self.message}"


class RecordError(ValueError):
    """Raised with every problem found, so a user fixes a file in one pass."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        shown = "\n  ".join(str(p) for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{len(problems)} bad record(s):\n  {shown}{more}")


def _check(obj: object, file: str, line: int | None, defaults: dict[str, str]) -> tuple[Record | None, list[Problem]]:
    if not isinstance(obj, dict):
        return None, [Problem(file, line, None, f"expected a JSON object, got {type(obj).__name__}")]
    merged = {**defaults, **obj}
    problems = [Problem(file, line, name, f"{obj[name]!r} contradicts {value!r}, which the file's place gives")
                for name, value in defaults.items() if obj.get(name, value) != value]
    for name in REQUIRED + ("instruction",):
        value = merged.get(name, "" if name == "instruction" else None)
        if value is None:
            problems.append(Problem(file, line, name, "missing"))
        elif not isinstance(value, str):
            problems.append(Problem(file, line, name, f"expected a string, got {type(value).__name__}"))
        elif name in ("domain", "task") and not value.strip():
            problems.append(Problem(file, line, name, "empty"))
        elif name == "input" and not value.strip() and not str(merged.get("instruction") or "").strip():
            problems.append(Problem(file, line, name, "empty, and there is no instruction either"))
        elif name in ("domain", "task") and "/" in value:
            problems.append(Problem(file, line, name, f"must not contain '/': {value!r}"))
    if problems:
        return None, problems
    return Record(merged.get("instruction", ""), merged["input"], merged["output"], merged["domain"], merged["task"]), []


def _read_jsonl(path: Path, defaults: dict[str, str]) -> tuple[list[Record], list[Problem]]:
    records, problems = [], []
    with path.open("rb") as f:   # decoded line by line, so a bad byte is reported with its line
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                problems.append(Problem(str(path), n, None, f"not UTF-8 text (byte {e.start + 1} of the line)"))
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(Problem(str(path), n, None, f"malformed JSON: {e.msg} (column {e.colno})"))
                continue
            record, bad = _check(obj, str(path), n, defaults)
            problems += bad
            if record:
                records.append(record)
    return records, problems


def _read_json(path: Path, defaults: dict[str, str]) -> tuple[list[Record], list[Problem]]:
    """A list of records, or (at the top level only, `defaults` empty) an Adapters-Selector config."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        return [], [Problem(str(path), None, None, f"not UTF-8 text (byte {e.start + 1})")]
    except json.JSONDecodeError as e:
        return [], [Problem(str(path), e.lineno, None, f"malformed JSON: {e.msg} (column {e.colno})")]
    if isinstance(obj, list):
        records, problems = [], []
        for i, item in enumerate(obj):
            record, bad = _check(item, f"{path}[{i}]", None, defaults)
            problems += bad
            if record:
                records.append(record)
        return records, problems
    if isinstance(obj, dict) and obj and all(isinstance(v, dict) for v in obj.values()):
        if defaults:
            return [], [Problem(str(path), None, None, "a file named by a {domain: {task: path}} config must hold "
                                                       "records, not another config")]
        return _read_as_config(path, obj)
    return [], [Problem(str(path), None, None, "unknown format: expected a list of records or {domain: {task: path}}")]


def _read_as_config(path: Path, config: dict[str, dict]) -> tuple[list[Record], list[Problem]]:
    """The Adapters-Selector config: `{domain: {task: data path}}`, paths relative to the config file."""
    records, problems = [], []
    for domain, tasks in config.items():
        for task, rel in tasks.items():
            if not isinstance(rel, str):
                problems.append(Problem(str(path), None, f"{domain}.{task}", "expected a path string"))
                continue
            target = (path.parent / rel).resolve()
            if not target.is_file():
                why = "is a directory, not a data file" if target.is_dir() else "no such file"
                problems.append(Problem(str(path), None, f"{domain}.{task}", f"{why}: {target}"))
                continue
            got, bad = _load_file(target, {"domain": domain, "task": task})
            records += got
            problems += bad
    return records, problems


def _read_tree(root: Path, files: str | None) -> tuple[list[Record], list[Problem]]:
    """`<root>/<domain>/<task>/<files>`: domain and task default to the folder names."""
    paths = sorted(root.glob(f"*/*/{files or '*.jsonl'}"))
    if not paths:
        return [], [Problem(str(root), None, None, f"no <domain>/<task>/{files or '*.jsonl'} files under this "
                                                   f"directory")]
    tests = [f for f in paths if f.match(TEST_FILES)]
    if files is None and tests and len(tests) < len(paths):
        others = sorted({f.name for f in paths} - {f.name for f in tests})
        return [], [Problem(str(root), None, None, f"holds a test split ({tests[0].relative_to(root)}, ...) beside "
                                                   f"{', '.join(others)}: reading both would train on the test split; "
                                                   f"name the files: --files 'train*.jsonl' (or '*.jsonl' for all), "
                                                   f"or in a run config an Adapters-Selector config of the files")]
    records, problems = [], []
    for f in paths:
        got, bad = _read_jsonl(f, {"domain": f.parent.parent.name, "task": f.parent.name})
        records += got
        problems += bad
    return records, problems


def _load_file(path: Path, defaults: dict[str, str]) -> tuple[list[Record], list[Problem]]:
    """One file; `defaults` (domain, task) come from an Adapters-Selector config or a tree's folders, and a
    record that names another domain or task is a problem, not silently relabelled."""
    if path.suffix == ".jsonl":
        return _read_jsonl(path, defaults)
    if path.suffix == ".json":
        return _read_json(path, defaults)
    return [], [Problem(str(path), None, None, f"unknown format {path.suffix!r}: use .jsonl, .json or a directory")]


def load_records(path: str | Path, files: str | None = None) -> list[Record]:
    """Load records from any supported shape; raise `RecordError` naming every bad row.

    In a `<domain>/<task>/` tree only the files matching the glob `files` are read (e.g. "train*.jsonl").
    By default every *.jsonl is, unless test*.jsonl files sit beside others: a test split silently
    pooled into training data is the one mistake an evaluation cannot reveal, so that is refused.
    """
    p = Path(path)
    if not p.exists():
        raise RecordError([Problem(str(p), None, None, "no such file or directory")])
    records, problems = _read_tree(p, files) if p.is_dir() else _load_file(p, {})
    if problems:
        raise RecordError(problems)
    if not records:
        raise RecordError([Problem(str(p), None, None, "no records")])
    return records


def write_jsonl(records: Iterable[Record], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(r.to_json() + "\n")
    return p


def group_by_task(records: Iterable[Record]) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        groups[r.key].append(r)
    return dict(sorted(groups.items()))


def split_per_task(records: Iterable[Record], fraction: float, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """Hold out `fraction` of every task, deterministically by `seed`: at least one row, and never a
    task's last one (a task with nothing to learn from would score as certain misses)."""
    if not 0 < fraction < 1:
        raise ValueError(f"held-out fraction {fraction} is not between 0 and 1")
    kept, held = [], []
    for key, rows in group_by_task(records).items():
        rows = list(rows)
        random.Random(f"{seed}:{key}").shuffle(rows)
        n = min(max(1, round(len(rows) * fraction)), len(rows) - 1)
        held += rows[:n]
        kept += rows[n:]
    return kept, held


def has_test_split(path: str | Path) -> bool:
    """Whether a `<domain>/<task>/` tree carries its own test split (`TEST_FILES`)."""
    return Path(path).is_dir() and any(Path(path).glob(f"*/*/{TEST_FILES}"))


def train_test_records(path: str | Path, test: str | Path | None = None, fraction: float = 0.1,
                       seed: int = 0) -> tuple[list[Record], list[Record]]:
    """(training, test) records: `path` against a given `test` split; else a tree's own test*.jsonl
    against its train*.jsonl; else a seeded `fraction` of every task held out (`split_per_task`).

    A test task that has no training records is an error: nothing could have learnt it.
    """
    if test is not None:
        train, held = load_records(path), load_records(test)
    elif has_test_split(path):
        train, held = load_records(path, TRAIN_FILES), load_records(path, TEST_FILES)
    else:
        return split_per_task(load_records(path), fraction, seed)
    unknown = sorted({r.key for r in held} - {r.key for r in train})
    if unknown:
        raise RecordError([Problem(str(test or path), None, None, f"test tasks with no training records: {unknown}")])
    return train, held
