"""Reading a label out of what a model actually wrote.

Normalisation (on unless `strict`): the answer may be a ```json fenced block or bare JSON, use single
quotes, carry text before or after, or have no JSON at all when the whole answer is one class name.
The label is matched to a class name ignoring case and any character that is not a letter or digit
("Dense Residential", "dense_residential" and "DENSE-RESIDENTIAL" all mean DenseResidential).
With `strict`, only a JSON object with a "label" key whose value is exactly a class name counts.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_OBJECT = re.compile(r"\{.*?\}", re.DOTALL)


def canonical_key(name: str) -> str:
    """Case- and separator-insensitive key of a label: letters and digits only, lower case."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


@dataclass(frozen=True)
class ParsedAnswer:
    """`label` is a class name or None; `raw_label` is what the model wrote, when anything was found."""

    label: str | None
    raw_label: str | None

    @property
    def parsed(self) -> bool:
        return self.raw_label is not None

    @property
    def hallucinated(self) -> bool:
        """A label was found but it names no class."""
        return self.raw_label is not None and self.label is None


def _load_object(text: str, strict: bool) -> dict | None:
    try:
        value = json.loads(text)
    except ValueError:
        if strict:
            return None
        try:
            value = ast.literal_eval(text)  # single-quoted dicts; literal_eval never executes code
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None
    return value if isinstance(value, dict) else None


def _find_label_value(text: str, strict: bool) -> str | None:
    candidates = [m.group(1).strip() for m in _FENCE.finditer(text)]
    if not strict:
        candidates += [m.group(0) for m in _OBJECT.finditer(text)]
        candidates.append(text.strip())
    elif not candidates:
        candidates.append(text.strip())
    for candidate in candidates:
        obj = _load_object(candidate, strict)
        if obj is None:
            continue
        for key, value in obj.items():
            if (
                key == "label" if strict else str(key).strip().lower() in ("label", "category", "class")
            ) and isinstance(value, str):
                return value.strip() if not strict else value
    return None


class AnswerParser:
    """Maps raw answers to class names for one class set."""

    def __init__(self, class_names: list[str], strict: bool = False):
        self.class_names = list(class_names)
        self.strict = strict
        self._by_key = {canonical_key(name): name for name in self.class_names}
        if len(self._by_key) != len(self.class_names):
            raise ValueError("two class names normalise to the same key; use --strict or rename them")

    def parse(self, answer: str) -> ParsedAnswer:
        """Parse one answer; see the module docstring for what is accepted."""
        raw = _find_label_value(answer, self.strict)
        if raw is None and not self.strict:
            bare = answer.strip().strip("`'\".").strip()
            if bare and "\n" not in bare and len(bare) <= 64 and "{" not in bare:
                raw = bare
        if raw is None:
            return ParsedAnswer(label=None, raw_label=None)
        if self.strict:
            return ParsedAnswer(label=raw if raw in self.class_names else None, raw_label=raw)
        return ParsedAnswer(label=self._by_key.get(canonical_key(raw)), raw_label=raw)
