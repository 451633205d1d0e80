"""``mmflow decode TOKENS --rows ... --out DIR``: rows of a token table back to pictures.

``TOKENS`` is a ``pretokenize`` output folder (local or ``s3://``). The VQ-GAN is found
from the table's own metadata: the model folder at ``mmflow.vqgan_uri`` when it is
still there, else the registered model (``mmflow.vqgan_registered_model`` /
``_version``) from the MLflow registry at ``--tracking-uri``. Rows are numbered as
pyarrow and pandas read the folder (files in name order), which is the input order;
``--keys`` picks rows by sample key instead.

Writes ``{row:06d}_{key}.png`` per row and ``contact_sheet.png`` (captions under the
pictures) into ``--out``, and returns what it wrote.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

DEFAULT_ROWS = "0-15"


@dataclass
class Decoded:
    row: int
    key: str
    caption: str
    image: Any  # PIL image


def parse_rows(spec: str) -> list[int]:
    """``0-15,20,30-31`` -> [0, ..., 15, 20, 30, 31] (ranges inclusive)."""
    rows: list[int] = []
    for part in (s.strip() for s in spec.split(",") if s.strip()):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad row spec {part!r}: use numbers and ranges like 0-15,20")
        rows.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    return rows


def open_table(uri: str):
    """(pyarrow dataset over the table's files in name order, its ``mmflow.*`` metadata), of a
    table that names its VQ-GAN."""
    from mmflow.data.token_table import open_table as open_any

    dataset, meta, _ = open_any(uri)
    if "vqgan_uri" not in meta:
        raise ValueError(
            f"{uri}: the table's metadata names no VQ-GAN (not written by pretokenize?)"
        )
    return dataset, meta


def load_table_vqgan(meta: dict[str, str], tracking_uri: str | None = None, device: str = "cpu"):
    """The VQ-GAN a table was encoded with: its folder, else its registered MLflow model."""
    from mmflow.io.cache import materialize
    from mmflow.models.vqgan import load_vqgan
    from mmflow.storage import Storage

    uri = meta["vqgan_uri"]
    if Storage().exists(uri):
        return load_vqgan(materialize(uri), device)[0]
    name, version = meta.get("vqgan_registered_model"), meta.get("vqgan_registered_version")
    if not (name and version):
        raise FileNotFoundError(
            f"the VQ-GAN folder {uri} is gone and the table names no registered model"
        )
    from mmflow.config import resolve_tracking_uri

    registry = resolve_tracking_uri(tracking_uri)
    try:
        from mmflow.export.mlflow import download_registered

        return load_vqgan(download_registered(name, version, registry), device)[0]
    except Exception as e:
        raise FileNotFoundError(
            f"the VQ-GAN folder {uri} is gone, and registered model {name} v{version} is not in "
            f"{registry} ({type(e).__name__}); pass --tracking-uri of the pipeline's MLflow"
        ) from e


def decode_rows(
    uri: str,
    rows: list[int] | None = None,
    keys: list[str] | None = None,
    tracking_uri: str | None = None,
    device: str | None = None,
) -> list[Decoded]:
    """Decode the given rows (or keys) of the token table at ``uri``."""
    import numpy as np
    import pyarrow.compute as pc
    import torch

    from mmflow.models.vqgan import to_pil

    dataset, meta = open_table(uri)
    columns = ["key", "caption", "image_tokens", "grid_h", "grid_w"]
    if keys is not None:
        table = dataset.to_table(columns=columns, filter=pc.field("key").isin(keys))
        order = {k: i for i, k in enumerate(table["key"].to_pylist())}
        missing = [k for k in keys if k not in order]
        if missing:
            raise KeyError(f"keys not in the table: {missing[:10]}")
        all_keys = dataset.to_table(columns=["key"])["key"].to_pylist()
        position = {k: i for i, k in enumerate(all_keys)}
        picked = [(position[k], order[k]) for k in keys]
    else:
        total = dataset.count_rows()
        bad = [r for r in rows or [] if not 0 <= r < total]
        if bad:
            raise IndexError(f"rows {bad[:10]} out of range: the table has {total} rows")
        table = dataset.take(list(rows or []), columns=columns)
        picked = [(r, i) for i, r in enumerate(rows or [])]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_table_vqgan(meta, tracking_uri, device)
    out = []
    for start in range(0, len(picked), 64):
        chunk = picked[start : start + 64]
        tokens = np.stack(
            [
                np.asarray(table["image_tokens"][i].as_py(), np.int64).reshape(
                    table["grid_h"][i].as_py(), table["grid_w"][i].as_py()
                )
                for _, i in chunk
            ]
        )
        with torch.inference_mode():
            images = model.decode_tokens(torch.from_numpy(tokens).to(device))  # (b, 3, H, W)
        for (row, i), img in zip(chunk, images, strict=True):
            out.append(
                Decoded(
                    row, table["key"][i].as_py(), table["caption"][i].as_py() or "", to_pil(img)
                )
            )
    return out


def contact_sheet_of(decoded: list[Decoded]):
    from mmflow.data.images import contact_sheet

    return contact_sheet(
        [d.image for d in decoded],
        [f"#{d.row} {d.key}: {d.caption}" for d in decoded],
        cols=8,
        caption_lines=3,
    )


def decode(
    uri: str,
    out_dir: str,
    rows: str | None = DEFAULT_ROWS,
    keys: list[str] | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """The CLI's work: decode, write one PNG per row and the contact sheet; returns a summary."""
    decoded = decode_rows(
        uri, None if keys else parse_rows(rows or DEFAULT_ROWS), keys, tracking_uri
    )
    os.makedirs(out_dir, exist_ok=True)
    files = []
    for d in decoded:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in d.key)
        path = os.path.join(out_dir, f"{d.row:06d}_{safe}.png")
        d.image.save(path)
        files.append(path)
    sheet = os.path.join(out_dir, "contact_sheet.png")
    contact_sheet_of(decoded).save(sheet)
    return {
        "rows": [d.row for d in decoded],
        "keys": [d.key for d in decoded],
        "files": files,
        "contact_sheet": sheet,
    }
