"""HF weight names -> Mistral native names, and the rotary layout between them.

Both HF layouts are read (`model.language_model.*` and the legacy `language_model.model.*`); HF
permutes the rows of q and k so that rotary pairs are (i, i + d/2), native keeps interleaved pairs
(2i, 2i + 1): `unpermute_rotary` inverts transformers' permutation.
"""

from __future__ import annotations

import re

import torch

from pixtral_lora.export.checkpoint import ExportError
from pixtral_lora.families import Family
from pixtral_lora.families.pixtral import PIXTRAL

# Legacy HF layout (what transformers 4.x wrote, and 5.x still writes to disk) -> current layout.
_LEGACY_TO_CURRENT = [
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^vision_tower\."), "model.vision_tower."),
    (re.compile(r"^multi_modal_projector\."), "model.multi_modal_projector."),
]

# Current HF layout -> Mistral native names.
_HF_TO_NATIVE = [
    (r"model\.language_model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"model\.language_model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (
        r"model\.language_model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight",
        r"layers.\1.attention.w\2.weight",
    ),
    (r"model\.language_model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"layers.\1.feed_forward.w1.weight"),
    (r"model\.language_model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"layers.\1.feed_forward.w2.weight"),
    (r"model\.language_model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"layers.\1.feed_forward.w3.weight"),
    (r"model\.language_model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attention_norm.weight"),
    (r"model\.language_model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ffn_norm.weight"),
    (r"model\.vision_tower\.patch_conv\.weight", "vision_encoder.patch_conv.weight"),
    (r"model\.vision_tower\.ln_pre\.weight", "vision_encoder.ln_pre.weight"),
    (
        r"model\.vision_tower\.transformer\.layers\.(\d+)\.attention\.([qkvo])_proj\.weight",
        r"vision_encoder.transformer.layers.\1.attention.w\2.weight",
    ),
    (
        r"model\.vision_tower\.transformer\.layers\.(\d+)\.feed_forward\.gate_proj\.weight",
        r"vision_encoder.transformer.layers.\1.feed_forward.w1.weight",
    ),
    (
        r"model\.vision_tower\.transformer\.layers\.(\d+)\.feed_forward\.down_proj\.weight",
        r"vision_encoder.transformer.layers.\1.feed_forward.w2.weight",
    ),
    (
        r"model\.vision_tower\.transformer\.layers\.(\d+)\.feed_forward\.up_proj\.weight",
        r"vision_encoder.transformer.layers.\1.feed_forward.w3.weight",
    ),
    (
        r"model\.vision_tower\.transformer\.layers\.(\d+)\.(attention_norm|ffn_norm)\.weight",
        r"vision_encoder.transformer.layers.\1.\2.weight",
    ),
]  # the connector (projector, Mistral3's norm and patch merger) comes from the family


def _native_table(family: Family) -> list[tuple[re.Pattern, str]]:
    return [
        (re.compile(f"^{pattern}$"), target)
        for pattern, target in (*_HF_TO_NATIVE, *family.connector_native_keys)
    ]


def current_hf_name(name: str) -> str:
    """Normalise a legacy HF key (`language_model.model.*`, ...) to the current layout."""
    for pattern, replacement in _LEGACY_TO_CURRENT:
        if pattern.match(name):
            return pattern.sub(replacement, name, count=1)
    return name


def native_name(hf_name: str, family: Family = PIXTRAL) -> str:
    """Mistral native key of an HF key of `family` (either layout); unknown keys are an error."""
    name = current_hf_name(hf_name)
    for pattern, target in _native_table(family):
        if pattern.match(name):
            return pattern.sub(target, name)
    raise ExportError(f"no native name for HF weight {hf_name!r}: not a {family.models} checkpoint?")


def unpermute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Invert transformers' q/k row permutation for rotary embeddings (per head: halves -> interleaved)."""
    rows, columns = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, 2, head_dim // 2, columns).transpose(1, 2).reshape(rows, columns)


def rotary_heads(native: str, config: dict) -> int | None:
    text, vision = config["text_config"], config["vision_config"]
    if re.fullmatch(r"layers\.\d+\.attention\.wq\.weight", native):
        return text["num_attention_heads"]
    if re.fullmatch(r"layers\.\d+\.attention\.wk\.weight", native):
        return text["num_key_value_heads"]
    if re.fullmatch(r"vision_encoder\.transformer\.layers\.\d+\.attention\.w[qk]\.weight", native):
        return vision["num_attention_heads"]
    return None
