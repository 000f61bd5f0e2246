"""The token ids we train on equal mistral_common's `encode_chat_completion`, token for token, for
Pixtral-12B's tokenizer (v3, 16-px tokens) and the Mistral3 family's (v7, v11, v13: [SYSTEM_PROMPT]
control tokens, 28-px tokens)."""

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

from pixtral_lora.model.render import IGNORE_INDEX, Renderer


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


# image sizes in image tokens (columns, rows): times 16 px for Pixtral-12B, 28 px for Mistral3
CASES = {
    "system_and_image": ([SYSTEM, {"role": "user", "content": [IMG]}], [(4, 4)]),
    "no_system": ([{"role": "user", "content": [IMG]}], [(4, 4)]),
    "text_after_image": ([SYSTEM, {"role": "user", "content": [IMG, _text("Which class?")]}], [(3, 5)]),
    "text_before_image": (
        [SYSTEM, {"role": "user", "content": [_text("Which class is this?"), IMG]}],
        [(5, 3)],
    ),
    "wide_image": ([{"role": "user", "content": [_text("Describe."), IMG]}], [(19, 6)]),
    "aid_sized_image": ([SYSTEM, {"role": "user", "content": [IMG]}], [(19, 19)]),
    "two_images": (
        [SYSTEM, {"role": "user", "content": [IMG, _text("and"), IMG, _text("Same class?")]}],
        [(2, 4), (4, 2)],
    ),
    "multi_turn": (
        [
            SYSTEM,
            {"role": "user", "content": [IMG]},
            {"role": "assistant", "content": [_text('```json\n{"label": "Port"}\n```')]},
            {"role": "user", "content": [_text("Are you sure?")]},
        ],
        [(2, 2)],
    ),
}
TOKENIZERS = ["pixtral-v3", "mistral3-v7", "mistral3-v11", "mistral3-v13"]


@pytest.fixture(scope="module", params=TOKENIZERS)
def pair(request, processor, mistral_tokenizer, tiny_mistral3_dir, tmp_path_factory):
    """(our processor, mistral_common's tokenizer, pixels per image token) for one tokenizer version.

    Pixtral's and Mistral3-v11's processors are loaded from the tiny checkpoints as training loads
    them; v7 (Mistral Small 3.1) and v13 (Magistral, Ministral 3) are built from the same vocabulary.
    """
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from pixtral_lora.families import by_name
    from pixtral_lora.model.loading import load_processor
    from pixtral_lora.model.tiny import build_processor, write_tekken

    if request.param == "pixtral-v3":
        return processor, mistral_tokenizer, 16
    version = request.param.split("-")[1]
    if version == "v11":
        ours, tekken = load_processor(tiny_mistral3_dir), tiny_mistral3_dir / "tekken.json"
    else:
        tekken = write_tekken(tmp_path_factory.mktemp(version) / "tekken.json", by_name("mistral3"), version)
        ours = build_processor("mistral3", tekken)
    theirs = MistralTokenizer.from_file(str(tekken))
    assert theirs.instruct_tokenizer.tokenizer.version.value == version
    return ours, theirs, 28


@pytest.mark.parametrize("case", list(CASES))
def test_prompt_ids_match_mistral_common(case, pair):
    processor, mistral_tokenizer, cell = pair
    messages, cells = CASES[case]
    sizes = [(columns * cell, rows * cell) for columns, rows in cells]
    images = [_image(w, h, i) for i, (w, h) in enumerate(sizes)]
    renderer = Renderer(processor, image_longest_edge=None)
    ids, image_inputs = renderer.prompt_ids(messages, images)
    reference = mistral_tokenizer.encode_chat_completion(_reference_request(messages, images))
    assert ids == reference.tokens
    assert len(reference.images) == len(images)
    for ours, theirs, (w, h) in zip(image_inputs["pixel_values"], reference.images, sizes, strict=True):
        assert torch.allclose(ours[:, :h, :w], torch.as_tensor(theirs), atol=1e-5)


def test_training_sample_is_prompt_plus_answer_and_eos(pair):
    processor, mistral_tokenizer, _ = pair
    answer = '```json\n{"label": "DenseResidential"}\n```'
    messages = [SYSTEM, {"role": "user", "content": [IMG]}, {"role": "assistant", "content": [_text(answer)]}]
    image = _image(64, 48, 0)
    sample = Renderer(processor).render(messages, [image])
    prompt = mistral_tokenizer.encode_chat_completion(_reference_request(messages[:-1], [image])).tokens
    completion = mistral_tokenizer.instruct_tokenizer.tokenizer.encode(answer, bos=False, eos=True)
    assert sample["input_ids"] == prompt + completion
    assert sample["labels"] == [IGNORE_INDEX] * len(prompt) + completion
