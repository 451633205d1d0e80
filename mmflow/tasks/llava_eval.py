"""LLaVA's held-out evaluation: validation NLL, and questions answered about held-out pictures.

The set (:func:`build_eval_set`, made once by the stage) holds pictures whose keys were held
out of every training stage (the shared split of :mod:`mmflow.data.holdout`). With ground
truth (``synth_shapes`` scenes) each picture gets one question of every type
(:func:`mmflow.data.instructions.eval_questions`), answered greedily with the KV-cached
:class:`mmflow.generate.llava.Chat`:

- ``vqa_acc`` and ``vqa_acc_<type>``: exact-match accuracy (:mod:`mmflow.eval.vqa`);
- ``vqa_acc_wrong_image``: the same questions asked about another held-out picture, scored
  against the first one's truth: a model that reads the picture must fall far below
  ``vqa_acc`` here, one that guesses from the question alone would not;
- ``describe_match``: descriptions that name every object's colour and shape.

Without ground truth (imported data) only the validation NLL is reported. A table of sample
questions, answers and truths (``mlflow.log_table``) and a sheet of pictures with their
answers go to the stage's MLflow run.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmflow.data.instruction_rows import heldout_rows
from mmflow.eval.vqa import DESCRIBE, description_match, vqa_scores
from mmflow.models.llava import IMAGE_TOKEN, Pixels

SHORT_ANSWER, DESCRIPTION = 8, 32  # new tokens allowed


@dataclass
class LlavaEvalSet:
    val_pixels: list[np.ndarray] = field(default_factory=list)  # held-out rows of the stage's kinds
    val_turns: list[list[dict[str, str]]] = field(default_factory=list)
    pictures: list[np.ndarray] = field(default_factory=list)  # held-out pictures with scenes
    scenes: list[dict[str, Any]] = field(default_factory=list)
    questions: list[list[tuple[str, str, str]]] = field(default_factory=list)  # (qtype, q, a)
    keys: list[str] = field(default_factory=list)


def build_eval_set(
    pairs: list[dict[str, str]], *, kinds: tuple[str, ...], holdout_fraction: float, val_rows: int,
    vqa_images: int, pixels: dict[str, Any], seed: int = 0,
) -> LlavaEvalSet:  # fmt: skip
    """Held-out rows for the NLL and, where scenes are known, pictures with their questions."""
    from mmflow.data.instructions import eval_questions

    to_pixels = Pixels(**pixels)
    es = LlavaEvalSet()
    for row in heldout_rows(pairs, kinds=kinds, holdout_fraction=holdout_fraction, limit=val_rows):
        es.val_pixels.append(to_pixels(row["image"]))
        es.val_turns.append(json.loads(row["conversations"]))
    if vqa_images <= 0:
        return es
    rng = np.random.default_rng(seed)
    rows = heldout_rows(pairs, kinds=("caption", "conversation"), holdout_fraction=holdout_fraction,
                        limit=vqa_images * 4)  # fmt: skip
    for row in rows:
        if not row.get("scene") or len(es.pictures) >= vqa_images:
            continue
        scene = json.loads(row["scene"])
        es.pictures.append(to_pixels(row["image"]))
        es.scenes.append(scene)
        es.questions.append(list(eval_questions(scene, rng)))
        es.keys.append(row["key"])
    return es


def evaluate_llava(task, model, es: LlavaEvalSet) -> dict[str, float]:
    """The figures above for the task's model (rank 0, eval mode, no grad)."""
    out = _val_nll(task, model, es)
    if task.mode != "instruct" or not es.questions:
        return out
    from mmflow.generate.llava import Chat

    chat = Chat(model, task.tokenizer, task.pixels, task.image_tokens, task.max_len)
    right = _answers(chat, es, shift=0)
    wrong = _answers(chat, es, shift=1)
    out.update(vqa_scores((q, a, t) for q, _, t, a, _ in right))
    out["vqa_acc_wrong_image"] = vqa_scores((q, a, t) for q, _, t, a, _ in wrong).get(
        "vqa_acc", 0.0
    )
    described = [description_match(a, es.scenes[i]) for q, _, _, a, i in right if q == DESCRIBE]
    if described:
        out["describe_match"] = float(np.mean(described))
    _log(task, es, right)
    return out


def _val_nll(task, model, es: LlavaEvalSet) -> dict[str, float]:
    import torch

    from mmflow.models.llava import ChatIds, encode_conversation, next_token_loss, pad_batch

    if not es.val_turns:
        return {}
    ids = ChatIds.of(task.tokenizer)
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    total, count = 0.0, 0
    seqs = [encode_conversation(t, task.encode, ids, task.image_tokens) for t in es.val_turns]
    for i in range(0, len(seqs), 32):
        b = {k: v.to(dev) for k, v in pad_batch(seqs[i : i + 32], ids.pad).items()}
        px = torch.from_numpy(np.stack(es.val_pixels[i : i + 32])).to(dev, dtype)
        logits = model(
            input_ids=b["input_ids"], pixel_values=px, attention_mask=b["attention_mask"]
        ).logits
        loss, n = next_token_loss(logits, b["labels"])
        total, count = total + float(loss) * n, count + n
    name = "val_caption_nll" if task.mode == "align" else "val_answer_nll"
    return {name: total / max(count, 1)}


def _answers(chat, es: LlavaEvalSet, shift: int) -> list[tuple[str, str, str, str, int]]:
    """(qtype, question, truth, answer, picture index) for every question of the set, asked
    about picture ``(i + shift) % n`` instead of picture ``i`` when ``shift`` > 0."""
    import torch

    n = len(es.pictures)
    asked = [(i, q) for i, qs in enumerate(es.questions) for q in qs]
    out: list[tuple[str, str, str, str, int]] = []
    for kind, limit in ((False, SHORT_ANSWER), (True, DESCRIPTION)):
        part = [(i, q) for i, q in asked if (q[0] == DESCRIBE) == kind]
        for start in range(0, len(part), 64):
            chunk = part[start : start + 64]
            px = torch.from_numpy(np.stack([es.pictures[(i + shift) % n] for i, _ in chunk]))
            convs = [[{"from": "human", "value": f"{IMAGE_TOKEN}\n{q[1]}"}] for _, q in chunk]
            answers = chat.answer_batch(px, convs, max_new_tokens=limit)
            out += [(q[0], q[1], q[2], a, i) for (i, q), a in zip(chunk, answers, strict=True)]
    return out


def _log(task, es: LlavaEvalSet, records, pictures: int = 8) -> None:
    """Sample questions, answers and truths as an MLflow table, and a sheet of pictures."""
    if not task.run_id:
        return
    try:
        from mlflow import MlflowClient
        from PIL import Image

        from mmflow.data.images import contact_sheet
        from mmflow.tracking import log_image

        step = f"step_{task._step:06d}"
        sample = [r for r in records if r[4] < 16]
        table = {"key": [es.keys[r[4]] for r in sample], "type": [r[0] for r in sample],
                 "question": [r[1] for r in sample], "answer": [r[3] for r in sample],
                 "truth": [r[2] for r in sample]}  # fmt: skip
        MlflowClient(task.tracking_uri).log_table(task.run_id, table, f"vqa/{step}.json")
        mean, std = task.pixels.mean, task.pixels.std
        images, captions = [], []
        for i in range(min(pictures, len(es.pictures))):
            rgb = (
                ((es.pictures[i] * std + mean).clip(0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
            )
            images.append(Image.fromarray(rgb))
            lines = [
                f"{r[1]} {r[3]}"
                for r in records
                if r[4] == i and r[0] in ("color", "shape", "position")
            ]
            captions.append(" | ".join(lines))
        log_image(task.tracking_uri, task.run_id, contact_sheet(images, captions, cols=4, cell=96, caption_lines=6),
                  f"answers/{step}")  # fmt: skip
    except Exception as e:  # a flaky tracking server must not kill a long run
        sys.stdout.write(f"[llava] warning: could not log the sample answers: {e}\n")
