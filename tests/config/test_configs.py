"""The shipped configs are valid, and the AID one fits its samples into max_length."""

from pathlib import Path

from PIL import Image

from pixtral_lora.config.yaml_loading import load_config
from pixtral_lora.data.loaders import AID_CLASS_NAMES
from pixtral_lora.model.render import Renderer

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_configs_validate():
    names = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert {"aid.yaml", "tiny.yaml", "ucm.yaml", "eurosat_ms.yaml", "ministral3_8b_aid.yaml",
            "mistral_small_3_2_aid.yaml"} <= set(names)  # fmt: skip
    for name in names:
        load_config(ROOT / "configs" / name)


def test_aid_sample_fits_max_length_with_the_study_image_size(processor):
    config = load_config(ROOT / "configs" / "aid.yaml")
    image = Image.new("RGB", (600, 600), (90, 120, 60))
    renderer = Renderer(processor, config.data.image_longest_edge)
    messages = config.prompt.messages(AID_CLASS_NAMES, "MediumResidential")
    sample = renderer.render(messages, [renderer.load_images([{"path": None, "bytes": _jpeg(image)}])[0]])
    image_tokens = sum(1 for t in sample["input_ids"] if t in renderer.image_marker_ids)
    assert image_tokens == 19 * 20  # 304x304
    assert len(sample["input_ids"]) <= config.data.max_length
    text = processor.tokenizer.decode(sample["input_ids"])
    assert "Airport; BareLand; BaseballField" in text


def test_mistral3_configs_cost_132_image_tokens_and_state_their_vram(tiny_mistral3_dir):
    """The Mistral3 configs: the same study settings as aid.yaml, 308x308 = 11x11 cells of 28 px."""
    from pixtral_lora.families import family_from_config
    from pixtral_lora.families.mistral3 import mistral_small_config
    from pixtral_lora.model.loading import load_processor

    assert family_from_config(mistral_small_config()).name == "mistral3"
    processor = load_processor(tiny_mistral3_dir)
    aid = load_config(ROOT / "configs" / "aid.yaml")
    for name in ("ministral3_8b_aid.yaml", "mistral_small_3_2_aid.yaml"):
        config = load_config(ROOT / "configs" / name)
        assert (config.data, config.lora, config.prompt) == (aid.data, aid.lora, aid.prompt)
        header = (ROOT / "configs" / name).read_text().split("\n# Model arguments")[0]
        assert "Estimated peak VRAM per GPU" in header and "132 image tokens" in header
        renderer = Renderer(processor, config.data.image_longest_edge)
        image = renderer.load_images([{"path": None, "bytes": _jpeg(Image.new("RGB", (600, 600)))}])[0]
        sample = renderer.render(config.prompt.messages(AID_CLASS_NAMES, "Port"), [image])
        assert image.size == (308, 308)
        assert sum(1 for t in sample["input_ids"] if t in renderer.image_marker_ids) == 11 * 12
        assert "[SYSTEM_PROMPT]" in processor.tokenizer.decode(sample["input_ids"])


def _jpeg(image):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()
