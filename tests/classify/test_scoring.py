"""Batched score mode equals scoring every candidate answer with its own full forward pass."""

import pytest
import torch
from conftest import SYNTH_CLASSES

from pixtral_lora.classify import score as scoring
from pixtral_lora.classify.generate import batch_inputs
from pixtral_lora.classify.score import score_batch, score_positions
from pixtral_lora.data.loaders import AID_CLASS_NAMES, load_aid_folder, to_conversations
from pixtral_lora.model.render import Renderer, prompt_messages
from pixtral_lora.run.reader import load_eval_model
from pixtral_lora.task.answers import answer_token_ids
from pixtral_lora.task.prompt import PromptConfig


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
    batched = score_batch(model, batch_inputs(model, renderer, rows, images), candidates)
    for row, row_images, scores in zip(rows, images, batched, strict=True):
        reference = _full_forward_scores(model, renderer, row, row_images, candidates)
        assert scores.keys() == reference.keys()
        for name in class_names:
            assert scores[name] == pytest.approx(reference[name], abs=1e-4), name


def test_score_positions_counts_what_score_batch_projects(tiny_model_dir, processor, aid_dir, monkeypatch):
    """The benchmark's cost model of score mode is the implementation's: prefix + 1 positions from the
    prompt forward, then one LM-head row per packed candidate token."""
    model = load_eval_model(str(tiny_model_dir))
    renderer = Renderer(processor, 64)
    rows = list(
        to_conversations(load_aid_folder(aid_dir).select([0, 13]), PromptConfig(), AID_CLASS_NAMES, False)
    )
    images = [renderer.load_images(row["images"]) for row in rows]
    candidates = answer_token_ids(renderer.tokenizer, PromptConfig(), AID_CLASS_NAMES)
    kept, head_rows = [], []
    forward = type(model).forward

    def counting_forward(self, *args, **kwargs):
        kept.append(kwargs.get("logits_to_keep"))
        return forward(self, *args, **kwargs)

    head = scoring._head_log_probs

    def counting_head(model, hidden, targets):
        head_rows.append(hidden.shape[0])
        return head(model, hidden, targets)

    monkeypatch.setattr(type(model), "forward", counting_forward)
    monkeypatch.setattr(scoring, "_head_log_probs", counting_head)
    score_batch(model, batch_inputs(model, renderer, rows, images), candidates)
    counted = score_positions(candidates)
    assert kept[0] == counted["shared_prefix"] + 1
    assert head_rows == [len(rows) * counted["packed"]]
    assert counted["score"] == kept[0] + counted["packed"]
    lengths = [len(tokens) for tokens in candidates.values()]
    assert counted["generate_mean"] == sum(lengths) / len(lengths)
    assert counted["packed_distinct_contexts"] <= counted["packed"]
