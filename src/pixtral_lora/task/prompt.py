"""The classification task as Pixtral sees it: system prompt with the class list, image, json answer.

Defaults reproduce Mistral's AID study: the system prompt lists the classes separated by semicolons
and asks for a ```json block; the user turn is the image; the assistant answers with the label in
that block.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, field_validator

DEFAULT_SYSTEM_PROMPT = (
    "You are an expert in satellite imagery. Classify the image into exactly one of the following "
    "categories: {class_list}.\n"
    'Answer only with a json block of the form:\n```json\n{"label": "<category>"}\n```'
)
DEFAULT_ANSWER_TEMPLATE = '```json\n{"label": "{label}"}\n```'


class PromptConfig(BaseModel):
    """Prompt text and answer format; `{class_list}` and `{label}` are the only placeholders."""

    model_config = ConfigDict(extra="forbid")

    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    class_separator: str = "; "
    # Optional text sent with the image in the user turn (the study sent the image alone).
    user_text: str | None = None
    answer_template: str = DEFAULT_ANSWER_TEMPLATE

    @field_validator("answer_template")
    @classmethod
    def _answer_has_label(cls, value: str) -> str:
        if value.count("{label}") != 1:
            raise ValueError("answer_template must contain the placeholder {label} exactly once")
        return value

    def class_list_problem(self, class_names: list[str]) -> str | None:
        """Why `class_names` cannot be listed in the system prompt (None when they can): a name holding
        `class_separator` would read as two classes there."""
        mark = self.class_separator.strip() or self.class_separator
        if self.system_prompt and "{class_list}" in self.system_prompt:
            for name in class_names:
                if mark in name:
                    return (
                        f"class name {name!r} contains the prompt's class separator {self.class_separator!r}, "
                        "so the class list the model reads names another set of classes; rename it "
                        "(data.class_labels) or choose another prompt.class_separator"
                    )
        return None

    def system_text(self, class_names: list[str]) -> str | None:
        """The system prompt with the class list filled in."""
        if not self.system_prompt:
            return None
        return self.system_prompt.replace("{class_list}", self.class_separator.join(class_names))

    def answer(self, label: str) -> str:
        """The assistant's target text for `label`.

        Where the template quotes the label as a JSON string (`"{label}"`, the default), the label is
        JSON-escaped, so a class name with a quote or a backslash still gives valid JSON that parses
        back to that name (non-ASCII stays as it is: the tokens are the same as before).
        """
        if '"{label}"' in self.answer_template:
            return self.answer_template.replace("{label}", json.dumps(label, ensure_ascii=False)[1:-1])
        return self.answer_template.replace("{label}", label)

    def answer_prefix(self) -> str:
        """The fixed text before the label in every answer (used by constrained decoding and scoring)."""
        return self.answer_template.split("{label}")[0]

    def answer_suffix(self) -> str:
        """The fixed text after the label in every answer."""
        return self.answer_template.split("{label}")[1]

    def messages(self, class_names: list[str], label: str | None = None) -> list[dict]:
        """HF chat messages for one image: system, user (image [+ text]) and, for training, the answer."""
        messages: list[dict] = []
        system = self.system_text(class_names)
        if system:
            messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
        user_content: list[dict] = [{"type": "image"}]
        if self.user_text:
            user_content.append({"type": "text", "text": self.user_text})
        messages.append({"role": "user", "content": user_content})
        if label is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": self.answer(label)}]})
        return messages


def messages_to_json(messages: list[dict]) -> str:
    """Messages are stored in datasets as JSON text: their chunk lists are heterogeneous."""
    return json.dumps(messages, ensure_ascii=False)
