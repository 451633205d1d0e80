"""ingest_images: img2dataset's resize modes, EXIF orientation, bombs and truncation rejected."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from mmflow.data.ingest_images import ImageError, ImageOptions, check_image, process_image
from tests.data.http_server import bomb_png, noisy_jpeg, png_rgba


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def decoded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@pytest.mark.parametrize(
    "mode,size",
    [
        ("border", (100, 100)),
        ("keep_ratio", (200, 100)),
        ("keep_ratio_largest", (100, 50)),
        ("center_crop", (100, 100)),
        ("no", (400, 200)),
    ],
)
def test_resize_modes(mode, size):
    src = encode(Image.new("RGB", (400, 200), (0, 0, 200)))
    out = process_image(src, ImageOptions(image_size=100, resize_mode=mode))
    assert (out.width, out.height) == size == decoded(out.data).size
    assert (out.original_width, out.original_height) == (400, 200) and out.ext == "jpg"
    if mode == "border":  # the fitted 100x50 image sits between white bands
        px = np.asarray(decoded(out.data))
        assert px[5, 50].min() > 240 and px[50, 50, 2] > 150 and px[50, 50, 0] < 60


def test_resize_only_if_bigger_leaves_small_images():
    src = encode(Image.new("RGB", (40, 30), "red"))
    out = process_image(src, ImageOptions(image_size=100, resize_only_if_bigger=True))
    assert (out.width, out.height) == (40, 30)


def test_large_jpeg_decoded_at_reduced_scale_matches_a_full_decode():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    big = Image.fromarray(base).resize((3200, 2400), Image.Resampling.BICUBIC)
    src = encode(big, quality=92)
    out = process_image(src, ImageOptions(image_size=256, resize_mode="keep_ratio_largest"))
    assert (out.width, out.height) == (256, 192)
    reference = Image.open(io.BytesIO(src)).convert("RGB").resize((256, 192), Image.Resampling.BOX)
    diff = np.abs(np.asarray(decoded(out.data), float) - np.asarray(reference, float)).mean()
    assert diff < 4.0


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    out = process_image(encode(img, exif=exif), ImageOptions(resize_mode="no"))
    assert (out.width, out.height) == (20, 40) == (out.original_width, out.original_height)
    px = np.asarray(decoded(out.data))
    assert px[3, 17, 0] > 200 and px[3, 17, 2] < 80  # stored top-left -> displayed top-right
    assert json.loads(out.exif)["Image Orientation"] == "6"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [12_000, 40_000])  # over our limit; also over PIL's own
def test_a_decompression_bomb_is_rejected_before_decoding(side):
    start = time.monotonic()
    with pytest.raises(ImageError) as e:
        process_image(bomb_png(side), ImageOptions())
    assert e.value.kind == "decompression_bomb"
    assert side > 12_000 or "12000x12000 pixels > max_pixels" in e.value.message
    assert time.monotonic() - start < 0.5  # the pixels were never allocated


@pytest.mark.parametrize("size", [None, 64])
def test_truncated_images_fail_instead_of_going_grey(size):
    data = noisy_jpeg(1)
    opts = ImageOptions(resize_mode="no") if size is None else ImageOptions(image_size=size)
    with pytest.raises(ImageError) as e:
        process_image(data[: len(data) * 6 // 10], opts)
    assert e.value.kind == "truncated_image"
    with pytest.raises(ImageError):
        check_image(data[: len(data) * 6 // 10])
    assert check_image(data) == (320, 240)


def test_html_and_empty_bodies_are_not_images():
    with pytest.raises(ImageError) as e:
        process_image(b"<!DOCTYPE html><html>hi</html>", ImageOptions())
    assert e.value.kind == "not_image" and "HTML" in e.value.message
    with pytest.raises(ImageError) as e:
        process_image(b"", ImageOptions())
    assert e.value.kind == "not_image"


def test_transparency_is_flattened_on_white():
    out = process_image(png_rgba(3), ImageOptions(resize_mode="no", encode_format="png"))
    img = decoded(out.data)
    assert img.mode == "RGB" and out.ext == "png"
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((10, 10)) == (0, 0, 255)


def test_keep_original_stores_the_bytes_only_when_nothing_changes():
    src = encode(Image.new("RGB", (30, 20), "green"))
    kept = process_image(src, ImageOptions(resize_mode="no", keep_original=True))
    assert kept.data == src and kept.ext == "jpg"
    resized = process_image(src, ImageOptions(image_size=10, keep_original=True))
    assert resized.data != src and resized.width == 10
    rgba = process_image(png_rgba(1), ImageOptions(resize_mode="no", keep_original=True))
    assert rgba.data != png_rgba(1) and rgba.ext == "jpg"


def test_size_and_aspect_filters():
    src = encode(Image.new("RGB", (300, 20), "green"))
    with pytest.raises(ImageError) as e:
        process_image(src, ImageOptions(min_image_size=32))
    assert e.value.kind == "too_small"
    with pytest.raises(ImageError) as e:
        process_image(src, ImageOptions(max_aspect_ratio=3.0))
    assert e.value.kind == "bad_aspect_ratio"


@pytest.mark.parametrize("fmt,pil", [("webp", "WEBP"), ("png", "PNG"), ("jpg", "JPEG")])
def test_encode_formats(fmt, pil):
    src = encode(Image.new("RGB", (64, 48), "orange"), "PNG")
    out = process_image(src, ImageOptions(image_size=32, encode_format=fmt))
    assert decoded(out.data).format == pil and out.ext == fmt and decoded(out.data).size == (32, 32)
