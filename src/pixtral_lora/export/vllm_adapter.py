"""The LoRA adapter as vLLM serves it on a Mistral-format base (`--enable-lora`), with its serve command.

`convert_to_mistral.py --adapter-only` calls `export_adapter_only`: keys normalised to the layout vLLM's
weight mapper expects, vision q/k rows in Mistral's rotary order, and `vllm_serve.sh` beside it with the
flags that make vLLM apply all of the adapter. What vLLM would load and silently drop is refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from pixtral_lora.export.checkpoint import ExportError, resolve_checkpoint
from pixtral_lora.export.lora import LoraDeltas
from pixtral_lora.export.names import current_hf_name, unpermute_rotary
from pixtral_lora.model.loading import VLLM_LORA_RANKS
from pixtral_lora.outputs import ADAPTER_FILES, atomic_directory, check_replaceable, read_marker, write_json
from pixtral_lora.run.layout import BASE_MODEL_FILE
from pixtral_lora.run.reader import file_sha256

# What vLLM's Mistral-format `PixtralForConditionalGeneration` (SupportsLoRA since vLLM PR #31724) loads
# as LoRA: PEFT keys in transformers' current layout, mapped by its `hf_to_vllm_mapper`
# (model.language_model. -> language_model.model., model.multi_modal_projector. ->
# vision_language_adapter., .linear_1./.linear_2. -> .w_in./.w_out., the vision tower to its vision
# encoder), q/k/v and gate/up packed into its qkv_proj/gate_up_proj. Text q/k LoRA stays in HF's rotary
# row order: vLLM permutes Mistral-format wq/wk into that order when it loads them. Its vision encoder
# keeps Mistral's interleaved rotary rows, so vision q/k lora_B rows are written in that order.
_VLLM_LORA_KEY = re.compile(
    r"base_model\.model\.("
    r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
    r"|model\.multi_modal_projector\.linear_[12]"
    r"|model\.vision_tower\.transformer\.layers\.\d+\.(attention\.[qkvo]_proj|feed_forward\.(gate|up|down)_proj)"
    r")\.lora_[AB]\.weight"
)
_VISION_ROTARY_B = re.compile(r".*\.vision_tower\..*\.attention\.[qk]_proj\.lora_B\.weight")
SERVE_COMMAND_FILE = "vllm_serve.sh"
ADAPTER_ONLY_KIND = "vLLM LoRA export"
# safetensors metadata of an --adapter-only export: the sha256 of the training adapter it came from
SOURCE_KEY = "pixtral_lora_source_adapter_sha256"


def _vision_heads(adapter: Path, model: str | None) -> int:
    """The vision tower's attention heads, from the base's config.json (`model`, else the base the
    adapter recorded)."""
    if model is None:
        recorded = adapter / BASE_MODEL_FILE
        model = (
            json.loads(recorded.read_text(encoding="utf-8"))["name_or_path"] if recorded.is_file() else None
        )
    if model is None:
        raise ExportError(
            f"{adapter}: vision-tower LoRA needs --model (the base) to know its attention heads"
        )
    config = json.loads((resolve_checkpoint(model) / "config.json").read_text(encoding="utf-8"))
    return config["vision_config"]["num_attention_heads"]


def serve_command(adapter_dir: Path, rank: int, touches_tower: bool, name: str = "adapter") -> str:
    """The `vllm serve` command that applies all of this adapter (the base: a Mistral-format export)."""
    allowed = next((r for r in VLLM_LORA_RANKS if r >= rank), None)
    if allowed is None:
        raise ExportError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]})")
    flags = [
        "vllm serve BASE_MISTRAL_DIR --tokenizer-mode mistral --config-format mistral --load-format mistral",
        "--enable-lora",
        *(["--enable-tower-connector-lora"] if touches_tower else []),
        f"--max-lora-rank {allowed}",
        f"--lora-modules {name}={adapter_dir.resolve()}",
    ]
    return " \\\n    ".join(flags)


def served_name(name: str, lora_dir: str | Path) -> str:
    """NAME-<8 hex of the training adapter's sha256>: a retrained adapter is served under a new name,
    so vLLM never answers with the cache of the old one it keeps under the same name (vllm#44939)."""
    version = source_sha256(lora_dir) or file_sha256(Path(lora_dir) / "adapter_model.safetensors")
    return f"{name}-{version[:8]}"


def serve_many(adapters: dict[str, str | Path]) -> str:
    """One `vllm serve` command for several --adapter-only exports (name -> dir) on one base: each
    served under its versioned name (`served_name`), every flag any of them needs, the largest rank,
    and room for all of them in a batch (`--max-loras`)."""
    bases, ranks, tower = set(), [], False
    modules = []
    for name, lora_dir in adapters.items():
        lora_dir = Path(lora_dir)
        marker = read_marker(lora_dir)
        if (
            not (lora_dir / "adapter_config.json").is_file()
            or (marker or {}).get("kind") != ADAPTER_ONLY_KIND
        ):
            raise ExportError(
                f"{lora_dir}: not an --adapter-only export (make one with convert_to_mistral.py --adapter "
                "RUN/adapter --adapter-only --out DIR)"
            )
        config = json.loads((lora_dir / "adapter_config.json").read_text(encoding="utf-8"))
        bases.add(config.get("base_model_name_or_path"))
        ranks.append(config["r"])
        tower |= "--enable-tower-connector-lora" in (lora_dir / SERVE_COMMAND_FILE).read_text(
            encoding="utf-8"
        )
        modules.append(f"{served_name(name, lora_dir)}={lora_dir.resolve()}")
    if len(bases) > 1:
        raise ExportError(f"these adapters were trained on different bases ({', '.join(map(str, sorted(bases)))}): "
                          "one server serves one base")  # fmt: skip
    allowed = next((r for r in VLLM_LORA_RANKS if r >= max(ranks)), None)
    if allowed is None:
        raise ExportError(
            f"LoRA rank {max(ranks)} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]})"
        )
    flags = [
        "vllm serve BASE_MISTRAL_DIR --tokenizer-mode mistral --config-format mistral --load-format mistral",
        "--enable-lora",
        *(["--enable-tower-connector-lora"] if tower else []),
        f"--max-lora-rank {allowed}",
        f"--max-loras {len(modules)}",
        "--lora-modules " + " ".join(modules),
    ]
    return " \\\n    ".join(flags)


def source_sha256(lora_dir: str | Path) -> str | None:
    """sha256 of the training adapter an --adapter-only export was made from (None: not recorded)."""
    with safe_open(Path(lora_dir) / "adapter_model.safetensors", framework="pt") as handle:
        return (handle.metadata() or {}).get(SOURCE_KEY)


def export_adapter_only(
    adapter: str | Path, out: str | Path, overwrite: bool = False, model: str | None = None
) -> Path:
    """The adapter as vLLM's LoRA serving of the Mistral-format base loads it (`--enable-lora`), with
    the exact serve command it needs beside it (`vllm_serve.sh`).

    Keys are normalised to transformers' current layout (what vLLM's weight mapper expects); the
    language model's projections, the projector and the vision tower are kept, the vision q/k
    lora_B rows in Mistral's interleaved rotary order (`model` or the recorded base gives the heads).
    """
    adapter = Path(adapter)
    inputs = {"--adapter": adapter, "--model checkpoint": model}
    check_replaceable(out, ADAPTER_FILES, overwrite, ADAPTER_ONLY_KIND, inputs)
    deltas = LoraDeltas(adapter)  # the adapter's own checks (LoRA, no DoRA/patterns, key shapes)
    tensors = {}
    vision_heads = None
    with safe_open(adapter / "adapter_model.safetensors", framework="pt") as handle:
        for key in handle.keys():
            module, factor = re.fullmatch(r"base_model\.model\.(.+)\.(lora_[AB]\.weight)", key).groups()
            normalised = (
                f"base_model.model.{current_hf_name(module + '.weight').removesuffix('.weight')}.{factor}"
            )
            if not _VLLM_LORA_KEY.fullmatch(normalised):
                raise ExportError(
                    f"{adapter}: LoRA on {module}, which vLLM's LoRA serving does not apply (it would be "
                    "dropped); export the merged model instead (convert_to_mistral.py without --adapter-only)"
                )
            tensor = handle.get_tensor(key)
            if _VISION_ROTARY_B.fullmatch(normalised):
                vision_heads = vision_heads or _vision_heads(adapter, model)
                tensor = unpermute_rotary(tensor, vision_heads)
            tensors[normalised] = tensor
    config = dict(deltas.config)
    config["target_modules"] = sorted({re.search(r"\.(\w+)\.lora_", k).group(1) for k in tensors})
    touches_tower = any(".multi_modal_projector." in k or ".vision_tower." in k for k in tensors)
    out = Path(out)
    with atomic_directory(out, ADAPTER_FILES, overwrite, kind=ADAPTER_ONLY_KIND, inputs=inputs) as tmp:
        # the run adapter it came from: its calibration applies to this export as served (`source_sha256`)
        source = {SOURCE_KEY: file_sha256(adapter / "adapter_model.safetensors")}
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt", **source})
        write_json(tmp / "adapter_config.json", config)
        (tmp / SERVE_COMMAND_FILE).write_text(
            "#!/bin/sh\n# vLLM applies all of this adapter only with these flags (the projector and vision\n"
            "# tower need --enable-tower-connector-lora); BASE_MISTRAL_DIR: the base converted by\n"
            "# convert_to_mistral.py without --adapter.\n"
            + serve_command(out, config["r"], touches_tower)
            + "\n"
        )
    return out
