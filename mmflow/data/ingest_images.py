"""Downloaded bytes -> a stored image: validate, orient, convert to RGB, resize, encode.

The order matters for safety and speed:

1. ``Image.open`` reads only the header, restricted to web image formats (no EPS, which would
   run Ghostscript). The pixel count is checked *before* decoding, so a 50,000 x 50,000 PNG of
   a few kilobytes (a decompression bomb) is rejected without allocating 7 GB.
2. JPEGs that will be shrunk are decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling,
   ``draft``), never below the target size: most web photos are much larger than the training
   size, and this is where most of the decode time goes.
3. A truncated or corrupt file fails the decode (``truncated_image`` / ``corrupt_image``); it is
   never stored half grey.
4. EXIF orientation is applied, transparency is flattened onto white, the image is resized per
   ``resize_mode`` (img2dataset's modes and defaults: area filter to shrink, Lanczos to enlarge)
   and encoded.

Failures raise :class:`ImageError` with a ``kind`` for the metrics.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from dataclasses import dataclass
from typing import Literal

from PIL import ExifTags, Image, ImageOps

from mmflow.data.ingest_pool import PixelBudget

ResizeMode = Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]
Image.init()
# What the web serves (the JPEG plugin also opens MPO); never EPS & co, whose plugins run tools.
FORMATS = tuple(f for f in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF") if f in Image.OPEN)
KEEPABLE = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # what downstream readers take as is
FILTERS = {
    "area": Image.Resampling.BOX,  # box over the covered source pixels = OpenCV's INTER_AREA
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
WHITE = (255, 255, 255)

# The pixel limit below is ours; PIL's own bomb warning would only repeat it, once per image.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# PIL warns about odd-but-readable palettes and EXIF blocks; web data is full of them.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


class ImageError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind, self.message = kind, message


@dataclass(frozen=True)
class ImageOptions:
    image_size: int = 256
    resize_mode: ResizeMode = "border"
    resize_only_if_bigger: bool = False
    downscale_filter: str = "area"
    upscale_filter: str = "lanczos"
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = 95  # jpg and webp; png is lossless
    keep_original: bool = False  # store the downloaded bytes when nothing would change them
    min_image_size: int = 0  # smaller side, in pixels, before resizing
    max_aspect_ratio: float | None = None  # longer side / shorter side
    max_pixels: int = 89_478_485  # PIL's own default limit (about 0.25 GB of RGBA)
    extract_exif: bool = True


@dataclass
class StoredImage:
    data: bytes
    ext: str
    width: int
    height: int
    original_width: int  # after EXIF orientation, as img2dataset reports it
    original_height: int
    exif: str | None  # JSON of the EXIF tags, img2dataset's ``exif`` column


def process_image(data: bytes, o: ImageOptions, budget: PixelBudget | None = None) -> StoredImage:
    """``data`` -> the stored image; with ``budget``, its decoded pixels are held from it while
    it is decoded, resized and encoded (see ``ingest_pool.PixelBudget``)."""
    img = _open(data, o)
    orientation = _orientation(img)
    w, h = img.size if orientation < 5 else img.size[::-1]  # 5-8 swap the axes
    _check_size(w, h, o)
    target, crop = _target_size(w, h, o)
    keep = (
        o.keep_original
        and target == (w, h)
        and orientation == 1
        and img.format in KEEPABLE
        and img.mode == "RGB"
    )
    if img.format in ("JPEG", "MPO") and target != (w, h):
        tw, th = target if orientation < 5 else target[::-1]
        img.draft(None, (tw, th))  # decode at the smallest DCT scale not below the target
    exif = _exif_json(img) if o.extract_exif else None
    with budget.hold(img.size[0] * img.size[1]) if budget else contextlib.nullcontext():
        _decode(img)  # the size after draft: what is decoded
        if keep:
            return StoredImage(data, KEEPABLE[img.format], w, h, w, h, exif)
        img = _to_rgb(ImageOps.exif_transpose(img) if orientation != 1 else img)
        img = _resize(img, target, crop, o)
        return StoredImage(_encode(img, o), o.encode_format, *img.size, w, h, exif)


def check_image(data: bytes, max_pixels: int = ImageOptions.max_pixels) -> tuple[int, int]:
    """Raise :class:`ImageError` unless ``data`` decodes whole; returns (width, height).

    JPEGs decode at 1/8 scale: every byte of entropy-coded data is still read, so a truncated
    file still fails, at a fraction of the cost."""
    img = _open(data, ImageOptions(max_pixels=max_pixels))
    size = img.size
    if img.format in ("JPEG", "MPO"):
        img.draft(None, (max(1, size[0] // 8), max(1, size[1] // 8)))
    _decode(img)
    return size


def open_image(data: bytes, max_pixels: int = ImageOptions.max_pixels) -> Image.Image:
    """The header only, with ingest's checks: web formats (never EPS & co), at most
    ``max_pixels`` pixels; raises :class:`ImageError`. Decoding is left to the caller."""
    return _open(data, ImageOptions(max_pixels=max_pixels))


def _open(data: bytes, o: ImageOptions) -> Image.Image:
    if not data:
        raise ImageError("not_image", "empty body")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as e:
        raise ImageError("decompression_bomb", str(e)[:200]) from None
    except Image.UnidentifiedImageError:
        head = data[:64].lstrip().lower()
        what = "HTML" if head.startswith((b"<!doctype html", b"<html")) else "unknown"
        # never the bytes themselves: a body is untrusted, and messages go to Parquet and MLflow
        raise ImageError("not_image", f"{what} content, not a supported image") from None
    except (OSError, SyntaxError, ValueError) as e:  # a broken header
        raise ImageError("corrupt_image", f"{type(e).__name__}: {e}"[:200]) from None
    if img.size[0] * img.size[1] > o.max_pixels:
        raise ImageError(
            "decompression_bomb",
            f"{img.size[0]}x{img.size[1]} pixels > max_pixels {o.max_pixels}",
        )
    if img.size[0] < 1 or img.size[1] < 1:
        raise ImageError("corrupt_image", f"empty image {img.size}")
    return img


def _orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # a malformed EXIF block must not sink a readable image
        return 1
    return value if 1 <= value <= 8 else 1


def _check_size(w: int, h: int, o: ImageOptions) -> None:
    if min(w, h) < o.min_image_size:
        raise ImageError("too_small", f"{w}x{h} is under min_image_size {o.min_image_size}")
    if o.max_aspect_ratio and max(w, h) / min(w, h) > o.max_aspect_ratio:
        raise ImageError(
            "bad_aspect_ratio", f"{w}x{h} is beyond max_aspect_ratio {o.max_aspect_ratio:g}"
        )


def _target_size(w: int, h: int, o: ImageOptions) -> tuple[tuple[int, int], bool]:
    """(size to resize to, whether to then center-crop / pad to a square)."""
    if o.resize_mode == "no":
        return (w, h), False
    side = min(w, h) if o.resize_mode in ("keep_ratio", "center_crop") else max(w, h)
    scale = o.image_size / side
    if o.resize_only_if_bigger and scale >= 1:
        return (w, h), False
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return size, o.resize_mode in ("center_crop", "border")


def _decode(img: Image.Image) -> None:
    try:
        img.load()
    except Image.DecompressionBombError as e:
        raise ImageError("decompression_bomb", str(e)[:200]) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        kind = "truncated_image" if "truncated" in str(e).lower() else "corrupt_image"
        raise ImageError(kind, f"{type(e).__name__}: {e}"[:200]) from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        flat = Image.new("RGB", rgba.size, WHITE)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: scale to 8 bits, not clip
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


def _resize(
    img: Image.Image, target: tuple[int, int], square: bool, o: ImageOptions
) -> Image.Image:
    if img.size != target:
        shrink = target[0] * target[1] < img.size[0] * img.size[1]
        resample = FILTERS[o.downscale_filter if shrink else o.upscale_filter]
        img = img.resize(target, resample)
    if not square:
        return img
    s = o.image_size
    if o.resize_mode == "center_crop":
        left, top = (img.size[0] - s) // 2, (img.size[1] - s) // 2
        return img.crop((left, top, left + s, top + s))
    canvas = Image.new("RGB", (s, s), WHITE)  # border: pad the longer-side-fitted image
    canvas.paste(img, ((s - img.size[0]) // 2, (s - img.size[1]) // 2))
    return canvas


def _encode(img: Image.Image, o: ImageOptions) -> bytes:
    buf = io.BytesIO()
    if o.encode_format == "jpg":
        img.save(buf, format="JPEG", quality=o.encode_quality)
    elif o.encode_format == "webp":
        img.save(buf, format="WEBP", quality=o.encode_quality)
    else:
        img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _exif_json(img: Image.Image) -> str:
    """The EXIF tags as img2dataset stores them: a JSON object of name -> text."""
    try:
        exif = img.getexif()
        tags = {f"Image {_tag(k)}": v for k, v in exif.items()}
        tags.update({f"EXIF {_tag(k)}": v for k, v in exif.get_ifd(ExifTags.IFD.Exif).items()})
        return json.dumps({k: _text(v) for k, v in tags.items() if v is not None})
    except Exception:  # malformed EXIF is common and never a reason to drop the image
        return "{}"


def _tag(k: int) -> str:
    return ExifTags.TAGS.get(k, f"Tag{k:#06x}")


def _text(v: object) -> str:
    if isinstance(v, bytes):
        return v[:64].decode("latin-1", "replace").strip("\x00 ")
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return str(v).strip()[:256]
