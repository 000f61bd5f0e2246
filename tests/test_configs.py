"""The shipped configs are valid, and the AID one fits its samples into max_length."""

from pathlib import Path

from PIL import Image

from pixtral_lora.config import load_config
from pixtral_lora.data.loaders import AID_CLASS_NAMES
from pixtral_lora.render import Renderer

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_validate():
    names = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert {"aid.yaml", "tiny.yaml", "ucm.yaml", "eurosat_ms.yaml"} <= set(names)
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


def _jpeg(image):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()
