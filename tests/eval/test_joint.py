"""Text->image and image->text scores on hand-made predictions with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmflow.eval.joint import caption_match, i2t_scores, t2i_scores


def test_t2i_scores_count_each_attribute_and_all_three():
    truth = {
        "color": torch.tensor([0, 1, 2, 3]),
        "shape": torch.tensor([0, 1, 2, 3]),
        "background": torch.tensor([0, 1, 2, 0]),
    }
    predicted = {
        "color": torch.tensor([0, 1, 2, 5]),  # last wrong
        "shape": torch.tensor([0, 0, 2, 3]),  # second wrong
        "background": torch.tensor([0, 1, 0, 0]),  # third wrong
    }
    assert t2i_scores(predicted, truth) == {
        "t2i_color_match": 0.75,
        "t2i_shape_match": 0.75,
        "t2i_match": 0.25,  # only the first picture is right on all three
    }
    # lists and arrays work as well as tensors
    as_lists = {k: v.tolist() for k, v in predicted.items()}
    as_arrays = {k: np.asarray(v) for k, v in truth.items()}
    assert t2i_scores(as_lists, as_arrays) == t2i_scores(predicted, truth)
    assert t2i_scores(truth, truth) == {
        "t2i_color_match": 1.0,
        "t2i_shape_match": 1.0,
        "t2i_match": 1.0,
    }


def test_t2i_scores_edges():
    empty = {a: torch.zeros(0, dtype=torch.long) for a in ("color", "shape", "background")}
    assert all(math.isnan(v) for v in t2i_scores(empty, empty).values())
    short = {a: torch.zeros(2, dtype=torch.long) for a in ("color", "shape", "background")}
    longer = {a: torch.zeros(3, dtype=torch.long) for a in ("color", "shape", "background")}
    with pytest.raises(ValueError, match="predictions for"):
        t2i_scores(short, longer)


def one(color, shape, bg="white"):
    return {
        "background": bg,
        "objects": [{"shape": shape, "color": color, "size": "small", "position": "center"}],
    }


def two(c1, s1, c2, s2, bg="gray"):
    return {
        "background": bg,
        "objects": [
            {"shape": s1, "color": c1, "size": "small", "position": "top left"},
            {"shape": s2, "color": c2, "size": "small", "position": "top right"},
        ],
    }


@pytest.mark.parametrize(
    "caption, scene, want",
    [
        ("a red circle on a white background", one("red", "circle"), (True, True, True)),
        ("A large RED circle in the top left", one("red", "circle"), (True, True, True)),
        ("a blue circle", one("red", "circle"), (False, True, False)),
        ("a red square", one("red", "circle"), (True, False, False)),
        ("a reddish circles", one("red", "circle"), (False, False, False)),  # whole words only
        ("a red circle and a blue square", one("red", "circle"), (False, False, False)),  # extras
        ("a red circle on a red background", one("red", "circle"), (True, True, False)),  # 2 colours, 1 shape
        ("", one("red", "circle"), (False, False, False)),
        ("a red circle and a blue square", two("red", "circle", "blue", "square"), (True, True, True)),
        ("a picture of a blue square and a red circle", two("red", "circle", "blue", "square"),
         (True, True, True)),  # order of the objects does not matter
        ("a red square and a blue circle", two("red", "circle", "blue", "square"),
         (True, True, False)),  # right words, wrong pairing
        ("a red circle", two("red", "circle", "blue", "square"), (False, False, False)),
        ("a red circle and a blue circle", two("red", "circle", "blue", "circle"), (True, True, True)),
    ],
)  # fmt: skip
def test_caption_match(caption, scene, want):
    got = caption_match(caption, scene)
    assert (got["color"], got["shape"], got["match"]) == want


def test_i2t_scores():
    scenes = [one("red", "circle"), one("green", "triangle"), two("red", "circle", "blue", "square"),
              one("yellow", "diamond")]  # fmt: skip
    captions = [
        "a red circle",  # right
        "a green square",  # colour only
        "a blue square next to a red circle on a gray background",  # right
        "a purple diamond",  # shape only
    ]
    assert i2t_scores(captions, scenes) == {
        "i2t_match": 0.5,
        "i2t_color_match": 0.75,  # all but the purple diamond
        "i2t_shape_match": 0.75,  # all but the green square
    }
    assert all(math.isnan(v) for v in i2t_scores([], []).values())
    with pytest.raises(ValueError, match="captions for"):
        i2t_scores(["a red circle"], [])
