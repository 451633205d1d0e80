"""Answer accuracy of a visual question-answering model: exact match per question type.

Answers are compared after :func:`mmflow.data.instructions.normalize_answer` (case, spaces,
final punctuation), so "Red." matches "red" and "top left" must be "top left". Descriptions
("describe the picture") are not exact-matched: a description counts as right when it names
the colour and shape of every object in the scene (:func:`description_match`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from mmflow.data.instructions import normalize_answer
from mmflow.data.shapes_vocab import mentioned

DESCRIBE = "describe"


def description_match(text: str, scene: dict[str, Any]) -> bool:
    """Whether ``text`` names every object's colour and shape (and no colour not there)."""
    named = mentioned(text)
    colors = {o["color"] for o in scene["objects"]}
    shapes = {o["shape"] for o in scene["objects"]}
    return (
        colors <= set(named["colors"])
        and shapes <= set(named["shapes"])
        and set(named["colors"]) <= colors
    )


def vqa_scores(
    records: Iterable[tuple[str, str, str]], prefix: str = "vqa_acc"
) -> dict[str, float]:
    """``(qtype, predicted, truth)`` records -> ``{prefix}`` over every exact-match question
    and ``{prefix}_{qtype}`` per type; description records are left to the caller."""
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for qtype, predicted, truth in records:
        if qtype == DESCRIBE:
            continue
        total[qtype] += 1
        right[qtype] += normalize_answer(predicted) == normalize_answer(truth)
    if not total:
        return {}
    out = {prefix: sum(right.values()) / sum(total.values())}
    out.update({f"{prefix}_{t}": right[t] / total[t] for t in sorted(total)})
    return out
