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
import re
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from pixtral_lora.errors import UserError
from pixtral_lora.families import Family, UnknownFamilyError, family_from_config
from pixtral_lora.families.pixtral import PIXTRAL
from pixtral_lora.model.loading import (
    IMAGE_BREAK_TOKEN_ID,
    IMAGE_END_TOKEN_ID,
    ModelSourceError,
    check_model_source,
    checkpoint_fingerprint,
    checkpoint_tekken,
    read_adapter_config,
)
from pixtral_lora.outputs import (
    HF_CHECKPOINT_FILES,
    MISTRAL_EXPORT_FILES,
    atomic_directory,
    write_json,
)

logger = logging.getLogger(__name__)


class ExportError(UserError):
    """The checkpoint or adapter cannot be exported as asked."""


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


def _rotary_heads(native: str, config: dict) -> int | None:
    text, vision = config["text_config"], config["vision_config"]
    if re.fullmatch(r"layers\.\d+\.attention\.wq\.weight", native):
        return text["num_attention_heads"]
    if re.fullmatch(r"layers\.\d+\.attention\.wk\.weight", native):
        return text["num_key_value_heads"]
    if re.fullmatch(r"vision_encoder\.transformer\.layers\.\d+\.attention\.w[qk]\.weight", native):
        return vision["num_attention_heads"]
    return None


# ---------------------------------------------------------------------------------------------------
# Inputs


def resolve_checkpoint(model: str) -> Path:
    """Local directory of an HF checkpoint (downloads config + safetensors for a hub id)."""
    if check_model_source(model, "--model") == "local":
        return Path(model)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.jinja"]))


def _weight_files(checkpoint: Path) -> list[Path]:
    files = sorted(checkpoint.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("consolidated")]
    if not files:
        raise ExportError(f"{checkpoint}: no *.safetensors weights (pickled .bin checkpoints are not loaded)")
    return files


class LoraDeltas:
    """The LoRA updates of a PEFT adapter, keyed by the current-layout HF weight name."""

    def __init__(self, adapter_dir: str | Path):
        adapter_dir = Path(adapter_dir)
        config_path, weights_path = (
            adapter_dir / "adapter_config.json",
            adapter_dir / "adapter_model.safetensors",
        )
        try:
            config = read_adapter_config(adapter_dir)  # config and tensor shapes agree, files complete
        except ModelSourceError as err:
            raise ExportError(str(err)) from None
        if config.get("peft_type") != "LORA":
            raise ExportError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
        for unsupported in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save"):
            if config.get(unsupported):
                raise ExportError(f"{config_path}: {unsupported} is not supported by the exporter")
        rank, alpha = config["r"], config["lora_alpha"]
        self.scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
        self.factors: dict[str, dict[str, torch.Tensor]] = {}
        with safe_open(weights_path, framework="pt") as handle:
            for key in handle.keys():
                match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
                if not match:
                    raise ExportError(f"{weights_path}: unexpected adapter tensor {key!r}")
                module = current_hf_name(match.group(1)) + ".weight"
                self.factors.setdefault(module, {})[match.group(2)] = handle.get_tensor(key)
        self.unused = set(self.factors)

    def delta(self, hf_name: str) -> torch.Tensor | None:
        """(B @ A) * scale for this weight, float32, or None when the adapter does not touch it."""
        factors = self.factors.get(current_hf_name(hf_name))
        if factors is None:
            return None
        self.unused.discard(current_hf_name(hf_name))
        return (factors["B"].float() @ factors["A"].float()) * self.scale


def _base_shapes(checkpoint: Path) -> dict[str, list[int]]:
    """Current-layout HF name -> shape of every base weight, from the safetensors headers alone."""
    shapes = {}
    for file in _weight_files(checkpoint):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                shapes[current_hf_name(key)] = handle.get_slice(key).get_shape()
    return shapes


def check_adapter(checkpoint: Path, model: str, adapter: str | Path, force: bool = False) -> None:
    """Refuse, in one line, an adapter that does not fit this base or was trained on another one.

    Shapes: every LoRA pair must give a delta of its base weight's shape. Identity: the base named in
    adapter_config.json, and (when the run recorded one and the base is local) the fingerprint of the
    base's files, must match `model`; `force` accepts a different base of the same shape.
    """
    adapter = Path(adapter)
    deltas = LoraDeltas(adapter)
    shapes = _base_shapes(checkpoint)
    for module, factors in deltas.factors.items():
        if module not in shapes:
            raise ExportError(f"{adapter}: adapter weight {module} has no counterpart in {checkpoint}")
        wanted = [factors["B"].shape[0], factors["A"].shape[1]]
        if list(shapes[module]) != wanted:
            raise ExportError(
                f"{adapter} does not fit {model}: {module} is {list(shapes[module])} in the base but "
                f"{wanted} in the adapter (trained on a base of another shape?)"
            )
    config = read_adapter_config(adapter)
    recorded = {}
    if (adapter / "base_model.json").is_file():
        try:
            recorded = json.loads((adapter / "base_model.json").read_text(encoding="utf-8"))
        except ValueError as err:
            raise ExportError(f"{adapter / 'base_model.json'}: not valid JSON ({err})") from None
    trained_on = recorded.get("name_or_path") or config.get("base_model_name_or_path")
    fingerprint = recorded.get("fingerprint")
    if fingerprint and Path(model).is_dir():
        if checkpoint_fingerprint(model) == fingerprint:
            return
        problem = f"its files differ from those of the base the adapter was trained on ({trained_on})"
    elif trained_on and str(trained_on) != str(model):
        problem = f"the adapter was trained on {trained_on}"
    else:
        return
    if force:
        logger.warning("merging into %s although %s (--force)", model, problem)
        return
    raise ExportError(f"{adapter} -> {model}: {problem}; pass --force to merge into this base anyway")


# ---------------------------------------------------------------------------------------------------
# params.json


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


def _check_tokenizer(checkpoint: Path, tekken: Path) -> None:
    """The HF tokenizer of the checkpoint must be the tekken file shipped with the export: same ids for a
    probe text."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    from transformers import AutoTokenizer

    if not (checkpoint / "tokenizer.json").is_file():
        return
    probe = 'Satellite scenes: DenseResidential; Port. {"label": "Forest"} 12,345 ünïcödé'
    ours = AutoTokenizer.from_pretrained(str(checkpoint)).encode(probe, add_special_tokens=False)
    theirs = Tekkenizer.from_file(str(tekken)).encode(probe, bos=False, eos=False)
    if ours != theirs:
        raise ExportError(
            f"{checkpoint}: its tokenizer differs from {tekken}; give the checkpoint's own tekken.json as --tekken"
        )


# ---------------------------------------------------------------------------------------------------
# Streaming safetensors writer

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_safetensors_streaming(
    path: Path, entries: list[tuple[str, list[int]]], dtype: torch.dtype, produce, on_tensor=None
) -> None:
    """Write a .safetensors file one tensor at a time; `produce(name)` makes each tensor when its turn comes.

    Why our own writer: safetensors' `save_file` serialises the whole file into one buffer first,
    a second copy of all the weights (1.7x the weights at peak on a 0.6 GB checkpoint). The format
    is a little-endian u64 header length, a JSON header (dtype, shape, byte offsets per tensor), then
    the raw bytes in header order; shapes are known from the input headers, so the header comes
    first and each tensor is freed as soon as it is written. The tests read the files back with
    safetensors itself.
    """
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    for name, shape in entries:
        size = math.prod(shape) * itemsize
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name, shape in entries:
            tensor = produce(name)
            if list(tensor.shape) != list(shape) or tensor.dtype != dtype:
                raise ExportError(
                    f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, planned {tuple(shape)} {dtype}"
                )
            handle.write(tensor.contiguous().view(torch.uint8).numpy().data)  # the buffer itself, no copy
            if on_tensor is not None:
                on_tensor(1)


# ---------------------------------------------------------------------------------------------------
# Entry points


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

    check_replaceable(out, MISTRAL_EXPORT_FILES, overwrite)
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
    if adapter:
        check_adapter(checkpoint, model, adapter, force)
    deltas = LoraDeltas(adapter) if adapter else None
    tekken_source = Path(tekken) if tekken else checkpoint_tekken(checkpoint)
    if tekken_source is None:
        raise ExportError(
            f"{checkpoint}: no tekken.json; a {family.models} checkpoint ships one: give it as --tekken"
        )
    _check_tokenizer(checkpoint, tekken_source)

    # Plan: every output tensor's name, source and shape, from the safetensors headers alone.
    plan: list[tuple[str, Path, str, list[int]]] = []
    for file in _weight_files(checkpoint):
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
        heads = _rotary_heads(target, config)
        return unpermute_rotary(tensor, heads) if heads is not None else tensor

    total_bytes = sum(math.prod(entry[3]) * itemsize for entry in plan)
    with (
        atomic_directory(out, MISTRAL_EXPORT_FILES, overwrite, needed_bytes=total_bytes) as tmp,
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


def export_hf(
    model: str,
    out: str | Path,
    adapter: str | Path | None,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    force: bool = False,
) -> Path:
    """A merged HF checkpoint (PEFT's merge_and_unload on the full-precision base) with its processor
    and the base's tekken.json; an FP8 base is written dequantized (`pixtral-lora dequantize`)."""
    from pixtral_lora.model.loading import load_model, load_processor
    from pixtral_lora.outputs import check_replaceable

    check_replaceable(out, HF_CHECKPOINT_FILES, overwrite)
    checkpoint = resolve_checkpoint(model)
    if adapter:
        check_adapter(checkpoint, model, adapter, force)

    base = load_model(
        model, quantization=None, dtype=dtype, device="cpu"
    )  # full precision: never merge into 4-bit
    if adapter:
        from peft import PeftModel

        base = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    processor = load_processor(adapter if adapter and (Path(adapter) / "tokenizer.json").is_file() else model)
    if getattr(base.config, "quantization_config", None):  # FP8 loaded dequantized: the copy is plain
        del base.config.quantization_config
        base.hf_quantizer = None
    tekken = checkpoint_tekken(checkpoint)
    with atomic_directory(out, HF_CHECKPOINT_FILES, overwrite) as tmp:
        base.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        if tekken is not None and checkpoint.joinpath("tekken.json").is_file():
            shutil.copyfile(tekken, tmp / "tekken.json")
    return Path(out)
