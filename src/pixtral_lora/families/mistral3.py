"""The Mistral3 family: Ministral 3 (3B/8B/14B), Mistral Small 3.1/3.2 (24B), Magistral Small 1.2.

transformers' `Mistral3ForConditionalGeneration`: the Pixtral vision encoder with 14-px patches and
1540-px images, then an RMSNorm, a learned 2x2 patch merger and a bias-free projector; one image token
per 28-px cell. The tokenizer is a newer tekken (v7 and later, read from the checkpoint's own
tekken.json: the system prompt sits between [SYSTEM_PROMPT] and [/SYSTEM_PROMPT]). Mistral Small's
language model is a Mistral; Ministral 3's is a `ministral3` (YaRN rope, llama-4 attention scaling).
"""

from pixtral_lora.families.family import Family

# The tokenizer version of each released checkpoint, as its tekken.json `config.version` states it
# (model cards / mistral_common's release notes; the code reads the real file, never this table).
TOKENIZER_VERSIONS = {
    "mistralai/Mistral-Small-3.1-24B-Instruct-2503": "v7",
    "mistralai/Mistral-Small-3.2-24B-Instruct-2506": "v11",
    "mistralai/Magistral-Small-2509": "v13",
    "mistralai/Ministral-3-8B-Instruct-2512": "v13",
}


def _vision_config() -> dict:
    return {
        "model_type": "pixtral",
        "hidden_act": "silu",
        "hidden_size": 1024,
        "head_dim": 64,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "num_channels": 3,
        "image_size": 1540,
        "patch_size": 14,
        "rope_theta": 10000.0,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
    }


def _top_level(text_config: dict) -> dict:
    return {
        "architectures": ["Mistral3ForConditionalGeneration"],
        "model_type": "mistral3",
        "image_token_index": 10,
        "multimodal_projector_bias": False,
        "projector_hidden_act": "gelu",
        "spatial_merge_size": 2,
        "vision_feature_layer": -1,
        "tie_word_embeddings": False,
        "text_config": text_config,
        "vision_config": _vision_config(),
    }


def mistral_small_config() -> dict:
    """`config.json` of Mistral-Small-3.1-24B-Instruct-2503 / 3.2-2506 (architecture fields)."""
    return _top_level(
        {
            "model_type": "mistral",
            "attention_dropout": 0.0,
            "head_dim": 128,
            "hidden_act": "silu",
            "hidden_size": 5120,
            "initializer_range": 0.02,
            "intermediate_size": 32768,
            "max_position_embeddings": 131072,
            "num_attention_heads": 32,
            "num_hidden_layers": 40,
            "num_key_value_heads": 8,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1000000000.0,
            "sliding_window": None,
            "vocab_size": 131072,
            "tie_word_embeddings": False,
        }
    )


def ministral3_8b_config() -> dict:
    """`config.json` of Ministral-3-8B-Base-2512 (architecture fields; a `ministral3` language model)."""
    return _top_level(
        {
            "model_type": "ministral3",
            "head_dim": 128,
            "hidden_act": "silu",
            "hidden_size": 4096,
            "initializer_range": 0.02,
            "intermediate_size": 14336,
            "max_position_embeddings": 262144,
            "num_attention_heads": 32,
            "num_hidden_layers": 34,
            "num_key_value_heads": 8,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {
                "type": "yarn",
                "rope_theta": 1000000.0,
                "factor": 16.0,
                "original_max_position_embeddings": 16384,
                "max_position_embeddings": 262144,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale_all_dim": 1.0,
                "mscale": 1.0,
                "llama_4_scaling_beta": 0.1,
            },
            "sliding_window": None,
            "vocab_size": 131072,
            "tie_word_embeddings": False,
        }
    )


MISTRAL3 = Family(
    name="mistral3",
    models="Ministral 3, Mistral Small 3.1/3.2, Magistral Small",
    model_type="mistral3",
    architecture="Mistral3ForConditionalGeneration",
    patch_size=14,
    spatial_merge_size=2,
    max_image_size=1540,
    decoder_layers={"mistral": "MistralDecoderLayer", "ministral3": "Ministral3DecoderLayer"},
    packaged_tekken=None,  # every Mistral3 checkpoint ships its tekken.json (its version is read from it)
    connector_lora_modules=("linear_1", "linear_2"),
    merger_lora_modules=("patch_merger.merging_layer",),
    connector_native_keys=(
        (r"model\.multi_modal_projector\.norm\.weight", "pre_mm_projector_norm.weight"),
        (
            r"model\.multi_modal_projector\.patch_merger\.merging_layer\.weight",
            "patch_merger.merging_layer.weight",
        ),
        (r"model\.multi_modal_projector\.linear_1\.(weight|bias)", r"vision_language_adapter.w_in.\1"),
        (r"model\.multi_modal_projector\.linear_2\.(weight|bias)", r"vision_language_adapter.w_out.\1"),
    ),
    # mistral_inference's VisionEncoderArgs / vLLM's Mistral-format Pixtral loader read these
    native_vision_params={
        "spatial_merge_size": 2,
        "mm_projector_id": "patch_merge",
        "add_pre_mm_projector_layer_norm": True,
    },
    shapes={
        "mistral-small-3.2": (
            mistral_small_config,
            TOKENIZER_VERSIONS["mistralai/Mistral-Small-3.2-24B-Instruct-2506"],
        ),
        "ministral-3-8b": (
            ministral3_8b_config,
            TOKENIZER_VERSIONS["mistralai/Ministral-3-8B-Instruct-2512"],
        ),
    },
)
