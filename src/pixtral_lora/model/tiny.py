"""Tiny random-initialised models with the exact architecture and config fields of the real ones.

`build_tiny_model(out, family="pixtral")` writes an HF checkpoint (config, safetensors, processor)
whose config is the real flagship's (Pixtral-12B, or Mistral Small 3.2 for the Mistral3 family) with
only widths and depths shrunk, and whose tokenizer is the real tekken vocabulary: Pixtral-12B's own
file from mistral_common, or for Mistral3 the same vocabulary at the version the real checkpoints
ship (v11), written as their tekken.json is (explicit special tokens, 14-px patches merged 2x2).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pixtral_lora.families import Family, UnknownFamilyError, by_name
from pixtral_lora.model.loading import chat_template, packaged_tekken

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TinySizes:
    """Widths and depths of the tiny model; everything else is the real model's config.

    Head sizes are 32 in both towers: the smallest vLLM's CPU attention kernels take (32, 64, 80, 96,
    112, 128, ...), so the serve check can run the tiny model through vLLM's own engine.
    """

    text_hidden_size: int = 64
    text_intermediate_size: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_head_dim: int = 32
    vision_hidden_size: int = 64
    vision_intermediate_size: int = 128
    vision_layers: int = 2
    vision_heads: int = 2


def model_config(
    family: Family | str = "pixtral", sizes: TinySizes | None = None, config: dict | None = None
):
    """The transformers config of `config` (default: the family's flagship); with `sizes`, shrunk."""
    from transformers import AutoConfig

    family = by_name(family) if isinstance(family, str) else family
    config = json.loads(json.dumps(config or family.reference_config()))
    if sizes is not None:
        config["text_config"].update(
            hidden_size=sizes.text_hidden_size,
            intermediate_size=sizes.text_intermediate_size,
            num_hidden_layers=sizes.text_layers,
            num_attention_heads=sizes.text_heads,
            num_key_value_heads=sizes.text_kv_heads,
            head_dim=sizes.text_head_dim,
        )
        config["vision_config"].update(
            hidden_size=sizes.vision_hidden_size,
            intermediate_size=sizes.vision_intermediate_size,
            num_hidden_layers=sizes.vision_layers,
            num_attention_heads=sizes.vision_heads,
            head_dim=sizes.vision_hidden_size // sizes.vision_heads,
        )
    model_type = config.pop("model_type")
    return AutoConfig.for_model(model_type, **config)


# tekken.json of the Mistral3 checkpoints names its control tokens explicitly (required from v11 on);
# the first twenty are Pixtral's, then tool-call and thinking markers, then <SPECIAL_n> placeholders.
_NAMED_SPECIALS_FROM_V11 = {32: "[ARGS]", 33: "[CALL_ID]"}
_NAMED_SPECIALS_FROM_V13 = {34: "[THINK]", 35: "[/THINK]"}


def write_tekken(out: Path, family: Family, version: str) -> Path:
    """The real tekken vocabulary (mistral_common's Pixtral file) as a `version` tekken.json for `family`."""
    from mistral_common.tokens.tokenizers.base import TokenizerVersion
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    data = json.loads(packaged_tekken("tekken_240911.json").read_text(encoding="utf-8"))
    data["config"] = {**data["config"], "version": version}
    named = {
        int(s["rank"]): str(getattr(s["token_str"], "value", s["token_str"]))
        for s in Tekkenizer.DEPRECATED_SPECIAL_TOKENS
    }
    if TokenizerVersion(version) >= TokenizerVersion.v11:
        named |= _NAMED_SPECIALS_FROM_V11
    if TokenizerVersion(version) >= TokenizerVersion.v13:
        named |= _NAMED_SPECIALS_FROM_V13
    data["special_tokens"] = [
        {"rank": rank, "token_str": named.get(rank, f"<SPECIAL_{rank}>"), "is_control": True}
        for rank in range(data["config"]["default_num_special_tokens"])
    ]
    data["image"] = {
        "image_patch_size": family.patch_size,
        "max_image_size": family.max_image_size,
        "spatial_merge_size": family.spatial_merge_size,
    }
    out.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return out


def build_processor(family: Family | str = "pixtral", tekken: Path | None = None):
    """A `PixtralProcessor` for the family, its tokenizer converted from the tekken file itself."""
    from transformers import PixtralImageProcessor, PixtralProcessor
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    family = by_name(family) if isinstance(family, str) else family
    version = next(iter(family.shapes.values()))[1]  # the flagship's, when no tekken is given
    if tekken is None and version is not None:
        import tempfile

        tekken = write_tekken(Path(tempfile.mkdtemp()) / "tekken.json", family, version)
    tekken = tekken or packaged_tekken(family.packaged_tekken)
    template = chat_template(str(tekken))
    tokenizer = convert_tekken_tokenizer(str(tekken), chat_template=template)
    image_processor = PixtralImageProcessor(
        size={"longest_edge": family.max_image_size},
        patch_size={"height": family.patch_size, "width": family.patch_size},
    )
    return PixtralProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=family.patch_size,
        spatial_merge_size=family.spatial_merge_size,
        chat_template=template,
    )


def build_tiny_model(
    out: str | Path,
    sizes: TinySizes | None = None,
    seed: int = 0,
    family: Family | str = "pixtral",
    like: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a random-initialised tiny model of `family` (config, safetensors, processor[, tekken.json]).

    like: which of the family's released `shapes` to copy (default: its flagship; for Mistral3
    "ministral-3-8b" is a `ministral3` language model with YaRN rope and llama-4 attention scaling).
    """
    from transformers import AutoModelForImageTextToText

    from pixtral_lora.outputs import HF_CHECKPOINT_FILES, atomic_directory

    family = by_name(family) if isinstance(family, str) else family
    like = like or next(iter(family.shapes))
    if like not in family.shapes:
        raise UnknownFamilyError(
            f"--like {like}: not a {family.name} shape; its shapes: {', '.join(family.shapes)}"
        )
    copy, version = family.shapes[like]
    out = Path(out)
    torch.manual_seed(seed)
    sizes = sizes or TinySizes()
    real = copy()
    config = model_config(family, sizes, real)
    model = AutoModelForImageTextToText.from_config(config)
    match_logit_range(model, real["text_config"]["hidden_size"])
    with atomic_directory(out, HF_CHECKPOINT_FILES, overwrite, kind="tiny model") as tmp:
        tekken = write_tekken(tmp / "tekken.json", family, version) if version else None
        model.save_pretrained(tmp, safe_serialization=True)
        build_processor(family, tekken).save_pretrained(tmp)
        (tmp / "tiny_pixtral.json").write_text(
            json.dumps({"family": family.name, "like": like, "seed": seed, "sizes": vars(sizes)})
        )
    logger.info("tiny %s written to %s", family.name, out)
    return out


def match_logit_range(model, real_hidden_size: int) -> None:
    """Give the tiny LM head the logit range of the real shape at the same init scale.

    With hidden size 64 and std 0.02 the largest logit any hidden state can produce is ~1.3 against
    131k near-equal competitors: the tiny model could never put more than ~1e-4 probability on a token
    (loss stuck near 10.5, flat likelihoods for scoring). The 12B model's random logits have a std of
    0.02 * sqrt(5120) = 1.4; scaling the tiny head's std by sqrt(real / tiny hidden) gives it the same.
    """
    text = model.config.text_config
    std = text.initializer_range * (real_hidden_size / text.hidden_size) ** 0.5
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, std)
