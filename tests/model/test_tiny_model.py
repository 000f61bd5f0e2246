import json

import pytest
import torch
from conftest import one_line_error

from pixtral_lora.families import by_name
from pixtral_lora.model.loading import (
    IMAGE_BREAK_TOKEN_ID,
    IMAGE_END_TOKEN_ID,
    IMAGE_TOKEN_ID,
    load_model,
    load_processor,
)
from pixtral_lora.model.render import Renderer

SIZE_FIELDS = {
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
}


@pytest.fixture(params=["pixtral", "mistral3"])
def family_model(request, tiny_model_dir, tiny_mistral3_dir):
    """(family, tiny checkpoint) for both families."""
    return by_name(request.param), {"pixtral": tiny_model_dir, "mistral3": tiny_mistral3_dir}[request.param]


def test_tiny_config_has_every_field_of_the_real_config(family_model):
    family, model_dir = family_model
    saved = json.loads((model_dir / "config.json").read_text())
    real = family.reference_config()  # Pixtral-12B's, or Mistral Small 3.2's
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
    assert saved["text_config"]["hidden_size"] < real["text_config"]["hidden_size"]  # but small
    assert saved["vision_config"]["patch_size"] == family.patch_size


def test_processor_uses_the_real_image_tokens_and_cell(family_model):
    family, model_dir = family_model
    processor = load_processor(model_dir)
    tokenizer = processor.tokenizer
    assert len(tokenizer) == 131072
    assert [processor.image_token_id, processor.image_break_token_id, processor.image_end_token_id] == [
        IMAGE_TOKEN_ID,
        IMAGE_BREAK_TOKEN_ID,
        IMAGE_END_TOKEN_ID,
    ]
    assert tokenizer.convert_ids_to_tokens([1, 2, 3, 4, 11]) == ["<s>", "</s>", "[INST]", "[/INST]", "<pad>"]
    assert Renderer(processor).image_cell == family.image_cell == {"pixtral": 16, "mistral3": 28}[family.name]
    if family.name == "mistral3":  # v7+: the system prompt has its own control tokens
        assert tokenizer.convert_ids_to_tokens([17, 18]) == ["[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
        assert json.loads((model_dir / "tekken.json").read_text())["config"]["version"] == "v11"


def test_tiny_model_runs_forward_and_loss(family_model, aid_dir):
    from pixtral_lora.data.loaders import load_aid_folder, to_conversations
    from pixtral_lora.model.render import TrainingCollator, render_dataset
    from pixtral_lora.task.prompt import PromptConfig

    family, model_dir = family_model
    model = load_model(model_dir, quantization=None, device="cpu")
    assert type(model).__name__ == family.architecture
    dataset = load_aid_folder(aid_dir).select(range(2))
    conversations = to_conversations(dataset, PromptConfig(), ["Beach", "Desert", "Forest", "Port"])
    renderer = Renderer(load_processor(model_dir), 64)
    batch = TrainingCollator(renderer)(list(render_dataset(renderer, conversations)))
    cells = round(64 / family.image_cell)  # 64 px: 4x4 Pixtral tokens, 2x2 Mistral3 tokens
    image_tokens = int(torch.isin(batch["input_ids"][0], torch.tensor([10, 12, 13])).sum())
    assert image_tokens == cells * (cells + 1)
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape and out.logits.shape[-1] == 131072
    # an untrained model is near chance: log(131072) = 11.8, plus sigma^2/2 = 1.0 for logits of std 1.4
    assert torch.isfinite(out.loss) and 11.0 < out.loss.item() < 14.0


def test_an_unsupported_architecture_is_one_line_naming_the_supported_ones(tiny_model_dir, aid_dir, tmp_path):
    import shutil

    foreign = tmp_path / "qwen"
    shutil.copytree(tiny_model_dir, foreign)
    config = json.loads((foreign / "config.json").read_text())
    config.update(model_type="qwen2_vl", architectures=["Qwen2VLForConditionalGeneration"])
    (foreign / "config.json").write_text(json.dumps(config))
    from conftest import ROOT, run_command, set_args

    result = run_command(
        ROOT / "train.py",
        ROOT / "configs" / "tiny.yaml",
        *set_args(
            f"model.name_or_path={foreign}", f"data.path={aid_dir}", f"training.output_dir={tmp_path / 'run'}"
        ),
    )
    line = one_line_error(result)
    assert "qwen2_vl" in line and "Qwen2VLForConditionalGeneration" in line
    assert "Mistral3ForConditionalGeneration" in line and "LlavaForConditionalGeneration" in line


@pytest.mark.slow  # trains a model
def test_a_ministral3_language_model_is_the_same_family_and_trains_with_lora(tmp_path, aid_dir):
    """Ministral 3's config (a `ministral3` language model: YaRN rope, llama-4 attention scaling) shrunk:
    the Mistral3 family, LoRA on the same modules, a finite loss through the same renderer."""
    from conftest import ROOT
    from peft import get_peft_model
    from transformers import AutoModelForImageTextToText

    from pixtral_lora.config.yaml_loading import load_config
    from pixtral_lora.data.loaders import load_aid_folder, to_conversations
    from pixtral_lora.families import family_from_config
    from pixtral_lora.families.mistral3 import ministral3_8b_config
    from pixtral_lora.model.render import TrainingCollator, render_dataset
    from pixtral_lora.model.tiny import TinySizes, build_processor, model_config
    from pixtral_lora.task.prompt import PromptConfig
    from pixtral_lora.training.recipe import peft_config

    family = family_from_config(ministral3_8b_config())
    assert family.name == "mistral3"
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(model_config(family, TinySizes(), ministral3_8b_config()))
    assert type(model.model.language_model).__name__ == "Ministral3Model"
    config = load_config(
        ROOT / "configs" / "tiny.yaml", ["lora.train_projector=true", "lora.train_patch_merger=true"]
    )
    model = get_peft_model(model, peft_config(config, family))
    targets = {
        name.rsplit(".", 1)[-1]
        for name, _ in model.named_modules()
        if name.endswith(("merging_layer", "q_proj"))
    }
    assert targets == {"merging_layer", "q_proj"}
    renderer = Renderer(build_processor(family), 64)
    conversations = to_conversations(
        load_aid_folder(aid_dir).select(range(2)), PromptConfig(), ["Beach", "Desert", "Forest", "Port"]
    )
    batch = TrainingCollator(renderer)(list(render_dataset(renderer, conversations)))
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in model.named_parameters()
        if "merging_layer.lora_B" in n
    )


def test_patch_merger_lora_on_pixtral_is_one_line(tiny_model_dir, aid_dir, tmp_path):
    from conftest import ROOT, run_command, set_args

    result = run_command(ROOT / "train.py", ROOT / "configs" / "tiny.yaml", *set_args(
        f"model.name_or_path={tiny_model_dir}", f"data.path={aid_dir}", f"training.output_dir={tmp_path / 'run'}",
        "lora.train_patch_merger=true"))  # fmt: skip
    assert "Pixtral-12B has no patch merger" in one_line_error(result)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # two commands as subprocesses
def test_an_image_edge_past_the_models_largest_is_one_line(tiny_model_dir, aid_dir, tmp_path):
    """Pixtral-12B takes at most 1024 px (Mistral3 1540): train.py refuses more before anything is
    created, and every other command through the renderer (here `data preview`)."""
    from conftest import ROOT, run_cli, run_command, set_args

    result = run_command(ROOT / "train.py", ROOT / "configs" / "tiny.yaml", *set_args(
        f"model.name_or_path={tiny_model_dir}", f"data.path={aid_dir}", f"training.output_dir={tmp_path / 'run'}",
        "data.image_longest_edge=1100"))  # fmt: skip
    assert "Pixtral-12B take at most 1024 px" in one_line_error(result)
    assert not (tmp_path / "run").exists()
    preview = run_cli("data", "preview", aid_dir, "--processor", tiny_model_dir, "--image-longest-edge", 1100)
    assert "takes at most 1024 px" in one_line_error(preview)


def test_like_names_a_shape_of_the_family(tmp_path):
    from pixtral_lora.families import UnknownFamilyError
    from pixtral_lora.model.tiny import build_tiny_model

    with pytest.raises(UnknownFamilyError, match="not a pixtral shape; its shapes: pixtral-12b"):
        build_tiny_model(tmp_path / "m", family="pixtral", like="ministral-3-8b")
    assert not (tmp_path / "m").exists()
