"""Batched score mode equals scoring every candidate answer with its own full forward pass."""

import pytest
import torch
from conftest import SYNTH_CLASSES

from pixtral_lora.data.loaders import AID_CLASS_NAMES, load_aid_folder, to_conversations
from pixtral_lora.evaluation.evaluate import _batch_inputs, answer_token_ids, load_eval_model
from pixtral_lora.evaluation.scoring import score_batch
from pixtral_lora.prompt import PromptConfig
from pixtral_lora.render import Renderer, prompt_messages


def _full_forward_scores(model, renderer, row, images, candidates):
    """Reference: prompt + candidate in one unbatched forward, summing the candidate tokens' log-probs."""
    prompt, image_inputs = renderer.prompt_ids(prompt_messages(row), images)
    scores = {}
    for name, tokens in candidates.items():
        ids = torch.tensor([prompt + tokens])
        with torch.inference_mode():
            logits = model(input_ids=ids, **image_inputs).logits[0].float()
        log_probs = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
        scores[name] = float(log_probs[torch.arange(len(tokens)), torch.tensor(tokens)].sum())
    return scores


@pytest.mark.parametrize("class_names", [SYNTH_CLASSES, AID_CLASS_NAMES], ids=["4 classes", "30 AID classes"])
def test_batched_scores_equal_full_forward_scores(tiny_model_dir, processor, aid_dir, class_names):
    model = load_eval_model(str(tiny_model_dir))
    renderer = Renderer(processor, 64)
    rows = list(
        to_conversations(load_aid_folder(aid_dir).select([0, 13, 27]), PromptConfig(), class_names, False)
    )
    images = [renderer.load_images(row["images"]) for row in rows]
    images[1] = [images[1][0].resize((48, 32))]  # another size: another prompt length, so left padding
    candidates = answer_token_ids(renderer.tokenizer, PromptConfig(), class_names)
    batched = score_batch(model, _batch_inputs(model, renderer, rows, images), candidates)
    for row, row_images, scores in zip(rows, images, batched, strict=True):
        reference = _full_forward_scores(model, renderer, row, row_images, candidates)
        assert scores.keys() == reference.keys()
        for name in class_names:
            assert scores[name] == pytest.approx(reference[name], abs=1e-4), name
