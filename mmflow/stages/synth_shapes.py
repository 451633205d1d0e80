"""``synth_shapes``: the embedded default dataset, drawn procedurally.

Each image holds one or two shapes (circle, square, triangle, diamond) of a
colour and size at a position on a plain background; its caption comes from a
varied set of templates (the vocabulary and templates live in
``mmflow.data.shapes_vocab``). A ``mismatch_fraction`` of captions deliberately
describe another scene, so that CLIP filtering can be scored against ground
truth. Every sample is a function of ``(seed, sample index)`` only, so output is
identical however the work is split into shards or retried.
"""

from __future__ import annotations

import hashlib
import io
import math
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw
from pydantic import Field, model_validator

from mmflow.data.images import contact_sheet
from mmflow.data.shapes_vocab import BACKGROUNDS, COLORS, ONE, POSITIONS, SHAPES, SIZES, TWO
from mmflow.data.shards import ShardWriter, map_shards, sample_key, shard_name
from mmflow.stage import Params, Resources, Stage, StageContext, register
from mmflow.storage import Storage


class SynthShapesParams(Params):
    num_samples: int = Field(2048, ge=1, description="samples to draw")
    samples_per_shard: int = Field(256, ge=1, description="samples per tar shard")
    image_size: int = Field(32, ge=8, le=1024, description="side of the square images, in pixels")
    mismatch_fraction: float = Field(
        0.2, ge=0.0, le=1.0, description="share of captions that describe another scene"
    )
    max_objects: int = Field(2, ge=1, le=2, description="1 or 2 shapes per image")
    image_format: str = Field("jpg", pattern="^(jpg|png)$", description="jpg or png")
    jpeg_quality: int = Field(95, ge=10, le=100)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SynthShapesParams:
        if self.samples_per_shard > 100_000:
            raise ValueError("samples_per_shard above 100000 makes shards too large to stream")
        return self


def draw_scene(rng: np.random.Generator, max_objects: int) -> dict[str, Any]:
    n = 1 if max_objects == 1 else int(rng.integers(1, 3))
    positions = (
        rng.choice(list(POSITIONS), size=n, replace=False)
        if n > 1
        else [rng.choice(list(POSITIONS))]
    )
    if n > 1:  # two large shapes in adjacent corners would overlap; keep pairs small
        positions = [p for p in positions if p != "center"] or ["top left"]
        while len(positions) < n:
            positions.append([p for p in POSITIONS if p not in positions and p != "center"][0])
    colors = rng.choice(list(COLORS), size=n, replace=False)
    objects = [
        {
            "shape": str(rng.choice(SHAPES)),
            "color": str(colors[i]),
            "size": "small" if n > 1 else str(rng.choice(list(SIZES))),
            "position": str(positions[i]),
        }
        for i in range(n)
    ]
    return {"background": str(rng.choice(list(BACKGROUNDS))), "objects": objects}


def render(scene: dict[str, Any], size: int) -> Image.Image:
    scale = 4  # draw large, then downsample: anti-aliased edges at any size
    side = size * scale
    img = Image.new("RGB", (side, side), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(img)
    for obj in scene["objects"]:
        cx, cy = (c * side for c in POSITIONS[obj["position"]])
        r = SIZES[obj["size"]] * side
        fill = COLORS[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif obj["shape"] == "square":
            s = r * 0.85
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        elif obj["shape"] == "triangle":
            pts = [
                (cx + r * math.cos(a), cy + r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
            ]
            draw.polygon(pts, fill=fill)
        else:  # diamond
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def caption(scene: dict[str, Any], rng: np.random.Generator) -> str:
    objs = scene["objects"]
    a = objs[0]
    fields = {
        "color": a["color"],
        "shape": a["shape"],
        "size": a["size"],
        "position": a["position"],
        "bg": scene["background"],
    }
    if len(objs) == 1:
        return str(rng.choice(ONE)).format(**fields)
    b = objs[1]
    fields.update(color2=b["color"], shape2=b["shape"], size2=b["size"])
    return str(rng.choice(TWO)).format(**fields)


def _signature(scene: dict[str, Any]) -> set[tuple[str, str]]:
    return {(o["color"], o["shape"]) for o in scene["objects"]}


def make_sample(seed: int, index: int, p: SynthShapesParams) -> tuple[bytes, dict[str, Any]]:
    rng = np.random.default_rng([seed, index])
    scene = draw_scene(rng, p.max_objects)
    true_caption = caption(scene, rng)
    mismatched = bool(rng.random() < p.mismatch_fraction)
    text = true_caption
    if mismatched:  # describe a scene sharing no (colour, shape) pair with the real one
        while True:
            other = draw_scene(rng, p.max_objects)
            if not (_signature(other) & _signature(scene)):
                break
        text = caption(other, rng)
    img = render(scene, p.image_size)
    buf = io.BytesIO()
    if p.image_format == "jpg":
        img.save(buf, format="JPEG", quality=p.jpeg_quality)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue(), {
        "scene": scene,
        "mismatched": mismatched,
        "true_caption": true_caption,
        "caption": text,
    }


EXTRA_COLUMNS = {"mismatched": pa.bool_(), "true_caption": pa.string()}


def write_shard(shard: int, folder: str, p: SynthShapesParams, storage: Storage) -> dict[str, Any]:
    first = shard * p.samples_per_shard
    last = min(first + p.samples_per_shard, p.num_samples)
    mismatched = 0
    with ShardWriter(storage, folder, shard, EXTRA_COLUMNS) as w:
        for i in range(first, last):
            image, truth = make_sample(p.seed, i, p)
            key = sample_key(shard, i - first)
            row = {
                "url": f"synth://shapes/{p.seed}/{i}",
                "caption": truth["caption"],
                "key": key,
                "width": p.image_size,
                "height": p.image_size,
                "original_width": p.image_size,
                "original_height": p.image_size,
                "sha256": hashlib.sha256(image).hexdigest(),
                "mismatched": truth["mismatched"],
                "true_caption": truth["true_caption"],
            }
            w.write(row, image, p.image_format, extra_json={"synth": truth["scene"]})
            mismatched += truth["mismatched"]
        return w.close(mismatched=mismatched)


@register
class SynthShapes(Stage):
    type = "synth_shapes"
    version = "1"
    description = (
        "Procedural image-text pairs with ground truth, in img2dataset layout (no internet needed)."
    )
    Params = SynthShapesParams
    outputs = {"shards": "shards"}
    resources = Resources(cpus=1, workers=0)  # workers=0: as many shard tasks as the cluster fits
    resumable = True  # finished shards (with their _stats.json) are kept and skipped

    def run(self, ctx: StageContext) -> None:
        p: SynthShapesParams = ctx.params
        folder = ctx.outputs["shards"]
        num_shards = math.ceil(p.num_samples / p.samples_per_shard)
        stats = map_shards(
            write_shard,
            list(range(num_shards)),
            folder,
            args=(folder, p, ctx.storage),
            **ctx.resources.shard_tasks(),
            desc=ctx.stage,
            samples_per_shard=p.samples_per_shard,
            num_samples=p.num_samples,
            storage=ctx.storage,
        )
        total = sum(s["successes"] for s in stats)
        mismatched = sum(s.get("mismatched", 0) for s in stats)
        ctx.record_output(
            "shards",
            num_samples=total,
            num_shards=num_shards,
            shards=[f"{shard_name(i)}.tar" for i in range(num_shards)],
            format="img2dataset",
        )
        ctx.log_metrics(
            {
                "num_samples": total,
                "num_shards": num_shards,
                "mismatch_rate": mismatched / max(total, 1),
            }
        )
        previews = [make_sample(p.seed, i, p) for i in range(min(16, p.num_samples))]
        ctx.log_image(
            contact_sheet(
                [Image.open(io.BytesIO(b)) for b, _ in previews],
                [t["caption"] + (" [MISMATCH]" if t["mismatched"] else "") for _, t in previews],
                cols=8,
            ),
            "samples",
        )
