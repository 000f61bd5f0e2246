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
import unicodedata
from dataclasses import dataclass

from pixtral_lora.task.prompt import PromptConfig

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_OBJECT = re.compile(r"\{.*?\}", re.DOTALL)


def canonical_key(name: str) -> str:
    """Case- and separator-insensitive key of a label: its letters and digits (any script), case-folded.

    Non-ASCII letters are kept (森林 and 沙漠 stay apart); a name without letters or digits has the
    empty key, which never matches anything.
    """
    return "".join(ch for ch in unicodedata.normalize("NFKC", name).casefold() if ch.isalnum())


def class_name_problem(class_names: list[str]) -> str | None:
    """Why these class names cannot be told apart in answers, or None when they can (one line)."""
    seen: dict[str, str] = {}
    for name in class_names:
        if not name.strip():
            return "an empty class name"
        key = canonical_key(name)
        if not key:
            return f"class name {name!r} has no letters or digits, so no answer can be matched to it"
        if key in seen:
            if seen[key] == name:
                return f"class name {name!r} is listed twice"
            return (
                f"class names {seen[key]!r} and {name!r} differ only in case, spaces or punctuation, "
                "so answers cannot tell them apart; rename one"
            )
        seen[key] = name
    return None


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
        if not strict and (problem := class_name_problem(self.class_names)):
            raise ValueError(problem)

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
        key = canonical_key(raw)
        return ParsedAnswer(label=self._by_key.get(key) if key else None, raw_label=raw)


class AnswerTrie:
    """Prefix tree over the token ids of every valid answer (answer text + </s>)."""

    def __init__(self, sequences: dict[str, list[int]]):
        self.sequences = sequences
        self.root: dict = {}
        for label, ids in sequences.items():
            node = self.root
            for token in ids:
                node = node.setdefault(token, {})
            node[None] = label  # leaf marker

    def allowed(self, generated: list[int]) -> list[int]:
        """Tokens that may follow `generated`; empty when it is a complete answer or left the tree."""
        node = self.root
        for token in generated:
            if token not in node:
                return []
            node = node[token]
        return [token for token in node if token is not None]


def answer_token_ids(tokenizer, prompt: PromptConfig, class_names: list[str]) -> dict[str, list[int]]:
    """Token ids each class's answer is trained as (answer text then </s>), as the renderer produces them."""
    return {
        name: tokenizer(prompt.answer(name), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for name in class_names
    }
