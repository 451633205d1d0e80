"""preview_grid: thumbnails of whole samples only, web formats only, never an error."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from mmflow.data.preview import log_preview, preview_grid
from mmflow.storage import Storage
from tests.data.test_webdataset_io import end, member

EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 10 10
%%EndComments
newpath 0 0 moveto 10 10 lineto stroke
showpage
%%EOF
"""


def png(size=(40, 30), color=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def big_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (3000, 2000), (20, 200, 20)).save(buf, "JPEG", quality=50)
    return buf.getvalue()


@pytest.fixture
def shards(tmp_path):
    """A shards folder as an import with ``check_images: false`` leaves it: non-images stored."""
    samples = [
        ("000000000", png()),
        ("000000001", EPS),  # EPS: PIL would render it with Ghostscript
        ("000000002", b"<html><body>not an image</body></html>"),
        ("000000003", png()[:60]),  # truncated
        ("000000004", big_jpeg()),
        ("000000005", png(color=(0, 0, 250))),
    ]
    parts = [
        member(f"{k}.jpg", data) + member(f"{k}.txt", f"cap {k}".encode()) for k, data in samples
    ]
    (tmp_path / "00000.tar").write_bytes(b"".join(parts) + end())
    return str(tmp_path)


def test_bad_pictures_are_skipped_with_a_warning(shards, monkeypatch, capsys):
    from PIL import EpsImagePlugin

    def no_ghostscript(*a, **k):
        raise AssertionError("EPS was rendered with Ghostscript")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_ghostscript)
    grid = preview_grid(Storage(), shards, 32)
    assert grid is not None and grid.mode == "RGB"
    err = capsys.readouterr().err
    for key in ("000000001", "000000002", "000000003"):
        assert f"preview skips {key}" in err, err
    assert "000000000" not in err and "000000004" not in err and "000000005" not in err
    # three pictures, in a 2-column grid of 96 px cells
    assert grid.size[0] == 2 * (96 + 4) + 4


def test_thumbnails_only(shards, monkeypatch):
    """Every image handed to the sheet is a thumbnail, a large JPEG decoded small."""
    import mmflow.data.images as images

    seen = []
    real = images.contact_sheet

    def spy(imgs, *a, **k):
        seen.extend(i.size for i in imgs)
        return real(imgs, *a, **k)

    monkeypatch.setattr(images, "contact_sheet", spy)
    preview_grid(Storage(), shards, 32)
    assert len(seen) == 3 and all(max(s) <= 96 for s in seen), seen


def test_never_raises(tmp_path, capsys):
    (tmp_path / "00000.tar").write_bytes(b"not a tar")
    assert preview_grid(Storage(), str(tmp_path), 8) is None

    class Ctx:
        storage, stage = Storage(), "s"

        def log_image(self, img, name):
            raise RuntimeError("tracking server down")

    log_preview(Ctx(), str(tmp_path / "missing"), 8)
    log_preview(Ctx(), str(tmp_path), 8)
    (tmp_path / "00001.tar").write_bytes(member("000000000.jpg", png()) + end())
    log_preview(Ctx(), str(tmp_path), 8)
    assert "tracking server down" in capsys.readouterr().err
