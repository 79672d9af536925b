"""Per-task prompt templates.

A template is a string with one `{text}` placeholder, filled with what the client sent. A task whose
records all share one instruction bakes that instruction into its template, so clients send only the
input (the Adapters-Selector flow: pick the task, apply its template); otherwise the instruction
travels inside the text itself.
"""

from __future__ import annotations

from typing import Iterable

PLACEHOLDER = "{text}"
DEFAULT_TEMPLATE = "### Input:\n{text}\n### Output:\n"


def render(template: str, text: str) -> str:
    """Fill the template. Plain replacement, not `str.format`, so braces in the text are safe."""
    if PLACEHOLDER not in template:
        raise ValueError(f"template has no {PLACEHOLDER} placeholder: {template!r}")
    return template.replace(PLACEHOLDER, text)


def template_for(instructions: Iterable[str], text_mode: str = "input") -> str:
    """The template for a task whose records carry these instructions."""
    distinct = {i.strip() for i in instructions if i.strip()}
    if text_mode == "input" and len(distinct) == 1:
        (instruction,) = distinct
        return f"### Instruction:\n{instruction}\n" + DEFAULT_TEMPLATE
    return DEFAULT_TEMPLATE
