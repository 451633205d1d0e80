"""Pictures of a shards folder for MLflow: a contact sheet of its first samples."""

from __future__ import annotations

import math

from mmflow.data.shards import list_shards
from mmflow.storage import Storage


def preview_grid(storage: Storage, folder: str, n: int):
    """A contact sheet of the first ``n`` whole samples of a shards folder, with captions."""
    import io
    import itertools

    from PIL import Image

    from mmflow.data.images import contact_sheet
    from mmflow.data.webdataset_io import iter_shard

    samples = (
        s
        for uri in list_shards(storage, folder)
        for s in iter_shard(storage, uri)
        if s.error is None
    )
    first = list(itertools.islice(samples, n))
    images = [Image.open(io.BytesIO(s.image)).convert("RGB") for s in first]
    cols = min(8, max(1, math.ceil(math.sqrt(len(first)))))
    return contact_sheet(images, [s.caption or "" for s in first], cols=cols)
