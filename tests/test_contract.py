import io

import numpy as np
import pytest
from PIL import Image

from fashion.contract import (
    DecodeLimits,
    ImageTooLarge,
    Preprocessing,
    UndecodableImage,
    UnsupportedImageFormat,
    normalize,
    preprocess,
)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


PRE = Preprocessing(image_size=64)


@pytest.mark.parametrize("mode", ["letterbox", "squash", "center_crop"])
def test_every_resize_mode_returns_uint8_hwc_of_the_contract_size(mode):
    data = encode(Image.new("RGB", (300, 120), (10, 200, 30)), "JPEG")
    out = preprocess(data, Preprocessing(image_size=64, resize_mode=mode))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8


def test_letterbox_keeps_the_whole_product_and_pads_with_white():
    out = preprocess(encode(Image.new("RGB", (200, 100), (0, 0, 255)), "PNG"), PRE)
    assert out[0, 32].tolist() == [255, 255, 255]  # padding above the wide image
    assert out[32, 0].tolist() == [0, 0, 255]  # full width kept


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (100, 50), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 50, 50))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    squash = Preprocessing(image_size=64, resize_mode="squash")
    out = preprocess(encode(image, "JPEG", exif=exif, quality=95), squash)
    assert out[5, 32, 2] > 200 and out[60, 32, 0] > 200  # blue on top after rotation, red below


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (40, 40), 128),
        Image.new("CMYK", (40, 40), (0, 255, 255, 0)),
        Image.new("I;16", (40, 40), 40000),
        Image.new("RGBA", (40, 40), (255, 0, 0, 0)),
    ],
    ids=["L", "CMYK", "16bit", "RGBA"],
)
def test_any_mode_becomes_rgb(image):
    fmt = "JPEG" if image.mode in ("L", "CMYK") else "PNG"
    out = preprocess(encode(image, fmt), PRE)
    assert out.shape == (64, 64, 3)


def test_transparent_pixels_become_the_fill_colour():
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([255, 0, 0] + [0, 0, 0] * 255)
    out = preprocess(encode(palette, "PNG", transparency=0), PRE)
    assert out[32, 32].tolist() == [255, 255, 255]


def test_truncated_and_empty_and_text_bytes_are_undecodable():
    data = encode(Image.new("RGB", (200, 200), (1, 2, 3)), "JPEG")
    for bad in (data[: len(data) // 2], b"", b"hello, not an image"):
        with pytest.raises(UndecodableImage):
            preprocess(bad, PRE)


def test_gif_is_refused_as_unsupported():
    with pytest.raises(UnsupportedImageFormat):
        preprocess(encode(Image.new("P", (10, 10)), "GIF"), PRE)


def test_a_pixel_bomb_is_refused_before_decoding():
    data = encode(Image.new("1", (20000, 20000)), "PNG")  # tiny file, 400 M pixels
    with pytest.raises(ImageTooLarge, match="pixels"):
        preprocess(data, PRE, DecodeLimits(max_pixels=50_000_000))


def test_too_many_bytes_is_refused():
    with pytest.raises(ImageTooLarge):
        preprocess(b"x" * 101, PRE, DecodeLimits(max_bytes=100))


def test_normalize_matches_mean_and_std():
    batch = np.full((1, 2, 2, 3), 255, np.uint8)
    out = normalize(batch, PRE)
    np.testing.assert_allclose(out[0, :, 0, 0], (1 - np.array(PRE.mean)) / np.array(PRE.std), rtol=1e-6)


def test_preprocessing_round_trips_through_a_dict_and_rejects_bad_values():
    assert Preprocessing.from_dict(PRE.to_dict()) == PRE
    with pytest.raises(ValueError, match="resize_mode"):
        Preprocessing(resize_mode="stretch")


def _product_on_white(size=(400, 600), box=(150, 250, 250, 350), colour=(200, 30, 30)) -> bytes:
    image = Image.new("RGB", size, (250, 250, 250))
    image.paste(colour, box)
    return encode(image, "PNG")


def test_trim_makes_a_small_product_fill_the_input():
    pre = Preprocessing(image_size=64, trim=24)
    out = preprocess(_product_on_white(), pre)
    red = (out[..., 0] > 150) & (out[..., 1] < 100)
    assert red.mean() > 0.8  # without trim the 100×100 square would cover about 3 % of a 400×600 letterbox
    untrimmed = preprocess(_product_on_white(), Preprocessing(image_size=64))
    assert ((untrimmed[..., 0] > 150) & (untrimmed[..., 1] < 100)).mean() < 0.1


def test_trim_leaves_photos_without_a_plain_background_alone():
    noise = np.random.default_rng(0).integers(0, 255, (120, 80, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "PNG")
    trimmed = preprocess(data, Preprocessing(image_size=64, trim=24, interpolation="nearest"))
    plain = preprocess(data, Preprocessing(image_size=64, interpolation="nearest"))
    np.testing.assert_array_equal(trimmed, plain)


def test_trim_round_trips_through_the_metadata_dict():
    pre = Preprocessing(image_size=96, trim=24)
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    with pytest.raises(ValueError, match="trim"):
        Preprocessing(trim=300)
