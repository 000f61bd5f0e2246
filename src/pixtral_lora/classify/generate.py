"""Batched prompts on the model's device, and greedy (optionally trie-constrained) answers to them."""

from __future__ import annotations

import abc

import torch

from pixtral_lora.model.render import Renderer, pad_batch, prompt_messages
from pixtral_lora.task.answers import AnswerTrie


class AnswerEngine(abc.ABC):
    """Another engine (vLLM) answering the classify loop's batches in the `modes` it names: it gets
    the rows whose images the loop could read, and those images, already resized as in training."""

    modes: tuple[str, ...] = ("generate",)

    @abc.abstractmethod
    def answers(
        self,
        renderer: Renderer,
        rows: list[dict],
        images: list[list],
        max_new_tokens: int,
        candidates: dict[str, list[int]] | None = None,
    ) -> tuple[list[str], list[float | None]]:
        """Greedy answers of the rows (only the `candidates`' token ids when given: constrained mode),
        and each answer's probability where the engine gives it."""

    def scores(
        self, renderer: Renderer, rows: list[dict], images: list[list], candidates: dict[str, list[int]]
    ) -> list[dict[str, float]]:
        """Score mode: each candidate's log-likelihood (its token ids, `</s>` included) per row."""
        raise NotImplementedError(f"{type(self).__name__} does not score")


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def batch_inputs(
    model, renderer: Renderer, rows: list[dict], loaded_images: list[list] | None = None
) -> dict:
    """Left-padded prompt ids of the rows and their images, on the model's device and dtype."""
    prompts, images = [], []
    if loaded_images is None:
        loaded_images = [renderer.load_images(row["images"]) for row in rows]
    for row, loaded in zip(rows, loaded_images, strict=True):
        prompts.append(renderer.prompt_ids(prompt_messages(row), loaded)[0])
        images.extend(loaded)
    batch = pad_batch(prompts, renderer.pad_token_id, side="left")
    if images:
        pixel_inputs = renderer.processor.image_processor(images, return_tensors="pt")
        batch["pixel_values"] = pixel_inputs["pixel_values"].to(getattr(model, "dtype", torch.float32))
        batch["image_sizes"] = pixel_inputs["image_sizes"]
    device = _device_of(model)
    return {key: value.to(device) for key, value in batch.items()}


def generate_answers(
    model,
    renderer: Renderer,
    rows: list[dict],
    max_new_tokens: int,
    trie: AnswerTrie | None = None,
    loaded_images: list[list] | None = None,
) -> tuple[list[str], list[float]]:
    """Greedy answers for one batch of conversation rows (prompts left-padded), and each answer's
    probability: the product of its tokens' probabilities up to and including </s> (under the
    answer trie's constraint in constrained mode). Not calibrated: no temperature is fit for it."""
    if isinstance(model, AnswerEngine):
        if loaded_images is None:
            loaded_images = [renderer.load_images(row["images"]) for row in rows]
        candidates = trie.sequences if trie is not None else None
        return model.answers(renderer, rows, loaded_images, max_new_tokens, candidates)
    inputs = batch_inputs(model, renderer, rows, loaded_images)
    width = inputs["input_ids"].shape[1]
    eos = renderer.tokenizer.eos_token_id
    kwargs = {}
    if trie is not None:

        def allowed(batch_id, input_ids):
            tokens = trie.allowed(input_ids[width:].tolist())
            return tokens or [eos]

        kwargs["prefix_allowed_tokens_fn"] = allowed
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos,
            pad_token_id=renderer.pad_token_id,
            output_scores=True,
            return_dict_in_generate=True,
            **kwargs,
        )
        generated = output.sequences[:, width:]
        step_log_probs = torch.stack(
            [torch.log_softmax(scores.float(), dim=-1) for scores in output.scores], dim=1
        ).gather(2, generated[:, : len(output.scores), None])[..., 0]
    # count each answer's tokens up to its first </s> (what follows is padding of a finished row)
    ended = torch.cumsum((generated == eos).int(), dim=1)
    counted = (ended - (generated == eos).int()) == 0
    counted = counted[:, : step_log_probs.shape[1]]  # where() and not a product: padding may hold NaN
    probabilities = torch.exp(torch.where(counted, step_log_probs, 0.0).sum(dim=1))
    answers = [renderer.tokenizer.decode(seq, skip_special_tokens=True) for seq in generated]
    return answers, [float(p) if torch.isfinite(p) else None for p in probabilities]
