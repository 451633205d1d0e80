"""Pictures of a shards folder for MLflow: a contact sheet of its first samples.

A picture is a nicety: it can never fail a stage. Each image is opened with ingest's checks
(web formats only, so never EPS through Ghostscript; the pixel limit read from the header),
decoded small (JPEG's DCT scaling via ``draft``) and shrunk to a thumbnail before the next one
is read, so the driver holds ``n`` thumbnails, not ``n`` full-size decodes. A sample that does
not make a thumbnail is skipped with a warning line.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from mmflow.data.shards import list_shards
from mmflow.storage import Storage

CELL = 96  # px: contact_sheet's cell


def preview_grid(storage: Storage, folder: str, n: int, max_pixels: int | None = None):
    """A contact sheet of the first ``n`` samples of a shards folder that make a thumbnail, with
    captions; None when there are none (or the folder cannot be read)."""
    from mmflow.data.images import contact_sheet
    from mmflow.data.webdataset_io import iter_shard

    thumbs, captions = [], []
    try:
        for uri in list_shards(storage, folder):
            for s in iter_shard(storage, uri):
                if len(thumbs) >= n:
                    break
                if s.error is not None:
                    continue
                thumb = _thumbnail(s.image, max_pixels, f"{s.key} in {uri}")
                if thumb is not None:
                    thumbs.append(thumb)
                    captions.append(s.caption or "")
            if len(thumbs) >= n:
                break
    except Exception as e:  # a shard that cannot be listed or read: draw what we have
        _warn(f"preview stops early: {type(e).__name__}: {e}"[:300])
    if not thumbs:
        return None
    cols = min(8, max(1, math.ceil(math.sqrt(len(thumbs)))))
    return contact_sheet(thumbs, captions, cols=cols, cell=CELL)


def log_preview(ctx: Any, folder: str, n: int, name: str = "samples") -> None:
    """``preview_grid`` into the stage's run as ``images/{name}.png``; never raises."""
    try:
        grid = preview_grid(ctx.storage, folder, n)
        if grid is not None:
            ctx.log_image(grid, name)
    except Exception as e:
        _warn(f"[{getattr(ctx, 'stage', '?')}] no preview picture: {type(e).__name__}: {e}"[:300])


def _thumbnail(data: bytes | None, max_pixels: int | None, where: str):
    from mmflow.data.ingest_images import ImageError, ImageOptions, open_image

    try:
        img = open_image(data or b"", max_pixels or ImageOptions.max_pixels)
        img.draft("RGB", (CELL, CELL))  # JPEG: decode at 1/2..1/8 scale; others: no-op
        img.thumbnail((CELL, CELL))
        return img.convert("RGB")
    except ImageError as e:
        _warn(f"preview skips {where}: {e.kind}")
    except Exception as e:  # a decoder's own error on a damaged file
        _warn(f"preview skips {where}: {type(e).__name__}"[:300])
    return None


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)
