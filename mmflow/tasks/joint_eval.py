"""What the joint model is judged on, gathered once before training (a Ray task of the stage).

Keys held out by hash (:func:`mmflow.data.holdout.is_held_out`, the same slice the VQ-GAN
held out at the same fraction) give: held-out token rows for the validation NLL, and, where
the shards carry ``synth_shapes`` ground truth, single-object prompts built from held-out
scenes (with the judge's label ids), held-out pictures' codes with their scenes for
captioning, and an attribute judge trained on the training keys' real single-object pictures
and scored on the held-out ones (``judge_acc``). Without ground truth (web captions) the
held-out captions are the prompts: the pictures drawn from them are shown and, with a CLIP,
scored against them beside their own real pictures; only the judged figures are missing.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from mmflow.data.holdout import is_held_out
from mmflow.storage import Storage


@dataclass
class JointEvalSet:
    """Picklable: what rank 0 evaluates on."""

    val_texts: list[list[int]] = field(default_factory=list)  # held-out rows for val NLL
    val_images: list[list[int]] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)  # single-object, built from scenes
    prompt_ids: list[list[int]] = field(default_factory=list)
    prompt_truth: dict[str, Any] = field(default_factory=dict)  # judge label ids (tensors)
    prompt_pictures: Any = None  # uint8 (N, 3, S, S): the real pictures the prompts describe
    caption_codes: list[list[int]] = field(default_factory=list)  # held-out pictures' codes
    caption_scenes: list[dict[str, Any]] = field(default_factory=list)
    judge_state: bytes | None = None  # AttributeJudge.save bytes; None: no ground truth


def read_table(files: list[str]) -> dict[str, list]:
    """The token table's key, caption ids and image codes, in row order."""
    import pyarrow.parquet as pq

    storage, cols = Storage(), {"key": [], "text_ids": [], "image_tokens": []}
    for uri in files:
        with storage.open_input(uri) as f:
            t = pq.read_table(f, columns=list(cols))
        for c in cols:
            cols[c] += t[c].to_pylist()
    return cols


def scenes_and_pictures(
    shards: list[str],
    keys: set[str] | None,
    limit: int,
    image_size: int,
    sceneless: frozenset[str] = frozenset(),
):
    """{key: (scene, uint8 (3, S, S) picture)} of ``synth_shapes`` samples: those in ``keys``
    (all when None), up to ``limit``; samples without a readable picture are left out, and
    so are those without a scene unless their key is in ``sceneless`` (scene None)."""
    import numpy as np
    import torch
    from PIL import Image

    from mmflow.data.webdataset_io import iter_shard

    out: dict[str, tuple[dict, Any]] = {}
    storage = Storage()
    for uri in shards:
        for s in iter_shard(storage, uri):
            if len(out) >= limit:
                return out
            if s.error or (keys is not None and s.key not in keys):
                continue
            if "synth" not in s.meta and s.key not in sceneless:
                continue
            try:
                with Image.open(io.BytesIO(s.image)) as img:
                    rgb = img.convert("RGB").resize((image_size, image_size))
            except Exception:  # counted by the stages that own the shards; here left out
                continue
            pixels = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)
            out[s.key] = (s.meta.get("synth"), pixels)
    return out


def build_eval_set(
    table_files: list[str],
    shards: list[str] | None,
    tokenizer_json: str,
    *,
    holdout_fraction: float,
    max_text_len: int,
    image_size: int,
    val_rows: int,
    prompts: int,
    captions: int,
    judge_steps: int,
    judge_train_images: int,
    threads: int,
) -> tuple[JointEvalSet, dict[str, float], list[int]]:
    """(eval set, the judge's metrics, every caption id the training rows use)."""
    import torch
    from tokenizers import Tokenizer

    from mmflow.data.shapes_vocab import single_object_prompt
    from mmflow.eval.judge import accuracy, scene_labels, train_judge

    torch.set_num_threads(threads)
    table = read_table(table_files)
    held = [is_held_out(k, holdout_fraction) for k in table["key"]]
    seen = sorted({i for ids, h in zip(table["text_ids"], held, strict=True) if not h for i in ids})
    rows = [i for i, h in enumerate(held) if h and len(table["text_ids"][i]) <= max_text_len]
    es = JointEvalSet(
        val_texts=[table["text_ids"][i] for i in rows[:val_rows]],
        val_images=[table["image_tokens"][i] for i in rows[:val_rows]],
    )
    tok = Tokenizer.from_str(tokenizer_json)
    held_keys = {table["key"][i] for i in rows}
    # one pass over the shards: the held-out pictures with a scene, and the pictures of the
    # prompts drawn when there is no ground truth (the first held-out captions)
    picked = rows[:prompts]
    keys = [table["key"][i] for i in picked]
    real = scenes_and_pictures(shards or [], held_keys, len(held_keys), image_size, frozenset(keys))
    truth = {k: v for k, v in real.items() if v[0] is not None}
    if not truth:  # no ground truth: the held-out captions are the prompts
        es.prompt_ids = [table["text_ids"][i] for i in picked]
        es.prompts = [tok.decode(ids).strip() for ids in es.prompt_ids]
        if keys and all(k in real for k in keys):
            es.prompt_pictures = torch.stack([real[k][1] for k in keys])
        return es, {}, seen
    codes = {table["key"][i]: table["image_tokens"][i] for i in rows}
    captioned = [k for k in codes if k in truth][:captions]
    es.caption_codes = [codes[k] for k in captioned]
    es.caption_scenes = [truth[k][0] for k in captioned]
    single = [k for k in truth if len(truth[k][0]["objects"]) == 1]
    # the judge: trained on training keys' real pictures, scored on the held-out ones
    train = scenes_and_pictures(shards, None, judge_train_images * 3, image_size)
    train = {k: v for k, v in train.items() if not is_held_out(k, holdout_fraction)}
    train_single = [v for v in train.values() if len(v[0]["objects"]) == 1][:judge_train_images]
    if not train_single or not single:
        return es, {}, seen
    judge = train_judge(
        torch.stack([p for _, p in train_single]),
        scene_labels([s for s, _ in train_single]),
        steps=judge_steps,
        threads=threads,
    )
    held_pics = torch.stack([truth[k][1] for k in single])
    metrics = accuracy(judge, held_pics, scene_labels([truth[k][0] for k in single]))
    metrics["judge_train_s"] = float(getattr(judge, "train_seconds", 0.0))
    picked = single[:prompts]
    es.prompts = [single_object_prompt(truth[k][0]) for k in picked]
    es.prompt_pictures = torch.stack([truth[k][1] for k in picked])
    es.prompt_ids = [e.ids for e in tok.encode_batch(es.prompts, add_special_tokens=False)]
    es.prompt_truth = scene_labels([truth[k][0] for k in picked])
    buf = io.BytesIO()
    judge.save(buf)
    es.judge_state = buf.getvalue()
    return es, metrics, seen
