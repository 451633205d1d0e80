"""Scores of a joint text+image model's two directions against ground truth, as pure
functions of predictions and truths (no model code).

Text -> image: the judge (``mmflow.eval.judge``) reads each generated picture; a picture
matches when what it shows is what its prompt asked for. Image -> text: a generated caption
matches when it names what the picture holds, and nothing the picture does not hold, read
with ``mmflow.data.shapes_vocab.mentioned``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mmflow.data.shapes_vocab import mentioned


def _ids(values: Any) -> list[int]:
    """A (N,) tensor, array or sequence of label ids -> list of ints."""
    if hasattr(values, "tolist"):
        return [int(v) for v in values.tolist()]
    return [int(v) for v in values]


def _share(hits: Sequence[bool]) -> float:
    return sum(hits) / len(hits) if hits else float("nan")


def t2i_scores(predicted: Mapping[str, Any], truth: Mapping[str, Any]) -> dict[str, float]:
    """Share of generated pictures whose judged colour, shape, and all of colour, shape and
    background equal the prompt's.

    ``predicted`` is the judge's output for the pictures and ``truth`` the prompts' label ids
    (``scene_labels`` of the prompted scenes): both ``{"color", "shape", "background"}`` ->
    (N,) ids. NaN when there are no pictures.
    """
    pred = {a: _ids(predicted[a]) for a in ("color", "shape", "background")}
    want = {a: _ids(truth[a]) for a in ("color", "shape", "background")}
    n = len(want["color"])
    for a in pred:
        if len(pred[a]) != n or len(want[a]) != n:
            raise ValueError(f"{a}: {len(pred[a])} predictions for {len(want[a])} prompts")
    right = {a: [p == w for p, w in zip(pred[a], want[a], strict=True)] for a in pred}
    return {
        "t2i_color_match": _share(right["color"]),
        "t2i_shape_match": _share(right["shape"]),
        "t2i_match": _share([c and s and b for c, s, b in zip(*right.values(), strict=True)]),
    }


def caption_match(text: str, scene: Mapping[str, Any]) -> dict[str, bool]:
    """Whether a caption names the scene's objects: ``color`` / ``shape`` when the colours /
    shapes it names are exactly the objects' (each named, none extra), ``match`` when in
    addition it names one colour-shape pair per object and the pairs are the objects'.

    Pairs are read in order (the i-th colour named goes with the i-th shape named), as every
    caption template puts an object's colour before its shape; so "a red circle and a blue
    square" does not match a blue circle and a red square.
    """
    said = mentioned(text)
    objects = scene["objects"]
    colors = {o["color"] for o in objects}
    shapes = {o["shape"] for o in objects}
    pairs = {(o["color"], o["shape"]) for o in objects}
    n = len(objects)
    color_ok = set(said["colors"]) == colors
    shape_ok = set(said["shapes"]) == shapes
    paired = len(said["colors"]) == len(said["shapes"]) == n
    pairs_ok = paired and set(zip(said["colors"], said["shapes"], strict=True)) == pairs
    return {"color": color_ok, "shape": shape_ok, "match": color_ok and shape_ok and pairs_ok}


def i2t_scores(captions: Sequence[str], scenes: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Share of generated captions that name the true colour and shape of the scene's object
    (of both objects, each with its own colour, in a two-object scene) and nothing else
    (``i2t_match``), and the shares right on colours and on shapes alone. NaN when empty."""
    if len(captions) != len(scenes):
        raise ValueError(f"{len(captions)} captions for {len(scenes)} scenes")
    judged = [caption_match(c, s) for c, s in zip(captions, scenes, strict=True)]
    return {
        "i2t_match": _share([j["match"] for j in judged]),
        "i2t_color_match": _share([j["color"] for j in judged]),
        "i2t_shape_match": _share([j["shape"] for j in judged]),
    }
