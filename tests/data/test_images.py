import io

import numpy as np
import pytest
from PIL import Image

from pixtral_lora.data.images import (
    ImageError,
    encode_data_uri,
    image_token_count,
    load_image,
    patch_aligned_size,
    prepare_image,
)


def _png_bytes(image: Image.Image, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=save_kwargs.pop("format", "PNG"), **save_kwargs)
    return buffer.getvalue()


def test_exif_orientation_is_applied():
    # 40 wide x 20 tall with a red left half; EXIF orientation 6 means "rotate 90 CW to display".
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    loaded = load_image(_png_bytes(image, format="JPEG", exif=exif.tobytes(), quality=95))
    assert loaded.size == (20, 40)
    top = np.asarray(loaded)[2, 10]
    assert top[0] > 200 and top[2] < 60  # the red half is now on top


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (8, 8), 128),
        Image.new("RGBA", (8, 8), (10, 20, 30, 255)),
        Image.new("P", (8, 8), 3),
        Image.new("CMYK", (8, 8), (0, 0, 0, 0)),
        Image.new("1", (8, 8), 1),
    ],
    ids=["grayscale", "rgba", "palette", "cmyk", "bilevel"],
)
def test_any_mode_becomes_rgb(image):
    loaded = load_image(_png_bytes(image, format="TIFF" if image.mode == "CMYK" else "PNG"))
    assert loaded.mode == "RGB" and loaded.size == (8, 8)


def test_16_bit_grayscale_is_scaled_not_clipped():
    array = np.full((4, 4), 65535 // 2, dtype=np.uint16)
    loaded = load_image(_png_bytes(Image.fromarray(array)))
    assert loaded.mode == "RGB"
    assert abs(int(np.asarray(loaded)[0, 0, 0]) - 127) <= 1


def test_transparent_pixels_become_white():
    loaded = load_image(_png_bytes(Image.new("RGBA", (4, 4), (0, 0, 0, 0))))
    assert np.asarray(loaded)[0, 0].tolist() == [255, 255, 255]


def test_truncated_file_is_rejected_with_its_name(tmp_path):
    data = _png_bytes(Image.effect_noise((64, 64), 50).convert("RGB"), format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.jpg"):
        load_image(path)


def test_garbage_and_missing_files_are_rejected(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="cannot decode"):
        load_image(tmp_path / "x.jpg")
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path / "missing.jpg")


def test_decompression_bomb_is_rejected():
    bomb = _png_bytes(Image.new("L", (2000, 2000)))  # compresses to a few KB
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(bomb, max_pixels=1_000_000)


def test_data_uri_round_trip():
    image = Image.new("RGB", (16, 32), (1, 2, 3))
    loaded = load_image(encode_data_uri(image, fmt="PNG"))
    assert loaded.size == (16, 32) and np.asarray(loaded)[0, 0].tolist() == [1, 2, 3]


def test_bad_data_uri_is_rejected():
    with pytest.raises(ImageError, match="base64"):
        load_image("data:image/png;base64,@@@")


@pytest.mark.parametrize(
    ("size", "longest", "expected"),
    [
        ((600, 600), 300, (304, 304)),
        ((600, 600), None, (608, 608)),
        ((1000, 500), 300, (304, 144)),
        ((5, 5), None, (16, 16)),
    ],
)
def test_resized_sides_are_patch_multiples(size, longest, expected):
    assert patch_aligned_size(*size, longest) == expected
    assert prepare_image(Image.new("RGB", size), longest).size == expected


def test_image_token_count_matches_pixtral_layout():
    # 304x304 -> 19x19 patches + 19 row ends ([IMG_BREAK] x18 + [IMG_END])
    assert image_token_count(304, 304) == 19 * 20
