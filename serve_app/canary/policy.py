"""A canary policy: the traffic steps of a rollout and the checks before each, read from YAML and validated.

    steps: [shadow, 5, 25, 50, 100]   # "shadow", then percentages of traffic answered by the candidate
    min_requests: 200                 # candidate requests (shadow: compared requests) a step needs to be judged
    interval_s: 30                    # how often the analysis runs
    checks:
      error_rate_margin: 0.01         # candidate error rate <= stable's + this
      max_p99_latency_ratio: 1.5      # candidate p99 / stable p99 <= this
      min_agreement: 0.9              # shadow: the candidate's top-1 task = stable's on this share of requests
      accuracy_margin: 0.02           # labelled traffic: candidate accuracy >= stable's - this
      min_labelled: 50                # labelled requests the accuracy check needs (fewer: Inconclusive)
      require_accuracy: false         # true: no promotion while the accuracy check is Inconclusive
    max_inconclusive: 20              # analyses in a row without a verdict before the rollout is rolled back

Errors name the file, the line and the key (`policy.yaml:7: checks.min_agrement: unknown key`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SHADOW = "shadow"
Step = Union[Literal["shadow"], float]


class Checks(BaseModel):
    model_config = ConfigDict(extra="forbid")

    error_rate_margin: float = Field(0.01, ge=0, le=1)
    max_p99_latency_ratio: float = Field(1.5, gt=0)
    min_agreement: float = Field(0.9, ge=0, le=1)
    accuracy_margin: float = Field(0.02, ge=0, le=1)
    min_labelled: int = Field(50, ge=1)
    require_accuracy: bool = False


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: list[Step] = Field(min_length=1)
    min_requests: int = Field(200, ge=1)
    interval_s: float = Field(30, gt=0)
    checks: Checks = Checks()
    max_inconclusive: int = Field(20, ge=1)

    @field_validator("steps")
    @classmethod
    def _steps_climb_to_100(cls, steps: list[Step]) -> list[Step]:
        if SHADOW in steps[1:]:
            raise ValueError("'shadow' can only be the first step")
        weights = [s for s in steps if s != SHADOW]
        if not weights or weights[-1] != 100:
            raise ValueError("the last step must be 100 (the candidate answers all traffic)")
        if any(not 0 < w <= 100 for w in weights) or weights != sorted(set(weights)):
            raise ValueError(f"percentages must rise strictly within (0, 100]: {weights}")
        return steps

    def weight(self, step: int) -> float:
        """Share of traffic the candidate answers at `step` (0 in shadow: stable answers everything)."""
        s = self.steps[step]
        return 0.0 if s == SHADOW else s / 100

    def is_shadow(self, step: int) -> bool:
        return self.steps[step] == SHADOW


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file; a ValueError names the file, line and key of the first problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not YAML: {e}") from None
    return parse_policy(text, path)


def parse_policy(text: str, path: str | Path = "policy") -> Policy:
    """Validate a policy's YAML text (the Admin service gets the text, not a file); errors name `path`."""
    path = Path(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a canary policy is a mapping with `steps:` (see serve_app/canary/policy.py)")
    try:
        return Policy.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        keys = [str(k) for k in err["loc"] if not str(k).startswith(("literal[", "float"))]
        what = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        if len(keys) == 2 and keys[0] == "steps":   # the union's first complaint ("should be 'shadow'") misleads
            what = f"a step is 'shadow' or a percentage of traffic, got {err['input']!r}"
        return _raise(path, text, keys, what)


def _raise(path: Path, text: str, keys: list[str], what: str) -> Any:
    line = _line_of(text, keys)
    where = f"{path}:{line}" if line else str(path)
    raise ValueError(f"{where}: {'.'.join(keys) or '(top level)'}: {what}")


def _line_of(text: str, keys: list[str]) -> int | None:
    """The 1-based line of the YAML node at `keys` (mapping keys and list indices), or of its nearest parent."""
    node, line = yaml.compose(text), None
    for key in keys:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == key), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and key.isdigit() and int(key) < len(node.value):
            node = node.value[int(key)]
            line = node.start_mark.line + 1
        else:
            break
    return line
