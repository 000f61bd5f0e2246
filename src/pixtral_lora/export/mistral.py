"""Export: merge LoRA adapters into Pixtral and write Mistral's native format (what vLLM serves).

transformers only converts native -> HF (its `convert_pixtral_weights_to_hf`); this is the way back:

- names: HF `model.language_model.layers.N.self_attn.q_proj` -> native `layers.N.attention.wq`, etc.
  (both HF layouts are read: `model.language_model.*` and the legacy `language_model.model.*`);
- rotary layout: HF permutes the rows of q and k so that rotary pairs are (i, i + d/2); native keeps
  interleaved pairs (2i, 2i + 1). `unpermute_rotary` inverts transformers' permutation, for the text
  model (query heads and key-value heads) and the vision encoder;
- LoRA: W + (B @ A) * alpha / r, merged in float32 on the HF-layout weight before un-permuting, from
  the full-precision base (never into 4-bit weights);
- `params.json` (text fields plus the `vision_encoder` block) and `tekken.json`.

The base is read tensor by tensor (lazy `safe_open`) and the output written tensor by tensor
(`write_safetensors_streaming`), so memory stays near twice the largest tensor whatever the model
size; the output appears under its name only when complete.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from pixtral_lora.export.checkpoint import ExportError, check_cast, resolve_checkpoint, weight_files
from pixtral_lora.export.lora import check_adapter
from pixtral_lora.export.names import native_name, rotary_heads, unpermute_rotary
from pixtral_lora.export.params import params_json
from pixtral_lora.export.safetensors_stream import write_safetensors_streaming
from pixtral_lora.families import UnknownFamilyError, family_from_config
from pixtral_lora.model.loading import checkpoint_tekken
from pixtral_lora.outputs import MISTRAL_EXPORT_FILES, atomic_directory, write_json

logger = logging.getLogger(__name__)


def _read_tekken(path: Path, what: str):
    """A tekken.json as mistral_common loads it, and its `config.version` and `image` block."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    if not path.is_file():
        raise ExportError(f"{what} {path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        tokenizer = Tekkenizer.from_file(str(path))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ExportError(
            f"{what} {path}: not a tekken tokenizer file ({type(err).__name__}: {err})"
        ) from None
    return tokenizer, {"version": data["config"].get("version"), "image": data.get("image") or {}}


def _check_tekken(checkpoint: Path, config: dict, tekken: Path, given: bool) -> None:
    """The tekken.json shipped with the export must be the checkpoint's tokenizer: its image settings
    those of config.json, its version that of the checkpoint's own tekken.json (when it has one and
    another was given), and its ids those of the HF tokenizer for a probe text."""
    from transformers import AutoTokenizer

    what = "--tekken" if given else "the checkpoint's tekken.json"
    tokenizer, ours = _read_tekken(tekken, what)
    vision = config["vision_config"]
    expected = {
        "image_patch_size": vision["patch_size"],
        "max_image_size": vision["image_size"],
        "spatial_merge_size": config.get("spatial_merge_size", 1),
    }
    found = {"spatial_merge_size": 1} | ours["image"]
    differ = [f"{k} {found.get(k)} (config.json: {v})" for k, v in expected.items() if found.get(k) != v]
    if differ:
        raise ExportError(
            f"{what} {tekken}: its image settings are not {checkpoint}'s: {', '.join(differ)}; give the "
            "checkpoint's own tekken.json as --tekken"
        )
    own = checkpoint_tekken(checkpoint)
    if given and own is not None and own.resolve() != tekken.resolve():
        version = _read_tekken(own, "the checkpoint's tekken.json")[1]["version"]
        if ours["version"] != version:
            raise ExportError(
                f"--tekken {tekken}: tokenizer version {ours['version']}, but {checkpoint} was released with "
                f"{version} ({own}); give the checkpoint's own tekken.json as --tekken"
            )
    if not (checkpoint / "tokenizer.json").is_file():
        return
    probe = 'Satellite scenes: DenseResidential; Port. {"label": "Forest"} 12,345 ünïcödé'
    hf_ids = AutoTokenizer.from_pretrained(str(checkpoint)).encode(probe, add_special_tokens=False)
    if hf_ids != tokenizer.encode(probe, bos=False, eos=False):
        raise ExportError(
            f"{checkpoint}: its tokenizer differs from {tekken}; give the checkpoint's own tekken.json as --tekken"
        )


MISTRAL_KIND = "Mistral-format export"


def export_mistral(
    model: str,
    out: str | Path,
    adapter: str | Path | None = None,
    dtype: str = "bfloat16",
    tekken: str | Path | None = None,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
    force: bool = False,
) -> Path:
    """Write consolidated.safetensors (+ index when sharded), params.json and tekken.json to `out`.

    `out` may replace a previous Mistral-format export only (else `overwrite`); `force` merges an
    adapter into a base other than the one it was trained on (same shapes).
    """
    from pixtral_lora.outputs import check_replaceable

    inputs = {"--model checkpoint": model, "--adapter": adapter, "--tekken": tekken}
    check_replaceable(out, MISTRAL_EXPORT_FILES, overwrite, MISTRAL_KIND, inputs)
    checkpoint = resolve_checkpoint(model)
    config = json.loads((checkpoint / "config.json").read_text())
    if config.get("quantization_config"):
        raise ExportError(
            f"{checkpoint}: quantized checkpoint; export from the bf16/fp32 base (an FP8 one: "
            "`pixtral-lora dequantize` writes it)"
        )
    try:
        family = family_from_config(config, str(checkpoint / "config.json"))
    except UnknownFamilyError as err:
        raise ExportError(str(err)) from None
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
    deltas = check_adapter(checkpoint, model, adapter, force) if adapter else None
    tekken_source = Path(tekken) if tekken else checkpoint_tekken(checkpoint)
    if tekken_source is None:
        raise ExportError(
            f"{checkpoint}: no tekken.json; a {family.models} checkpoint ships one: give it as --tekken"
        )
    _check_tekken(checkpoint, config, tekken_source, given=tekken is not None)

    # Plan: every output tensor's name, source and shape, from the safetensors headers alone.
    plan: list[tuple[str, Path, str, list[int]]] = []
    for file in weight_files(checkpoint):
        with safe_open(file, framework="pt") as handle:
            plan += [
                (native_name(key, family), file, key, handle.get_slice(key).get_shape())
                for key in handle.keys()
            ]
    if "output.weight" not in {entry[0] for entry in plan}:
        # tied embeddings (Ministral-3-3B): the native format has its own output matrix, the same values
        plan += [("output.weight", *entry[1:]) for entry in plan if entry[0] == "tok_embeddings.weight"]
    plan.sort()
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    shards: list[list[tuple[str, Path, str, list[int]]]] = [[]]
    shard_bytes = 0
    for entry in plan:
        size = math.prod(entry[3]) * itemsize
        if max_shard_bytes and shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(entry)
        shard_bytes += size

    def produce(target: str, file: Path, key: str) -> torch.Tensor:
        with safe_open(file, framework="pt") as handle:  # opened per tensor: no mapping outlives its tensor
            tensor = handle.get_tensor(key)
        delta = deltas.delta(key) if deltas else None
        if delta is not None:
            if delta.shape != tensor.shape:
                raise ExportError(
                    f"adapter delta for {key} has shape {tuple(delta.shape)}, weight {tuple(tensor.shape)}"
                )
            tensor = tensor.float() + delta
        tensor = tensor.to(torch_dtype)
        check_cast(key, tensor, dtype)
        heads = rotary_heads(target, config)
        return unpermute_rotary(tensor, heads) if heads is not None else tensor

    total_bytes = sum(math.prod(entry[3]) * itemsize for entry in plan)
    with (
        atomic_directory(out, MISTRAL_EXPORT_FILES, overwrite, total_bytes, MISTRAL_KIND, inputs) as tmp,
        tqdm(total=len(plan), desc="converting", unit="tensor") as progress,
    ):
        names = (
            ["consolidated.safetensors"]
            if len(shards) == 1
            else [f"consolidated-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        )
        for name, shard in zip(names, shards, strict=True):
            write_safetensors_streaming(
                tmp / name,
                [(e[0], e[3]) for e in shard],
                torch_dtype,
                lambda target, by_target={e[0]: e for e in shard}: produce(*by_target[target][:3]),
                progress.update,
            )
        if deltas and deltas.unused:
            raise ExportError(f"adapter weights match no base weight: {sorted(deltas.unused)[:3]}")
        if len(shards) > 1:
            weight_map = {
                entry[0]: name for name, shard in zip(names, shards, strict=True) for entry in shard
            }
            write_json(
                tmp / "consolidated.safetensors.index.json",
                {"metadata": {"total_size": total_bytes}, "weight_map": weight_map},
            )
        write_json(tmp / "params.json", params_json(config, family, checkpoint / "config.json"))
        shutil.copyfile(tekken_source, tmp / "tekken.json")
    logger.info("Mistral-format checkpoint written to %s", out)
    return Path(out)
