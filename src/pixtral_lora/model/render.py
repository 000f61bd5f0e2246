"""Samples as the model sees them: chat template -> token ids, loss mask, pixel values.

The prompt (system, user text, image tokens, `[IMG_BREAK]`, `[IMG_END]`, `[/INST]`) never carries
loss; the assistant answer and its `</s>` do. The template is mistral_common's (see
`modeling.chat_template`), and `tests/model/test_parity.py` checks the prompt ids token for token against
`mistral_common`'s `encode_chat_completion`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import torch
from datasets import Dataset

from pixtral_lora.data.images import image_token_count, load_image, prepare_image, processor_cell
from pixtral_lora.data.loaders import image_source
from pixtral_lora.errors import UserError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


class RenderError(UserError):
    """A sample that cannot be rendered (template mismatch, image token mismatch, ...)."""


@dataclass
class RenderReport:
    """Samples kept and skipped by `render_dataset`, with the ids of the skipped ones."""

    kept: int = 0
    too_long: list[str] = field(default_factory=list)
    bad_image: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"{self.kept} kept, {len(self.too_long)} skipped as longer than max_length, {len(self.bad_image)} skipped with unusable images"


class Renderer:
    """Turns conversation rows into model inputs with one processor and one image size policy."""

    def __init__(
        self, processor, image_longest_edge: int | None = None, max_length: int | None = None, bands=None
    ):
        self.processor = processor
        self.bands = bands  # geo.BandOptions for multi-band rasters, or None
        self.tokenizer = processor.tokenizer
        self.image_longest_edge = image_longest_edge
        self.image_cell = processor_cell(processor)  # 16 px (Pixtral-12B) or 28 px (Mistral3)
        largest = (getattr(processor.image_processor, "size", None) or {}).get("longest_edge")
        if image_longest_edge is not None and largest and image_longest_edge > largest:
            raise RenderError(
                f"data.image_longest_edge is {image_longest_edge} but this model's vision encoder takes "
                f"at most {largest} px (its processor would shrink every image behind the token count)"
            )
        self.max_length = max_length
        self.pad_token_id = self.tokenizer.pad_token_id
        self.image_marker_ids = {
            processor.image_token_id,
            processor.image_break_token_id,
            processor.image_end_token_id,
        }

    # -- images --------------------------------------------------------------------------------------
    def load_images(self, refs: list[dict]) -> list:
        """Decode, check and cell-align the images of one row."""
        return [
            prepare_image(
                load_image(image_source(ref), bands=self.bands, name=(ref or {}).get("path")),
                self.image_longest_edge,
                self.image_cell,
            )
            for ref in refs
        ]

    # -- text ----------------------------------------------------------------------------------------
    def template(self, messages: list[dict]) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False)

    def prompt_ids(self, messages: list[dict], images: list) -> tuple[list[int], dict]:
        """Token ids of a prompt (no answer) with image tokens expanded, and the processor's image tensors."""
        text = self.template(messages)
        encoded = self.processor(
            text=text, images=images or None, add_special_tokens=False, return_tensors="pt"
        )
        image_inputs = {k: v for k, v in encoded.items() if k in ("pixel_values", "image_sizes")}
        return encoded["input_ids"][0].tolist(), image_inputs

    def render(self, messages: list[dict], images: list) -> dict:
        """Training sample: input_ids and labels (IGNORE_INDEX on everything but the answer and </s>)."""
        if not messages or messages[-1]["role"] != "assistant":
            raise RenderError("the last message must be the assistant's answer")
        prompt_text = self.template(messages[:-1])
        full_text = self.template(messages)
        if not full_text.startswith(prompt_text):
            raise RenderError("chat template renders the prompt differently with and without the answer")
        prompt, image_inputs = self.prompt_ids(messages[:-1], images)
        answer = self.tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
        return {
            "input_ids": prompt + answer,
            "labels": [IGNORE_INDEX] * len(prompt) + answer,
            **image_inputs,
        }

    def render_row(self, row: dict) -> dict:
        """Render a conversation-dataset row (messages JSON + image refs) as a training sample."""
        return self.render(json.loads(row["messages"]), self.load_images(row["images"]))


def prompt_messages(row: dict) -> list[dict]:
    """The messages of a conversation row without its final answer: what the model is asked."""
    messages = json.loads(row["messages"])
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages


def render_dataset(renderer: Renderer, conversations: Dataset, report: RenderReport | None = None) -> Dataset:
    """Render token ids and loss masks for every row; rows too long or with bad images are counted, not cut.

    Truncating would cut inside image tokens (the model then errors on a token/feature mismatch) or
    drop the answer; a skipped sample is reported by id instead.
    """
    from pixtral_lora.data.images import ImageError

    report = report if report is not None else RenderReport()

    def render(row):
        try:
            sample = renderer.render_row(row)
        except ImageError as err:
            logger.warning("skipping %s: %s", row["id"], err)
            return {"input_ids": [], "labels": [], "skip": "bad_image"}
        too_long = renderer.max_length is not None and len(sample["input_ids"]) > renderer.max_length
        return {
            "input_ids": sample["input_ids"],
            "labels": sample["labels"],
            "skip": "too_long" if too_long else "",
        }

    rendered = conversations.map(render, desc="rendering samples")
    for row_id, skip in zip(rendered["id"], rendered["skip"], strict=True):
        if skip == "too_long":
            report.too_long.append(row_id)
        elif skip == "bad_image":
            report.bad_image.append(row_id)
    kept = rendered.filter(lambda skip: skip == "", input_columns="skip").remove_columns("skip")
    report.kept = len(kept)
    if report.too_long or report.bad_image:
        logger.warning(
            "rendering: %s; first skipped: %s", report.summary(), (report.too_long + report.bad_image)[:5]
        )
    return kept


class TrainingCollator:
    """Batches rendered rows: right-pads ids/labels, loads and processes the images of the batch."""

    def __init__(self, renderer: Renderer):
        self.renderer = renderer

    def __call__(self, rows: list[dict]) -> dict:
        images = [image for row in rows for image in self.renderer.load_images(row["images"])]
        batch = pad_batch([row["input_ids"] for row in rows], self.renderer.pad_token_id, side="right")
        batch["labels"] = pad_batch([row["labels"] for row in rows], IGNORE_INDEX, side="right")["input_ids"]
        if images:
            pixel_inputs = self.renderer.processor.image_processor(images, return_tensors="pt")
            batch["pixel_values"] = pixel_inputs["pixel_values"]
            batch["image_sizes"] = pixel_inputs["image_sizes"]
            expected = sum(
                image_token_count(w, h, self.renderer.image_cell)
                for h, w in pixel_inputs["image_sizes"].tolist()
            )
            markers = torch.tensor(sorted(self.renderer.image_marker_ids))
            found = int(torch.isin(batch["input_ids"], markers).sum())
            if expected != found:
                raise RenderError(
                    f"batch has {found} image tokens ([IMG], [IMG_BREAK], [IMG_END]) but its images need "
                    f"{expected}; re-render the dataset"
                )
        return batch


def pad_batch(sequences: list[list[int]], pad_value: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest sequence; returns input_ids and attention_mask tensors."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if side == "right":
            ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, : len(seq)] = 1
        else:
            ids[i, longest - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[i, longest - len(seq) :] = 1
    return {"input_ids": ids, "attention_mask": mask}
