"""The vocabulary of the synthetic shapes data: shapes, colours, backgrounds, sizes, positions
and the caption templates, plus what a caption names and the prompt for a scene.

It lives below the stages so that library code (judges, evaluation, sampling) can read it
without importing ``mmflow.stages``; ``synth_shapes`` draws its pictures from these tables.
The order of every table is part of the data: ``synth_shapes`` samples from ``list(COLORS)``
and friends, and the judge's label ids are positions in these tables.
"""

from __future__ import annotations

import re
from typing import Any

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SIZES = {"small": 0.22, "large": 0.38}  # radius as a fraction of the image side
POSITIONS = {  # centre in unit coordinates
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}
ONE = (  # captions of one-object scenes
    "a {size} {color} {shape}",
    "a {color} {shape} on a {bg} background",
    "a photo of a {color} {shape} in the {position}",
    "a {size} {color} {shape} in the {position} of a {bg} image",
    "an image showing one {color} {shape}",
    "{color} {shape}, {size}, {bg} background",
)
TWO = (  # captions of two-object scenes
    "a {color} {shape} and a {color2} {shape2}",
    "two shapes: a {size} {color} {shape} and a {size2} {color2} {shape2}",
    "a {color} {shape} next to a {color2} {shape2} on a {bg} background",
    "a picture of a {color2} {shape2} and a {color} {shape}",
)

_WORD = re.compile(r"[a-z]+")


def mentioned(text: str) -> dict[str, list[str]]:
    """The colours, shapes and backgrounds a caption names, in the order it names them.

    Whole words only and case-insensitive ("Red" counts, "reddish" and "circles" do not);
    a word named twice is listed twice. Background names (white, black, gray) are not
    object colours, so they are only ever listed under ``backgrounds``.
    """
    words = _WORD.findall(text.lower())
    return {
        "colors": [w for w in words if w in COLORS],
        "shapes": [w for w in words if w in SHAPES],
        "backgrounds": [w for w in words if w in BACKGROUNDS],
    }


def single_object_prompt(scene: dict[str, Any]) -> str:
    """``"a {color} {shape} on a {bg} background"`` for a one-object scene."""
    if len(scene["objects"]) != 1:
        raise ValueError(f"single_object_prompt needs one object, got {len(scene['objects'])}")
    obj = scene["objects"][0]
    return ONE[1].format(color=obj["color"], shape=obj["shape"], bg=scene["background"])


def scene_prompt(scene: dict[str, Any]) -> str:
    """The fixed prompt for a one- or two-object scene (the two-object one names both,
    ``"a {color} {shape} next to a {color2} {shape2} on a {bg} background"``)."""
    if len(scene["objects"]) == 1:
        return single_object_prompt(scene)
    a, b = scene["objects"]
    return TWO[2].format(
        color=a["color"],
        shape=a["shape"],
        color2=b["color"],
        shape2=b["shape"],
        bg=scene["background"],
    )
