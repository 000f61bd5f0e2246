"""The one place models and processors are loaded, and the tiny Pixtral used on CPU.

`load_model` and `load_processor` take a hub id (`mistral-community/pixtral-12b`) or a local
checkpoint directory, so swapping the tiny model for the real one is a config change.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from pixtral_lora.errors import UserError

logger = logging.getLogger(__name__)

PIXTRAL_12B = "mistral-community/pixtral-12b"
TEKKEN_FILE = "tekken_240911.json"  # Pixtral-12B's tokenizer, shipped inside mistral_common

# Pixtral-12B's token ids for the image markers; the real config and the tiny one share them.
IMAGE_TOKEN_ID = 10
IMAGE_BREAK_TOKEN_ID = 12
IMAGE_END_TOKEN_ID = 13


def tekken_path() -> Path:
    """Path of Pixtral-12B's tekken tokenizer file in mistral_common's package data."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / TEKKEN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: mistral-common is installed without its tokenizer data")
    return path


@functools.lru_cache(maxsize=1)
def chat_template() -> str:
    """The chat template mistral_common generates for Pixtral's tekken tokenizer.

    The template shipped with `mistral-community/pixtral-12b` drops the system prompt whenever an
    assistant turn follows, which would silently remove the class list from every training sample;
    this one renders exactly what `mistral_common.encode_chat_completion` encodes.
    """
    from mistral_common.integrations.chat_templates.chat_templates import convert_tokenizer_to_chat_template

    return convert_tokenizer_to_chat_template(str(tekken_path()))


# --max-lora-rank values vLLM accepts (export's vllm_serve.sh and eval --backend vllm pick from these)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class TinyPixtralSizes:
    """Widths and depths of the tiny model; everything else is Pixtral-12B's config.

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


def pixtral_12b_config_dict() -> dict:
    """`config.json` of `mistral-community/pixtral-12b` (the fields that define the architecture)."""
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": IMAGE_TOKEN_ID,
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


def pixtral_config(sizes: TinyPixtralSizes | None = None):
    """A `LlavaConfig` with Pixtral-12B's fields; with `sizes`, shrunk to tiny widths and depths."""
    from transformers import LlavaConfig

    config = pixtral_12b_config_dict()
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
    return LlavaConfig(
        **{k: v for k, v in config.items() if k != "architectures"}, architectures=config["architectures"]
    )


def build_processor():
    """A `PixtralProcessor` whose tokenizer is converted from Pixtral-12B's own tekken file."""
    from transformers import PixtralImageProcessor, PixtralProcessor
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    template = chat_template()
    tokenizer = convert_tekken_tokenizer(str(tekken_path()), chat_template=template)
    image_processor = PixtralImageProcessor(
        size={"longest_edge": 1024}, patch_size={"height": 16, "width": 16}
    )
    return PixtralProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=16,
        spatial_merge_size=1,
        chat_template=template,
    )


def build_tiny_model(out: str | Path, sizes: TinyPixtralSizes | None = None, seed: int = 0) -> Path:
    """Write a random-initialised tiny Pixtral (config, safetensors, processor) as an HF checkpoint."""
    from transformers import LlavaForConditionalGeneration

    from pixtral_lora.io import HF_CHECKPOINT_FILES, atomic_directory

    out = Path(out)
    torch.manual_seed(seed)
    config = pixtral_config(sizes or TinyPixtralSizes())
    model = LlavaForConditionalGeneration(config)
    _match_logit_range(model, config)
    processor = build_processor()
    with atomic_directory(out, HF_CHECKPOINT_FILES) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / "tiny_pixtral.json").write_text(
            json.dumps({"seed": seed, "sizes": vars(sizes or TinyPixtralSizes())})
        )
    logger.info("tiny Pixtral written to %s", out)
    return out


def _match_logit_range(model, config) -> None:
    """Give the tiny LM head the logit range of the 12B shape at the same init scale.

    With hidden size 64 and std 0.02 the largest logit any hidden state can produce is ~1.3 against
    131k near-equal competitors: the tiny model could never put more than ~1e-4 probability on a token
    (loss stuck near 10.5, flat likelihoods for scoring). The 12B model's random logits have a std of
    0.02 * sqrt(5120) = 1.4; scaling the tiny head's std by sqrt(5120 / hidden) gives it the same.
    """
    text = config.text_config
    std = (
        text.initializer_range
        * (pixtral_12b_config_dict()["text_config"]["hidden_size"] / text.hidden_size) ** 0.5
    )
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, std)


def load_processor(model_name_or_path: str | os.PathLike):
    """Load the processor of a checkpoint, always with the mistral_common-equivalent chat template."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_name_or_path))
    # The hub checkpoint's own template drops the system prompt in training samples (see chat_template).
    template = chat_template()
    processor.chat_template = template
    processor.tokenizer.chat_template = template
    return processor


class ModelSourceError(UserError):
    """A model reference that is neither a local checkpoint nor a reachable hub model."""


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def check_model_source(name: str, field_name: str = "model") -> str:
    """Say where `name` is ("local", "hub cache" or "hub"), or raise `ModelSourceError` in one line.

    A local path must be a directory with config.json; otherwise `name` must be a hub id that is in
    the HF cache, or (online) that the hub knows.
    """
    path = Path(name)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelSourceError(
                f"{field_name}: {name} exists but is not a checkpoint directory (no config.json)"
            )
        return "local"
    hint = (
        " (`make train` or `pixtral-lora tiny-model --out DIR` builds the tiny model)"
        if "tiny" in name
        else ""
    )
    if not _HUB_ID.fullmatch(name):
        raise ModelSourceError(
            f"{field_name}: {name} is not a local directory nor a hub id (owner/name){hint}"
        )
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return "hub cache"
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ModelSourceError(
            f"{field_name}: {name} is not a local directory, and as a hub id it is not in the HF cache "
            f"({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE is set{hint}"
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        HfApi().model_info(name, timeout=15)
    except RepositoryNotFoundError:
        raise ModelSourceError(
            f"{field_name}: {name} is not a local directory nor a model on the hub{hint}"
        ) from None
    except Exception as err:  # network errors come in many types; all mean the same here
        raise ModelSourceError(
            f"{field_name}: {name} is not a local directory, not in the HF cache ({constants.HF_HUB_CACHE}), "
            f"and the hub cannot be reached ({type(err).__name__}){hint}"
        ) from None
    return "hub"


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """adapter_config.json of a LoRA adapter, checked against its tensors' shapes (headers only).

    A tampered rank, a truncated safetensors file or invalid JSON is a `ModelSourceError` naming the
    file: PEFT would otherwise load the tensors under the wrong scale, or fail with a traceback.
    """
    import json

    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    config_path, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        raise ModelSourceError(f"{adapter_dir}: expected adapter_config.json and adapter_model.safetensors")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelSourceError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ModelSourceError(f"{config_path}: not a JSON object")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ModelSourceError(
            f"{config_path}: r ({rank!r}) and lora_alpha ({alpha!r}) must be positive numbers"
        )
    try:
        with safe_open(weights, framework="pt") as handle:
            shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise ModelSourceError(
            f"{weights}: not a complete safetensors file ({str(err).splitlines()[0][:160]})"
        ) from None
    for key, shape in shapes.items():
        if (
            key.endswith("lora_A.weight")
            and shape[0] != rank
            or key.endswith("lora_B.weight")
            and shape[1] != rank
        ):
            raise ModelSourceError(
                f"{config_path}: r is {rank} but {weights.name} holds {key} of shape {list(shape)} "
                "(rank {}); the config does not belong to these weights".format(
                    shape[0] if key.endswith("lora_A.weight") else shape[1]
                )
            )
    return config


def checkpoint_fingerprint(directory: str | Path, sample_bytes: int = 1 << 20) -> str:
    """A cheap identity of a local checkpoint: config.json, and per safetensors file its size, header
    and the first and last `sample_bytes` of its data (seconds even for 25 GB; differs between two
    random initialisations of the same shape)."""
    import hashlib
    import struct

    directory = Path(directory)
    digest = hashlib.sha256((directory / "config.json").read_bytes())
    for file in sorted(directory.glob("*.safetensors")):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as handle:
            header_length = struct.unpack("<Q", handle.read(8))[0]
            digest.update(handle.read(header_length))
            digest.update(handle.read(sample_bytes))
            handle.seek(max(8 + header_length, size - sample_bytes))
            digest.update(handle.read(sample_bytes))
    return digest.hexdigest()


def best_device() -> str:
    """'cuda' when a GPU is visible, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    model_name_or_path: str | os.PathLike,
    *,
    quantization: str | None = None,
    dtype: str = "auto",
    device: str | None = None,
    attn_implementation: str = "sdpa",
):
    """Load a `LlavaForConditionalGeneration` (Pixtral) from safetensors only.

    quantization: None, or "4bit" for bitsandbytes NF4 with double quantisation (QLoRA).
    dtype: "auto" (bf16 on CUDA, fp32 on CPU), "bfloat16", "float16" or "float32".
    """
    from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration

    device = device or best_device()
    torch_dtype = resolve_dtype(dtype, device)
    kwargs: dict = {
        "dtype": torch_dtype,
        "use_safetensors": True,
        "trust_remote_code": False,
        "attn_implementation": attn_implementation,
    }
    if quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype,
            # The vision tower and projector are small and sensitive; the language model is 95% of the weights.
            llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"],
        )
    elif quantization is not None:
        raise ValueError(f"quantization must be null or '4bit', got {quantization!r}")
    if quantization or device.startswith("cuda"):
        # Straight onto the device (the current one: each data-parallel process has its own GPU).
        kwargs["device_map"] = {"": torch.cuda.current_device() if device == "cuda" else device}
    model = LlavaForConditionalGeneration.from_pretrained(str(model_name_or_path), **kwargs)
    if "device_map" not in kwargs:
        model.to(device)
    return model


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """Turn a config dtype name into a torch dtype; "auto" is bf16 on CUDA and fp32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    except KeyError:
        raise ValueError(f"dtype must be auto, bfloat16, float16 or float32, got {dtype!r}") from None
