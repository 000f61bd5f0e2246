"""The one place models and processors are loaded (the tiny models are built in `tiny`).

`load_model` and `load_processor` take a hub id (`mistral-community/pixtral-12b`) or a local
checkpoint directory, so swapping the tiny model for the real one is a config change.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from pathlib import Path

import torch

from pixtral_lora.errors import UserError

logger = logging.getLogger(__name__)

TEKKEN_FILE = "tekken_240911.json"  # Pixtral-12B's tokenizer, shipped inside mistral_common

# Pixtral-12B's token ids for the image markers; every Mistral vision checkpoint shares them.
IMAGE_TOKEN_ID = 10
IMAGE_BREAK_TOKEN_ID = 12
IMAGE_END_TOKEN_ID = 13


def packaged_tekken(name: str = TEKKEN_FILE) -> Path:
    """Path of a tekken tokenizer file in mistral_common's package data."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: mistral-common is installed without its tokenizer data")
    return path


def tekken_path() -> Path:
    """Path of Pixtral-12B's tekken tokenizer file in mistral_common's package data."""
    return packaged_tekken(TEKKEN_FILE)


def checkpoint_tekken(model_name_or_path: str | os.PathLike) -> Path | None:
    """The tekken.json that defines a checkpoint's tokenizer: its own file (local, or in the HF cache),
    else its family's file from mistral_common (Pixtral-12B's hub repo ships none); None when neither.
    """
    path = Path(model_name_or_path)
    if path.is_dir():
        if (path / "tekken.json").is_file():
            return path / "tekken.json"
        if not (path / "config.json").is_file():
            return None  # an adapter or processor folder: its saved template is the one it trained with
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(model_name_or_path), "tekken.json")
        if isinstance(cached, str):
            return Path(cached)
    from pixtral_lora.families import family_of

    family = family_of(model_name_or_path)
    return packaged_tekken(family.packaged_tekken) if family.packaged_tekken else None


@functools.lru_cache(maxsize=8)
def chat_template(tekken: str | None = None) -> str:
    """The chat template mistral_common generates for a tekken tokenizer file (default: Pixtral-12B's).

    The template shipped with `mistral-community/pixtral-12b` drops the system prompt whenever an
    assistant turn follows, which would silently remove the class list from every training sample;
    this one renders exactly what `mistral_common.encode_chat_completion` encodes for the file's
    tokenizer version ([SYSTEM_PROMPT] tokens from v7 on).
    """
    from mistral_common.integrations.chat_templates.chat_templates import convert_tokenizer_to_chat_template

    return convert_tokenizer_to_chat_template(tekken or str(tekken_path()))


# --max-lora-rank values vLLM accepts (export's vllm_serve.sh and eval --backend vllm pick from these)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def load_processor(model_name_or_path: str | os.PathLike):
    """Load the processor of a checkpoint with the chat template mistral_common generates for its own
    tekken tokenizer (see `chat_template`); a folder without one (an adapter) keeps its saved template.
    """
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_name_or_path))
    tekken = checkpoint_tekken(model_name_or_path)
    if tekken is not None:
        template = chat_template(str(tekken))
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


def safetensors_shapes(file: Path, remedy: str = "") -> dict[str, list[int]]:
    """Tensor name -> shape, from a safetensors file's header alone; a truncated or foreign file is a
    `ModelSourceError` naming it (with `remedy` appended), not safetensors' own error type."""
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt") as handle:
            return {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise ModelSourceError(
            f"{file}: not a complete safetensors file ({str(err).splitlines()[0][:160]}){remedy}"
        ) from None


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """adapter_config.json of a LoRA adapter, checked against its tensors: their shapes (from the
    headers), every lora_A with its lora_B, and every value finite (the one read of the tensors).

    A tampered rank, a truncated safetensors file, half a LoRA pair, a NaN or invalid JSON is a
    `ModelSourceError` naming the file: PEFT would otherwise load the tensors under the wrong scale,
    run on a partial adapter, or fail with a traceback.
    """

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
    shapes = safetensors_shapes(weights)
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
    for key in shapes:  # PEFT only warns about a missing half and runs on a partial adapter
        for half, other in (("lora_A.", "lora_B."), ("lora_B.", "lora_A.")):
            if half in key and key.replace(half, other) not in shapes:
                raise ModelSourceError(
                    f"{weights}: {key} has no {key.replace(half, other)}: an incomplete adapter"
                )
    _check_finite(weights)
    return config


def _check_finite(weights: Path) -> None:
    """Every tensor of an adapter is finite: NaN or inf weights (a diverged run) would be merged,
    exported and served, and every answer would be the first class with NaN confidence."""
    import torch
    from safetensors import safe_open

    with safe_open(weights, framework="pt") as handle:
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise ModelSourceError(
                    f"{weights}: {key} holds {bad} non-finite values (NaN or inf): the run diverged or the "
                    "file was damaged; retrain (a lower learning rate) or use an earlier checkpoint"
                )


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


def usable_attention(requested: str) -> str:
    """`requested`, or sdpa where flash attention cannot run on this machine (said in the log).

    Training refuses such a config in its preflight; every other command opens the run anyway: the
    kernel changes speed and memory, not what the weights compute.
    """
    if requested == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
            logger.warning("flash_attention_2 cannot run here (needs flash-attn and CUDA): using sdpa")
            return "sdpa"
    return requested


# Modules a 4-bit load keeps in the model's dtype (any module whose name contains one of these).
UNQUANTIZED = ("vision_tower", "multi_modal_projector", "lm_head")


def load_model(
    model_name_or_path: str | os.PathLike,
    *,
    quantization: str | None = None,
    dtype: str = "auto",
    device: str | None = None,
    attn_implementation: str = "sdpa",
    quant_storage: bool = False,
):
    """Load a supported Mistral vision model (see `families`) from safetensors only.

    quantization: None, or "4bit" for bitsandbytes NF4 with double quantisation (QLoRA).
    quant_storage: 4-bit weights packed in the model's dtype instead of uint8, which FSDP needs to
    shard them with the other weights (QLoRA under FSDP1).
    dtype: "auto" (bf16 on CUDA, fp32 on CPU), "bfloat16", "float16" or "float32".
    """
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    from pixtral_lora.families import config_json, family_from_config

    saved, source = config_json(model_name_or_path)
    family_from_config(saved, source)  # an unsupported architecture is one line, before any weight loads
    fp8 = check_quantization(model_name_or_path, quantization, saved)
    check_weights(model_name_or_path)
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
            bnb_4bit_quant_storage=torch_dtype if quant_storage else torch.uint8,
            # The vision tower and projector are small and sensitive; the language model is 95% of the weights.
            # transformers 5 matches these from the start of a module's name or as its suffix: bare
            # "vision_tower" matched neither "model.vision_tower.transformer..." nor its layers, and
            # the tower and projector were quantized too. A leading ".*" matches them anywhere.
            llm_int8_skip_modules=[rf".*{name}" for name in UNQUANTIZED],
        )
    elif quantization is not None:
        raise ValueError(f"quantization must be null or '4bit', got {quantization!r}")
    elif fp8:
        from transformers import FineGrainedFP8Config

        # FP8 weights (Ministral 3 Instruct) become `dtype` as they load: LoRA trains on the dequantized
        # weights, and the merge and export read the same values.
        kwargs["quantization_config"] = FineGrainedFP8Config(
            dequantize=True, weight_block_size=fp8.get("weight_block_size")
        )
    if quantization or device.startswith("cuda"):
        # Straight onto the device (the current one: each data-parallel process has its own GPU).
        kwargs["device_map"] = {"": torch.cuda.current_device() if device == "cuda" else device}
    model = AutoModelForImageTextToText.from_pretrained(str(model_name_or_path), **kwargs)
    if "device_map" not in kwargs:
        model.to(device)
    return model


def check_weights(model_name_or_path: str | os.PathLike) -> None:
    """Every weight file a local checkpoint names is there and is a whole safetensors file (its
    header parses and covers the file): a missing shard or a truncated download is one line naming
    the file, not transformers' traceback. Hub ids are checked by the download itself."""

    path = Path(model_name_or_path)
    if not path.is_dir():
        return
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ModelSourceError(
                f"{index}: not a safetensors index ({type(err).__name__}: {err})"
            ) from None
        where = f"{index} names"
    elif (path / "model.safetensors").is_file():
        names, where = ["model.safetensors"], "it has"
    else:
        raise ModelSourceError(
            f"{path}: no model.safetensors or model.safetensors.index.json (pickled .bin weights are not "
            "loaded); an incomplete download? fetch the checkpoint again"
        )
    for name in names:
        file = path / name
        if not file.is_file():
            raise ModelSourceError(f"{path}: {where} {name}, which is missing; fetch the checkpoint again")
        safetensors_shapes(file, "; fetch the checkpoint again")


def check_quantization(
    model_name_or_path: str | os.PathLike, quantization: str | None, config: dict
) -> dict | None:
    """The FP8 quantization_config of a checkpoint saved in FP8 (None otherwise), from its config.json
    dict `config`; one line when the requested 4-bit loading cannot start from it, or the checkpoint is
    quantized some other way."""
    saved = config.get("quantization_config") or {}
    method = saved.get("quant_method")
    if not method:
        return None
    if method != "fp8":
        raise ModelSourceError(
            f"{model_name_or_path}: saved quantized ({method}); use its bf16 checkpoint (QLoRA quantizes it itself)"
        )
    if quantization == "4bit":
        raise ModelSourceError(
            f"{model_name_or_path}: FP8 weights cannot be re-quantized to 4-bit as they load; write a bf16 copy "
            f"with `pixtral-lora dequantize {model_name_or_path} --out DIR` and train on DIR, or use the "
            "family's Base checkpoint (bf16)"
        )
    return saved


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """Turn a config dtype name into a torch dtype; "auto" is bf16 on CUDA and fp32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    except KeyError:
        raise ValueError(f"dtype must be auto, bfloat16, float16 or float32, got {dtype!r}") from None
