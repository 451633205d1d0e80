"""``ingest_urls``: download a URL list into img2dataset shards on Ray, and nothing can stall it.

    url_list (Parquet / CSV / TSV / JSONL / txt; file, folder or glob; local or s3://)
      -> driver: read as a stream, cut into shard inputs of ``samples_per_shard`` rows (_work/)
      -> one Ray task per shard (map_shards: finished shards are skipped on a rerun)
           -> ``threads`` threads: fetch (deadline per attempt, retries) -> decode, resize, encode
           -> ShardWriter: {shard}.tar + {shard}.parquet (every row) + {shard}_stats.json (last)

The output is img2dataset's layout, keys included (shard number then row number, zero-padded
as img2dataset does), so a row gets the same key on every run. Every input row has a Parquet
row; a failure has ``status`` ``failed_to_download`` or ``failed_to_resize`` (img2dataset's)
and an ``error_message`` that starts with its kind (``http_404: ...``, ``timeout: ...``), which
the metrics count. ``retry_failed_from`` reruns only the failed rows of an earlier ingest of the
same list and copies its successes, bytes untouched (see docs/ingest.md).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections import Counter
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mmflow.data.http_fetch import FetchOptions
from mmflow.data.ingest_images import ImageOptions
from mmflow.data.ingest_shard import RETRY_KINDS, ShardConfig, ShardJob, ingest_shard
from mmflow.data.ingest_sources import (
    ERROR,
    HASH,
    ListSpec,
    expand_uris,
    file_size,
    split_url_list,
)
from mmflow.data.preview import log_preview
from mmflow.data.shards import BASE_COLUMNS, map_shards, shard_name
from mmflow.params import required_field, required_text
from mmflow.stage import MANIFEST, Params, Resources, Stage, StageContext, register
from mmflow.storage import join

LIST_EXTS = (".parquet", ".pq", ".csv", ".tsv", ".jsonl", ".json", ".ndjson", ".txt", ".gz")
SPLIT_MARKER = "_SPLIT.json"


NO_URL_LIST = (
    "no URL list: set url_list to a Parquet/CSV/TSV/JSONL file, a folder or a glob, "
    "e.g. --set STAGE.params.url_list=s3://bucket/laion/*.parquet"
)


class IngestUrlsParams(Params):
    # -- the list
    url_list: str | None = required_field(
        "Parquet/CSV/TSV/JSONL/txt file, folder or glob, or s3://"
    )
    input_format: Literal["auto", "parquet", "csv", "tsv", "jsonl", "txt"] = Field(
        "auto", description="auto: from each file's extension (.gz allowed for text formats)"
    )
    url_col: str = Field("url", description="column holding the URL (LAION: URL)")
    caption_col: str | None = Field(
        "caption", description="column holding the caption (LAION: TEXT); null: none"
    )
    extra_columns: list[str] = Field(
        default_factory=list, description="input columns to keep in the parquet and json"
    )
    column_names: list[str] | None = Field(
        None, description="column names for a CSV/TSV without a header line (CC12M: [url, caption])"
    )
    samples_per_shard: int = Field(10_000, ge=1, le=1_000_000, description="rows per shard")
    # -- fetching
    threads: int = Field(
        64,
        ge=1,
        le=2048,
        exclude=True,  # how fast, not what: outside the fingerprint, so changing it resumes
        description="concurrent downloads per shard task (not part of the fingerprint)",
    )
    timeout: float = Field(10.0, gt=0, description="seconds per attempt, connect to last byte")
    retries: int = Field(2, ge=0, le=10, description="extra attempts after a transient failure")
    retry_backoff: float = Field(1.0, ge=0, description="seconds before the first retry; doubles")
    user_agent_token: str | None = Field(
        "mmflow", description="our name in the User-Agent and in X-Robots-Tag scoping"
    )
    user_agent: str | None = Field(None, description="the whole User-Agent header (overrides)")
    max_bytes: int = Field(32 << 20, ge=1024, description="largest response body accepted")
    max_redirects: int = Field(5, ge=0, le=30)
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"],
        description="X-Robots-Tag directives that opt an image out; [] ignores the header",
    )
    verify_tls: bool = Field(True, description="check HTTPS certificates")
    refuse_private_addresses: bool = Field(
        True,
        description="refuse URLs (and redirects) whose host resolves to a loopback, private, "
        "link-local or cloud-metadata address, checked on every hop before connecting",
    )
    allow_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs exempt from refuse_private_addresses (an internal CDN, say)",
    )
    # -- images
    image_size: int = Field(256, ge=8, le=16384, description="target side for resize_mode")
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = Field(
        "border", description="img2dataset's modes"
    )
    resize_only_if_bigger: bool = Field(False, description="never enlarge")
    downscale_interpolation: Literal["area", "bilinear", "bicubic", "lanczos"] = "area"
    upscale_interpolation: Literal["area", "bilinear", "bicubic", "lanczos"] = "lanczos"
    min_image_size: int = Field(0, ge=0, description="reject images whose smaller side is below")
    max_aspect_ratio: float | None = Field(None, ge=1.0, description="reject longer/shorter above")
    max_pixels: int = Field(89_478_485, ge=1, description="reject larger images before decoding")
    max_pixels_in_flight: int = Field(
        1 << 28,
        ge=1,
        exclude=True,  # memory, not what is made: outside the fingerprint
        description="decoded pixels a shard task's threads hold at once (2^28: about 1 GB of "
        "RGBA); an image larger than this runs alone",
    )
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=1, le=100, description="jpg and webp quality")
    keep_original: bool = Field(
        False, description="store downloaded bytes as they are when no resize/rotation is needed"
    )
    extract_exif: bool = Field(True, description="fill the exif column")
    hash_col: str | None = Field(None, description="input column with a hash of the image bytes")
    hash_type: Literal["sha256", "md5", "sha1"] = "sha256"
    # -- reruns
    retry_failed_from: str | None = Field(
        None,
        description="shards folder of an earlier ingest of the same list: reuse its successes, "
        "refetch its failed rows of retry_kinds",
    )
    retry_kinds: list[str] = Field(
        default_factory=lambda: list(RETRY_KINDS),
        description="error kinds to refetch with retry_failed_from (http_5xx: any 5xx; all)",
    )
    shard_retries: int = Field(2, ge=0, le=10, description="reruns of a shard that raised or died")
    preview: int = Field(32, ge=0, le=256, description="images in the MLflow grid")

    @field_validator("allow_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        import ipaddress

        for net in v:
            ipaddress.ip_network(net, strict=False)  # ValueError names the bad one
        return v

    @field_validator("url_list")
    @classmethod
    def _required(cls, v: str | None) -> str:
        return required_text(v, NO_URL_LIST)

    @model_validator(mode="after")
    def _columns(self) -> IngestUrlsParams:
        reserved = set(BASE_COLUMNS) | {HASH, ERROR}
        clash = reserved & set(self.extra_columns)
        if clash:
            raise ValueError(f"extra_columns may not use the output's own names: {sorted(clash)}")
        named = [self.url_col, self.caption_col, self.hash_col]
        if len({c for c in named if c}) < len([c for c in named if c]):
            raise ValueError("url_col, caption_col and hash_col must be different columns")
        return self

    def list_spec(self) -> ListSpec:
        return ListSpec(
            self.url_col,
            self.caption_col,
            tuple(c for c in self.extra_columns if c not in (self.url_col, self.caption_col)),
            self.hash_col,
            self.input_format,
            tuple(self.column_names) if self.column_names else None,
        )

    def shard_config(self) -> ShardConfig:
        token = self.user_agent_token
        agent = self.user_agent or (
            f"Mozilla/5.0 (compatible; {token}/1.0; image-text dataset builder)"
            if token
            else "Mozilla/5.0 (compatible; image-text dataset builder)"
        )
        fetch = FetchOptions(
            timeout=self.timeout,
            retries=self.retries,
            retry_backoff=self.retry_backoff,
            user_agent=agent,
            user_agent_token=token,
            max_bytes=self.max_bytes,
            max_redirects=self.max_redirects,
            disallowed_directives=tuple(self.disallowed_header_directives),
            verify_tls=self.verify_tls,
            refuse_private_addresses=self.refuse_private_addresses,
            allow_networks=tuple(self.allow_networks),
        )
        return ShardConfig(
            self.samples_per_shard,
            self.threads,
            fetch,
            self.image_options(),
            self.hash_type,
            tuple(self.retry_kinds),
            self.shard_retries,
            self.max_pixels_in_flight,
        )

    def image_options(self) -> ImageOptions:
        return ImageOptions(
            image_size=self.image_size,
            resize_mode=self.resize_mode,
            resize_only_if_bigger=self.resize_only_if_bigger,
            downscale_filter=self.downscale_interpolation,
            upscale_filter=self.upscale_interpolation,
            encode_format=self.encode_format,
            encode_quality=self.encode_quality,
            keep_original=self.keep_original,
            min_image_size=self.min_image_size,
            max_aspect_ratio=self.max_aspect_ratio,
            max_pixels=self.max_pixels,
            extract_exif=self.extract_exif,
        )


@register
class IngestUrls(Stage):
    type = "ingest_urls"
    version = "1"
    description = "Download a URL list (LAION/DataComp/CC12M metadata) into img2dataset shards."
    Params = IngestUrlsParams
    outputs = {"shards": "shards"}
    resources = Resources(cpus=1, workers=0)  # per shard task; workers=0: as many as fit
    resumable = True  # finished shards are kept and skipped; list cuts live in _work

    def run(self, ctx: StageContext) -> None:
        p: IngestUrlsParams = ctx.params
        folder = ctx.outputs["shards"]
        ctx.storage.makedirs(folder)
        if p.retry_failed_from:
            check_previous(ctx, p)
        start = time.monotonic()
        split = plan_shards(ctx, p)
        planned = time.monotonic()
        job = ShardJob(
            ctx.work("input"), folder, p.retry_failed_from, p.shard_config(), ctx.storage
        )
        stats = map_shards(
            ingest_shard,
            list(range(split["num_shards"])),
            folder,
            args=(job,),
            **ctx.resources.shard_tasks(),
            max_retries=p.shard_retries,
            desc=ctx.stage,
            samples_per_shard=p.samples_per_shard,
            num_samples=split["num_rows"],
            storage=ctx.storage,
        )
        report(ctx, p, stats, split_s=planned - start, download_s=time.monotonic() - planned)


def plan_shards(ctx: StageContext, p: IngestUrlsParams) -> dict[str, Any]:
    """Cut the list into shard inputs under ``_work/input``, or reuse the cut of an earlier attempt."""
    uris, missing = expand_uris(ctx.storage, p.url_list, LIST_EXTS)
    if missing:
        raise FileNotFoundError(f"url_list: not found: {', '.join(missing[:10])}")
    if not uris:
        raise FileNotFoundError(f"url_list {p.url_list!r} matches no files")
    sources = [{"uri": u, "size": file_size(u)} for u in uris]
    marker = ctx.work("input", SPLIT_MARKER)
    done = ctx.storage.read_json_if_exists(marker)
    if done is not None:
        if done["sources"] != sources:
            raise RuntimeError(
                f"url_list changed since the interrupted attempt ({p.url_list}); its finished "
                f"shards would mix two lists: delete {os.path.dirname(ctx.work_uri)} and rerun"
            )
        print(f"[{ctx.stage}] resuming: {done['num_shards']} shard inputs already cut", flush=True)
        return done
    print(f"[{ctx.stage}] reading {len(uris)} list file(s) from {p.url_list}", flush=True)
    info = split_url_list(ctx.storage, uris, p.list_spec(), p.samples_per_shard, ctx.work("input"))
    if info.num_rows == 0:
        raise ValueError(f"url_list {p.url_list!r} has no rows")
    split = {"num_rows": info.num_rows, "num_shards": info.num_shards, "sources": sources}
    ctx.storage.write_json(marker, split)
    print(f"[{ctx.stage}] {info.num_rows} URLs in {info.num_shards} shards", flush=True)
    return split


IMAGE_PARAMS = (
    "samples_per_shard",
    "image_size",
    "resize_mode",
    "resize_only_if_bigger",
    "encode_format",
    "encode_quality",
    "keep_original",
)


def check_previous(ctx: StageContext, p: IngestUrlsParams) -> None:
    """``retry_failed_from`` must hold shards, made with the same image settings when we know them."""
    prev = p.retry_failed_from
    if not any(f.name.endswith(".parquet") for f in ctx.storage.ls(prev)):
        raise FileNotFoundError(f"retry_failed_from: no shard index (*.parquet) in {prev}")
    manifest = ctx.storage.read_json_if_exists(join(os.path.dirname(prev.rstrip("/")), MANIFEST))
    if manifest is None:  # e.g. img2dataset's own output: keys and URLs are still checked
        print(f"[{ctx.stage}] reusing the successes of {prev} (no mmflow manifest)", flush=True)
        return
    old = manifest.get("params", {})
    differ = [k for k in IMAGE_PARAMS if k in old and old[k] != getattr(p, k)]
    if differ:
        raise ValueError(
            f"retry_failed_from={prev} was made with other {', '.join(differ)} "
            f"({', '.join(f'{k}={old[k]!r}' for k in differ)}); its images would not match"
        )
    print(f"[{ctx.stage}] reusing the successes of {prev}", flush=True)


def report(
    ctx: StageContext, p: IngestUrlsParams, stats: list[dict], split_s: float, download_s: float
) -> None:
    """Counts, error kinds and messages, rates and bytes into MLflow and the manifest; a grid."""
    rows = sum(s["count"] for s in stats)
    ok = sum(s["successes"] for s in stats)
    kinds = sum((Counter(s.get("error_counts", {})) for s in stats), Counter())
    messages = sum((Counter(s.get("top_errors", {})) for s in stats), Counter())
    top = [{"message": m, "count": n} for m, n in messages.most_common(20)]
    total = lambda k: sum(s.get(k, 0) for s in stats)  # noqa: E731
    metrics = {
        "num_rows": rows,
        "num_samples": ok,
        "success_rate": ok / max(rows, 1),
        "failed_to_download": total("failed_to_download"),
        "failed_to_resize": total("failed_to_resize"),
        "samples_per_s": ok / max(download_s, 1e-9),
        "rows_per_s": rows / max(download_s, 1e-9),
        "bytes": total("bytes"),
        "downloaded_bytes": total("downloaded_bytes"),
        "reused": total("reused"),
        "stalled": total("stalled"),
        "split_s": split_s,
        "download_s": download_s,
        **{f"errors.{_metric_name(k)}": v for k, v in sorted(kinds.items())},
    }
    ctx.log_metrics(metrics)
    ctx.record_output(
        "shards",
        num_samples=ok,
        num_rows=rows,
        num_shards=len(stats),
        shards=[f"{shard_name(i)}.tar" for i in range(len(stats))],
        format="img2dataset",
        error_counts=dict(kinds),
        top_errors=top,
        download_threads=p.threads,
    )
    _log_json(ctx, {"error_counts": dict(kinds), "top_errors": top}, "ingest_errors.json")
    print(
        f"[{ctx.stage}] {ok}/{rows} downloaded ({100 * ok / max(rows, 1):.1f}%) in "
        f"{download_s:.0f}s, {ok / max(download_s, 1e-9):.1f} samples/s; errors: "
        + (", ".join(f"{k}={v}" for k, v in kinds.most_common(8)) or "none"),
        flush=True,
    )
    if p.preview and ok:
        log_preview(ctx, ctx.outputs["shards"], p.preview)


def _log_json(ctx: StageContext, obj: Any, name: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, name)
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)
        ctx.log_artifact(path)


def _metric_name(kind: str) -> str:
    """MLflow takes letters, digits and ``_-./ `` in names; a copied message may hold others."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", kind).strip("_")[:60] or "unknown"
