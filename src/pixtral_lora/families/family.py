"""One model family's facts, as a frozen dataclass (the families are in `pixtral` and `mistral3`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pixtral_lora.errors import UserError


@dataclass(frozen=True)
class Family:
    """One model family's facts: everything the pipeline does differently for it."""

    name: str  # "pixtral" | "mistral3": what `tiny-model --family` takes
    models: str  # the released checkpoints, for messages and the README
    model_type: str  # config.json `model_type`
    architecture: str  # transformers class (loaded through AutoModelForImageTextToText)
    patch_size: int  # vision encoder patch, pixels
    spatial_merge_size: int  # patches merged per side into one image token
    max_image_size: int  # longest edge the vision encoder takes, pixels
    # tekken.json inside mistral_common's package data used when the checkpoint ships none
    # (mistral-community/pixtral-12b does not); None: the checkpoint's own tekken.json is required
    packaged_tekken: str | None
    # Connector linears under `multi_modal_projector` that LoRA may target: the projector
    # (lora.train_projector) and the patch merger (lora.train_patch_merger; none in Pixtral-12B)
    connector_lora_modules: tuple[str, ...]
    merger_lora_modules: tuple[str, ...]
    # HF (current layout) -> Mistral native names of the connector, regex -> replacement
    connector_native_keys: tuple[tuple[str, str], ...]
    # params.json `vision_encoder` fields fixed by the family (the rest come from config.json)
    native_vision_params: dict = field(default_factory=dict)
    # Released shapes a tiny model (`tiny-model --like`) or a benchmark (`bench_gpu.py --model`) copies:
    # name -> (config.json's architecture fields, tekken version to write; None: the packaged tekken).
    # The first is the family's flagship.
    shapes: dict[str, tuple[Callable[[], dict], str | None]] = field(default_factory=dict)
    # The blocks FSDP shards one by one: the text decoder's layer class per text_config `model_type`,
    # and the vision encoder's (every family here has Pixtral's vision tower)
    decoder_layers: dict[str, str] = field(default_factory=lambda: {"mistral": "MistralDecoderLayer"})
    vision_layer: str = "PixtralAttentionLayer"

    def shard_layers(self, config: dict) -> list[str]:
        """The transformers classes FSDP wraps for a checkpoint's config.json (decoder, then vision)."""
        text_type = config.get("text_config", {}).get("model_type", "mistral")
        if text_type not in self.decoder_layers:
            raise UserError(
                f"{self.models}: no FSDP wrapping known for a {text_type!r} text model "
                f"(known: {', '.join(self.decoder_layers)})"
            )
        return [self.decoder_layers[text_type], self.vision_layer]

    def reference_config(self) -> dict:
        """config.json of the family's flagship checkpoint (the first of `shapes`)."""
        return next(iter(self.shapes.values()))[0]()

    @property
    def image_cell(self) -> int:
        """Pixels per image token along each side (patch size times spatial merge)."""
        return self.patch_size * self.spatial_merge_size
