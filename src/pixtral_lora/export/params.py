"""Mistral's params.json for an HF config: the text fields, rope, and the vision_encoder block."""

from __future__ import annotations

import math
from pathlib import Path

from pixtral_lora.export.checkpoint import ExportError
from pixtral_lora.families import Family
from pixtral_lora.families.pixtral import PIXTRAL
from pixtral_lora.model.loading import IMAGE_BREAK_TOKEN_ID, IMAGE_END_TOKEN_ID


def params_json(config: dict, family: Family = PIXTRAL, source: Path = Path("config.json")) -> dict:
    """Mistral's params.json for an HF config of `family` (text fields + the vision_encoder block)."""
    text, vision = config["text_config"], config["vision_config"]
    rope = _native_rope(text, source)
    rope_vision = (vision.get("rope_parameters") or {}).get("rope_theta", vision.get("rope_theta"))
    params = {
        "dim": text["hidden_size"],
        "n_layers": text["num_hidden_layers"],
        "head_dim": text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
        "hidden_dim": text["intermediate_size"],
        "n_heads": text["num_attention_heads"],
        "n_kv_heads": text["num_key_value_heads"],
        "rope_theta": rope.pop("rope_theta"),
        "norm_eps": text["rms_norm_eps"],
        "vocab_size": text["vocab_size"],
        # vLLM reads the context length from here (without it, it logs a traceback and guesses)
        "max_position_embeddings": text.get("max_position_embeddings"),
        "vision_encoder": {
            "hidden_size": vision["hidden_size"],
            "num_channels": vision["num_channels"],
            "image_size": vision["image_size"],
            "patch_size": vision["patch_size"],
            "rope_theta": rope_vision,
            "intermediate_size": vision["intermediate_size"],
            "num_hidden_layers": vision["num_hidden_layers"],
            "num_attention_heads": vision["num_attention_heads"],
            "image_token_id": config["image_token_index"],
            "image_break_token_id": IMAGE_BREAK_TOKEN_ID,
            "image_end_token_id": IMAGE_END_TOKEN_ID,
            "adapter_bias": config.get("multimodal_projector_bias", True),
        },
    }
    params["vision_encoder"].update(family.native_vision_params)  # Mistral3: norm, merger, no bias
    params.update(rope)  # Ministral 3: yarn, llama_4_scaling
    if text.get("sliding_window"):
        params["sliding_window"] = text["sliding_window"]
    return params


def _native_rope(text: dict, source: Path) -> dict:
    """params.json's rope fields for the language model: `rope_theta`, and for Ministral 3 (YaRN rope,
    llama-4 attention scaling) the `yarn` and `llama_4_scaling` blocks vLLM's Mistral-format loader reads.

    YaRN's attention factor is taken from transformers' own rope code, so the native `apply_scale` says
    exactly what the HF model does; anything the native format cannot express is an ExportError.
    """
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    fields = {"rope_theta": rope.get("rope_theta", text.get("rope_theta"))}
    if kind == "yarn":
        from transformers import AutoConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        text_config = AutoConfig.for_model(**{"model_type": text["model_type"], **text})
        attention_factor = ROPE_INIT_FUNCTIONS["yarn"](text_config, "cpu")[1]
        default_factor = 0.1 * math.log(rope["factor"]) + 1.0 if rope["factor"] > 1 else 1.0
        if not (math.isclose(attention_factor, 1.0) or math.isclose(attention_factor, default_factor)):
            raise ExportError(f"{source}: YaRN attention factor {attention_factor} has no native form")
        fields["yarn"] = {
            "factor": rope["factor"],
            "original_max_position_embeddings": rope["original_max_position_embeddings"],
            "beta": rope.get("beta_fast", 32.0),
            "alpha": rope.get("beta_slow", 1.0),
            "apply_scale": not math.isclose(attention_factor, 1.0),
        }
    elif kind != "default":
        raise ExportError(f"{source}: {kind} rope has no native form here; use --format hf")
    if rope.get("llama_4_scaling_beta") is not None:
        fields["llama_4_scaling"] = {
            "original_max_position_embeddings": rope["original_max_position_embeddings"],
            "beta": rope["llama_4_scaling_beta"],
        }
    return fields
