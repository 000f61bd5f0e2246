"""The token ids we train on equal mistral_common's `encode_chat_completion`, token for token."""

import numpy as np
import pytest
import torch
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    ImageChunk,
    SystemMessage,
    TextChunk,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from PIL import Image

from pixtral_lora.render import IGNORE_INDEX, Renderer


def _image(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _reference_request(messages, images):
    """The same conversation in mistral_common's types."""
    images = iter(images)
    out = []
    for message in messages:
        chunks = [
            ImageChunk(image=next(images)) if c["type"] == "image" else TextChunk(text=c["text"])
            for c in message["content"]
        ]
        if message["role"] == "system":
            out.append(SystemMessage(content=chunks[0].text))
        elif message["role"] == "user":
            out.append(UserMessage(content=chunks))
        else:
            out.append(AssistantMessage(content=chunks[0].text))
    return ChatCompletionRequest(messages=out)


SYSTEM = {
    "role": "system",
    "content": [{"type": "text", "text": "Classify the image: Forest; Port; DenseResidential."}],
}
IMG = {"type": "image"}


def _text(t):
    return {"type": "text", "text": t}


CASES = {
    "system_and_image": ([SYSTEM, {"role": "user", "content": [IMG]}], [(64, 64)]),
    "no_system": ([{"role": "user", "content": [IMG]}], [(64, 64)]),
    "text_after_image": ([SYSTEM, {"role": "user", "content": [IMG, _text("Which class?")]}], [(48, 80)]),
    "text_before_image": (
        [SYSTEM, {"role": "user", "content": [_text("Which class is this?"), IMG]}],
        [(80, 48)],
    ),
    "wide_image": ([{"role": "user", "content": [_text("Describe."), IMG]}], [(304, 96)]),
    "aid_sized_image": ([SYSTEM, {"role": "user", "content": [IMG]}], [(304, 304)]),
    "two_images": (
        [SYSTEM, {"role": "user", "content": [IMG, _text("and"), IMG, _text("Same class?")]}],
        [(32, 64), (64, 32)],
    ),
    "multi_turn": (
        [
            SYSTEM,
            {"role": "user", "content": [IMG]},
            {"role": "assistant", "content": [_text('```json\n{"label": "Port"}\n```')]},
            {"role": "user", "content": [_text("Are you sure?")]},
        ],
        [(32, 32)],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prompt_ids_match_mistral_common(case, processor, mistral_tokenizer):
    messages, sizes = CASES[case]
    images = [_image(w, h, i) for i, (w, h) in enumerate(sizes)]
    renderer = Renderer(processor, image_longest_edge=None)
    ids, image_inputs = renderer.prompt_ids(messages, images)
    reference = mistral_tokenizer.encode_chat_completion(_reference_request(messages, images))
    assert ids == reference.tokens
    assert len(reference.images) == len(images)
    for ours, theirs, (w, h) in zip(image_inputs["pixel_values"], reference.images, sizes, strict=True):
        assert torch.allclose(ours[:, :h, :w], torch.as_tensor(theirs), atol=1e-5)


def test_training_sample_is_prompt_plus_answer_and_eos(processor, mistral_tokenizer):
    answer = '```json\n{"label": "DenseResidential"}\n```'
    messages = [SYSTEM, {"role": "user", "content": [IMG]}, {"role": "assistant", "content": [_text(answer)]}]
    image = _image(64, 48, 0)
    sample = Renderer(processor).render(messages, [image])
    prompt = mistral_tokenizer.encode_chat_completion(_reference_request(messages[:-1], [image])).tokens
    completion = mistral_tokenizer.instruct_tokenizer.tokenizer.encode(answer, bos=False, eos=True)
    assert sample["input_ids"] == prompt + completion
    assert sample["labels"] == [IGNORE_INDEX] * len(prompt) + completion
