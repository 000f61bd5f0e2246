"""What differs between Mistral's vision model families, looked up once from a checkpoint's config.json.

Two families share one stack: Pixtral-12B (transformers' `LlavaForConditionalGeneration` with a
Pixtral vision encoder, 16-px patches, one image token per patch) and the Mistral3 family
(`Mistral3ForConditionalGeneration`: Ministral 3, Mistral Small 3.1/3.2, Magistral Small; 14-px
patches merged 2x2, one image token per 28-px cell). Each family is a frozen `Family` in its own
module; `family_of` picks one by the checkpoint's `model_type` and vision encoder, and everything
else (training's LoRA targets, image rounding, the native export) asks the `Family` instead of
testing names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pixtral_lora.errors import UserError
from pixtral_lora.families.family import Family
from pixtral_lora.families.mistral3 import MISTRAL3
from pixtral_lora.families.pixtral import PIXTRAL


class UnknownFamilyError(UserError):
    """A checkpoint whose architecture is not one of the supported Mistral vision families."""


def _families() -> dict[str, Family]:
    return {family.model_type: family for family in (PIXTRAL, MISTRAL3)}


def by_name(name: str) -> Family:
    """The family called `name` ("pixtral", "mistral3")."""
    for family in _families().values():
        if family.name == name:
            return family
    raise UnknownFamilyError(f"unknown model family {name!r}; supported: {supported()}")


def by_shape(name: str) -> Family:
    """The family one of whose released `shapes` is `name` ("pixtral-12b", "ministral-3-8b", ...)."""
    for family in _families().values():
        if name in family.shapes:
            return family
    raise UnknownFamilyError(f"unknown model shape {name!r}; known: {', '.join(shape_names())}")


def shape_names() -> list[str]:
    """Every family's released shapes, flagship first."""
    return [name for family in _families().values() for name in family.shapes]


def supported() -> str:
    """One line naming every supported family and its checkpoints."""
    return "; ".join(f"{f.architecture} ({f.models})" for f in _families().values())


def family_from_config(config: dict, source: str = "config.json") -> Family:
    """The family of a checkpoint's config.json dict; anything else is one `UnknownFamilyError` line."""
    model_type = config.get("model_type")
    family = _families().get(model_type)
    vision = (config.get("vision_config") or {}).get("model_type")
    if family is None or vision != "pixtral":
        architectures = ",".join(config.get("architectures") or []) or "no architectures"
        raise UnknownFamilyError(
            f"{source}: model_type {model_type!r} ({architectures}, vision encoder {vision!r}) is not a "
            f"supported model; supported: {supported()}"
        )
    return family


def config_json(model_name_or_path: str | os.PathLike) -> tuple[dict, str]:
    """config.json of a local checkpoint or hub model (HF cache first), with where it was read."""
    path = Path(model_name_or_path)
    if path.is_dir():
        source = path / "config.json"
    else:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = try_to_load_from_cache(str(model_name_or_path), "config.json")
        try:
            source = Path(
                cached if isinstance(cached, str) else hf_hub_download(str(model_name_or_path), "config.json")
            )
        except Exception as err:  # hub errors come in many types; all mean the same here
            raise UnknownFamilyError(
                f"{model_name_or_path}: its config.json cannot be read from the hub ({type(err).__name__})"
            ) from None
    try:
        return json.loads(source.read_text(encoding="utf-8")), str(source)
    except FileNotFoundError:
        raise UnknownFamilyError(
            f"{model_name_or_path}: no config.json (not a transformers checkpoint)"
        ) from None
    except (ValueError, UnicodeDecodeError) as err:
        raise UnknownFamilyError(f"{source}: not valid JSON ({err})") from None


def family_of(model_name_or_path: str | os.PathLike) -> Family:
    """The family of a checkpoint (local directory or hub id), from its config.json."""
    config, source = config_json(model_name_or_path)
    return family_from_config(config, source)


__all__ = [
    "Family",
    "UnknownFamilyError",
    "by_name",
    "by_shape",
    "config_json",
    "family_from_config",
    "family_of",
    "shape_names",
    "supported",
]
