"""VQA accuracy: exact match after normalisation, per question type, descriptions left out; a
description matches when it names every object's colour and shape and no other colour."""

from __future__ import annotations

import numpy as np
import pytest

from mmflow.data.instructions import QUESTION_TYPES, eval_questions
from mmflow.data.shapes_vocab import scene_prompt
from mmflow.eval.vqa import DESCRIBE, description_match, vqa_scores
from mmflow.stages.synth_shapes import caption, draw_scene

ONE = {
    "background": "white",
    "objects": [{"color": "red", "shape": "circle", "size": "small", "position": "center"}],
}
TWO = {
    "background": "black",
    "objects": [
        {"color": "blue", "shape": "square", "size": "small", "position": "top left"},
        {"color": "green", "shape": "square", "size": "small", "position": "bottom right"},
    ],
}


def test_accuracy_overall_and_per_type_after_normalisation():
    records = [
        ("color", "Red.", "red"),  # case and final punctuation
        ("color", "blue", "red"),
        ("position", "top  left", "top left"),  # spaces collapsed
        ("position", "topleft", "top left"),  # but words are words
        ("position", " Bottom Right! ", "bottom right"),
        ("count", "two", "two"),
        (DESCRIBE, "a red circle", "a red circle on a white background"),  # not exact-matched
    ]
    scores = vqa_scores(records)
    assert scores == {
        "vqa_acc": pytest.approx(4 / 6),
        "vqa_acc_color": 0.5,
        "vqa_acc_count": 1.0,
        "vqa_acc_position": pytest.approx(2 / 3),
    }
    assert list(scores) == ["vqa_acc", "vqa_acc_color", "vqa_acc_count", "vqa_acc_position"]
    wrong = vqa_scores(iter(records), prefix="vqa_acc_wrong_image")
    assert wrong["vqa_acc_wrong_image"] == pytest.approx(4 / 6) and "vqa_acc" not in wrong
    # the overall figure counts questions, not types: one type with many questions weighs more
    assert (
        vqa_scores([("yesno", "yes", "yes")] * 3 + [("shape", "circle", "square")])["vqa_acc"]
        == 0.75
    )


def test_no_scored_question_gives_no_figure():
    assert vqa_scores([]) == {}
    assert vqa_scores([(DESCRIBE, "a red circle", "a red circle")]) == {}


def test_the_truth_scores_one_for_every_type():
    rng = np.random.default_rng(0)
    records = [r for _ in range(50) for r in eval_questions(draw_scene(rng, 2), rng)]
    scores = vqa_scores((qtype, answer, answer) for qtype, _, answer in records)
    assert scores["vqa_acc"] == 1.0
    assert set(scores) == {"vqa_acc", *(f"vqa_acc_{q}" for q in QUESTION_TYPES if q != DESCRIBE)}


def test_a_description_names_every_colour_and_shape_and_no_other_colour():
    assert description_match("a red circle on a white background", ONE)
    assert description_match("A RED CIRCLE.", ONE)  # case; the background need not be named
    assert not description_match("a red square", ONE)  # wrong shape
    assert not description_match("a circle", ONE)  # no colour
    assert not description_match("a red circle and a blue square", ONE)  # a colour not there
    assert description_match("a red circle and a square", ONE)  # an extra shape is not checked
    assert description_match("a blue square next to a green square on a black background", TWO)
    # whole words only (shapes_vocab.mentioned): "squares" is not "square"
    assert not description_match("two squares, blue and green", TWO)
    assert not description_match("a blue square", TWO)  # the green one missing
    # background words are not object colours: "white" names no object
    assert description_match("a red circle, white", ONE)


def test_the_scenes_own_prompt_and_captions_match_it_and_others_do_not():
    rng = np.random.default_rng(3)
    scenes = [draw_scene(rng, 2) for _ in range(200)]
    assert all(description_match(scene_prompt(s), s) for s in scenes)
    # synth_shapes' two-object captions name both objects; a one-object caption names its object
    assert all(description_match(caption(s, rng), s) for s in scenes)
    others = [
        description_match(scene_prompt(b), a) for a, b in zip(scenes, scenes[1:], strict=False)
    ]
    assert sum(others) < 0.2 * len(others)
