"""Shared fixtures: the tiny Pixtral and generated AID-style data, built once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SYNTH_CLASSES = ["Beach", "Desert", "Forest", "Port"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from pixtral_lora.modeling import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-pixtral")


@pytest.fixture(scope="session")
def processor(tiny_model_dir):
    from pixtral_lora.modeling import load_processor

    return load_processor(tiny_model_dir)


@pytest.fixture(scope="session")
def mistral_tokenizer():
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from pixtral_lora.modeling import tekken_path

    return MistralTokenizer.from_file(str(tekken_path()))


@pytest.fixture(scope="session")
def aid_dir(tmp_path_factory):
    from pixtral_lora.synth import generate_aid_like

    return generate_aid_like(
        tmp_path_factory.mktemp("data") / "aid", classes=SYNTH_CLASSES, per_class=10, size=64
    )
