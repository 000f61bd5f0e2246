"""What a run's answers depend on, recorded when it is trained and checked whenever it is opened.

Training records three things: the base it trained on (`adapter/base_model.json`: name, family and,
for a local base, a fingerprint of its files), the settings that shape an answer (`trained_with` in
`train_summary.json`: the model, data, prompt and LoRA sections of config.yaml, less what may move
with the machine: paths, the attention kernel), and the content of the held-out splits
(`content_sha256` in split.json: every listed image's bytes). `Run.open` compares them with what the
run names now, so a base rebuilt in place, a hand-edited config.yaml or data changed under the run is
one line naming what changed, or, with `--force`, a warning the outputs carry.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pixtral_lora.config.schema import Config

# Fields of config.yaml that may change without changing an answer: where things are on this
# machine (the split's images are checked by content instead) and how attention is computed.
MACHINE_FIELDS = {
    "model": {"name_or_path", "attn_implementation"},
    "data": {"path", "test_path", "allow_paths_outside"},
}
ANSWER_SECTIONS = ("model", "data", "prompt", "lora")


def base_identity(name_or_path: str) -> dict:
    """What the adapter was trained on: the base's name, family and, when local, its fingerprint."""
    from pixtral_lora.model.loading import checkpoint_fingerprint

    local = Path(name_or_path).is_dir()
    return {
        "name_or_path": name_or_path,
        "fingerprint": checkpoint_fingerprint(name_or_path) if local else None,
        "family": local_family(name_or_path),
    }


def local_family(checkpoint: str | Path) -> str | None:
    """The family of a local checkpoint's config.json (None for a hub id or an unknown model)."""
    from pixtral_lora.errors import UserError
    from pixtral_lora.families import family_from_config

    config = Path(checkpoint) / "config.json"
    if not config.is_file():
        return None
    try:
        return family_from_config(json.loads(config.read_text(encoding="utf-8")), str(config)).name
    except (UserError, ValueError):
        return None


def base_mismatch(recorded: dict, model: str) -> str | None:
    """Why `model` is not the base recorded in base_model.json (None when it is, or cannot be told)."""
    from pixtral_lora.model.loading import checkpoint_fingerprint

    trained_on = recorded.get("name_or_path")
    fingerprint = recorded.get("fingerprint")
    if fingerprint and Path(model).is_dir():
        if checkpoint_fingerprint(model) == fingerprint:
            return None
        return f"the files of {model} differ from those of the base the adapter was trained on ({trained_on})"
    if trained_on and str(trained_on) != str(model):
        return f"the adapter was trained on {trained_on}, not {model}"
    return None


def trained_with(config: Config) -> dict:
    """The settings of `config` that shape an answer (see `MACHINE_FIELDS` for what is left out)."""
    dumped = config.model_dump(mode="json")
    return {
        section: {k: v for k, v in dumped[section].items() if k not in MACHINE_FIELDS.get(section, ())}
        for section in ANSWER_SECTIONS
    }


def config_changes(recorded: dict, config: Config) -> list[str]:
    """The fields (`section.field`) whose value differs from the recorded `trained_with`; fields the
    recorded one lacks (added to the schema since) are not compared."""
    now = trained_with(config)
    return [
        f"{section}.{key}"
        for section, fields in recorded.items()
        for key, value in fields.items()
        if key in now.get(section, {}) and now[section][key] != value
    ]


def image_bytes(ref) -> bytes:
    """The bytes of an undecoded image reference (`{"path", "bytes"}`), read as every loader reads
    them; b"" for a missing or unreadable one (its hash then says so)."""
    from pixtral_lora.data.images import ImageError, read_image_bytes
    from pixtral_lora.data.loaders import image_source

    try:
        return read_image_bytes(image_source(ref))
    except ImageError:
        return b""


def content_sha256(dataset) -> str:
    """sha256 over a split's samples in id order: each id, label and the sha256 of its image bytes."""
    digest = hashlib.sha256()
    column = "image" if "image" in dataset.column_names else "images"
    labels = dataset["label"] if "label" in dataset.column_names else [None] * len(dataset)
    refs = dataset[column]
    for sample_id, label, ref in sorted(
        zip(dataset["id"], labels, refs, strict=True), key=lambda item: str(item[0])
    ):
        images = ref if isinstance(ref, list) else [ref]
        hashes = [hashlib.sha256(image_bytes(image)).hexdigest() for image in images]
        digest.update(json.dumps([str(sample_id), label, hashes]).encode())
    return digest.hexdigest()
