import json

import torch

from pixtral_lora.modeling import (
    IMAGE_BREAK_TOKEN_ID,
    IMAGE_END_TOKEN_ID,
    IMAGE_TOKEN_ID,
    load_model,
    pixtral_12b_config_dict,
)
from pixtral_lora.render import Renderer

SIZE_FIELDS = {
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
}


def test_tiny_config_has_every_pixtral_12b_field(tiny_model_dir):
    saved = json.loads((tiny_model_dir / "config.json").read_text())
    real = pixtral_12b_config_dict()
    for key, value in real.items():
        if key in ("text_config", "vision_config"):
            continue
        assert saved[key] == value, key
    for section in ("text_config", "vision_config"):
        for key, value in real[section].items():
            if key in SIZE_FIELDS:
                continue
            if key == "rope_theta":  # transformers 5 nests it under rope_parameters
                assert saved[section]["rope_parameters"]["rope_theta"] == value
            else:
                assert saved[section][key] == value, (section, key)
    assert saved["text_config"]["vocab_size"] == 131072
    assert saved["text_config"]["hidden_size"] < 5120  # but small


def test_processor_uses_pixtral_12b_tokens(processor):
    tokenizer = processor.tokenizer
    assert len(tokenizer) == 131072
    assert [processor.image_token_id, processor.image_break_token_id, processor.image_end_token_id] == [
        IMAGE_TOKEN_ID,
        IMAGE_BREAK_TOKEN_ID,
        IMAGE_END_TOKEN_ID,
    ]
    assert tokenizer.convert_ids_to_tokens([1, 2, 3, 4, 11]) == ["<s>", "</s>", "[INST]", "[/INST]", "<pad>"]


def test_tiny_model_runs_forward_and_loss(tiny_model_dir, processor, aid_dir):
    from pixtral_lora.data.loaders import load_aid_folder, to_conversations
    from pixtral_lora.prompt import PromptConfig
    from pixtral_lora.render import TrainingCollator, render_dataset

    model = load_model(tiny_model_dir, quantization=None, device="cpu")
    dataset = load_aid_folder(aid_dir).select(range(2))
    conversations = to_conversations(dataset, PromptConfig(), ["Beach", "Desert", "Forest", "Port"])
    renderer = Renderer(processor, 64)
    batch = TrainingCollator(renderer)(list(render_dataset(renderer, conversations)))
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape and out.logits.shape[-1] == 131072
    # an untrained model is near chance: log(131072) = 11.8, plus sigma^2/2 = 1.0 for logits of std 1.4
    assert torch.isfinite(out.loss) and 11.0 < out.loss.item() < 14.0
