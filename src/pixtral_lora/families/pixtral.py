"""Pixtral-12B: Llava with a Pixtral vision encoder, 16-px patches, one image token per patch."""

from pixtral_lora.families.family import Family

# The default checkpoint: Pixtral-12B in transformers' layout (the Llava conversion of Mistral's release).
PIXTRAL_12B = "mistral-community/pixtral-12b"


def pixtral_12b_config() -> dict:
    """`config.json` of `mistral-community/pixtral-12b` (the fields that define the architecture)."""
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": 10,
        "image_seq_length": 1,
        "ignore_index": -100,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "mistral",
            "hidden_act": "silu",
            "hidden_size": 5120,
            "head_dim": 128,
            "intermediate_size": 14336,
            "max_position_embeddings": 1024000,
            "num_attention_heads": 32,
            "num_hidden_layers": 40,
            "num_key_value_heads": 8,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1000000000.0,
            "sliding_window": None,
            "vocab_size": 131072,
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "pixtral",
            "hidden_act": "silu",
            "hidden_size": 1024,
            "head_dim": 64,
            "intermediate_size": 4096,
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "num_channels": 3,
            "image_size": 1024,
            "patch_size": 16,
            "rope_theta": 10000.0,
        },
    }


PIXTRAL = Family(
    name="pixtral",
    models="Pixtral-12B",
    model_type="llava",
    architecture="LlavaForConditionalGeneration",
    patch_size=16,
    spatial_merge_size=1,
    max_image_size=1024,
    packaged_tekken="tekken_240911.json",  # Pixtral-12B's tokenizer (v3), shipped inside mistral_common
    connector_lora_modules=("linear_1", "linear_2"),
    merger_lora_modules=(),
    connector_native_keys=(
        (r"model\.multi_modal_projector\.linear_1\.(weight|bias)", r"vision_language_adapter.w_in.\1"),
        (r"model\.multi_modal_projector\.linear_2\.(weight|bias)", r"vision_language_adapter.w_out.\1"),
    ),
    shapes={"pixtral-12b": (pixtral_12b_config, None)},
)
