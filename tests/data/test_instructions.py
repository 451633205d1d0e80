"""Instruction data: questions whose answers are true of the scene, conversations in LLaVA's
format, the checks on imported entries, reading hostile JSON/JSONL files, the table schema."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmflow.data.instructions import (
    CAPTION_INSTRUCTIONS,
    INSTRUCTION_SCHEMA,
    QUESTION_TYPES,
    TEMPLATES,
    caption_conversation,
    check_entry,
    eval_questions,
    image_first,
    instruction_row,
    key_rng,
    make_conversation,
    normalize_answer,
    read_llava_file,
    safe_image_path,
    scene_caption,
    table_file_name,
    write_instruction_table,
)
from mmflow.data.shapes_vocab import POSITIONS, mentioned, scene_prompt
from mmflow.stages.synth_shapes import draw_scene
from mmflow.storage import Storage


def scenes(n: int = 300, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [draw_scene(rng, 2) for _ in range(n)]


def the_object(scene: dict, question: str) -> dict:
    """The object a question names, found by its colour, or by shape (and position)."""
    named = mentioned(question)
    objs = scene["objects"]
    if named["colors"]:
        return next(o for o in objs if o["color"] == named["colors"][0])
    matches = [o for o in objs if o["shape"] == named["shapes"][0]]
    if len(matches) > 1:
        matches = [o for o in matches if f"in the {o['position']}" in question]
    assert len(matches) == 1, (question, scene)
    return matches[0]


def true_answer(qtype: str, scene: dict, question: str) -> str:
    """The answer worked out independently of the generator, from the question's words."""
    objs = scene["objects"]
    if qtype == "count":
        return {1: "one", 2: "two"}[len(objs)]
    if qtype == "background":
        return scene["background"]
    if qtype == "describe":
        return scene_prompt(scene)
    if qtype == "yesno":
        named = mentioned(question)
        pair = (named["colors"][0], named["shapes"][0])
        return "yes" if pair in {(o["color"], o["shape"]) for o in objs} else "no"
    o = the_object(scene, question)
    return o[{"color": "color", "shape": "shape", "position": "position", "size": "size"}[qtype]]


def test_every_eval_answer_is_true_of_the_scene_and_canonical():
    rng = np.random.default_rng(1)
    phrasings = Counter()
    for scene in scenes():
        qs = eval_questions(scene, rng)
        assert [q[0] for q in qs] == list(QUESTION_TYPES)
        for qtype, question, answer in qs:
            assert "<image>" not in question
            assert answer == true_answer(qtype, scene, question), (qtype, question, scene)
            assert normalize_answer(answer) == answer  # exact match needs one wording per fact
            phrasings[qtype, question.split(" the ")[0]] += 1
    for qtype in QUESTION_TYPES:  # several phrasings of every type are used
        assert len({p for (t, p) in phrasings if t == qtype}) >= 2, qtype


def test_answers_are_short_names_from_the_vocabulary():
    rng = np.random.default_rng(2)
    for scene in scenes(100):
        answers = {t: a for t, _, a in eval_questions(scene, rng)}
        assert answers["position"] in POSITIONS and answers["size"] in ("small", "large")
        assert answers["count"] in ("one", "two") and answers["yesno"] in ("yes", "no")
        assert answers["background"] in ("white", "black", "gray")


def test_a_repeated_shape_is_named_by_its_position():
    scene = {
        "background": "white",
        "objects": [
            {"shape": "circle", "color": "red", "size": "small", "position": "top left"},
            {"shape": "circle", "color": "blue", "size": "small", "position": "bottom right"},
        ],
    }
    rng = np.random.default_rng(0)
    seen = {}
    for _ in range(40):
        q, a = next((q, a) for t, q, a in eval_questions(scene, rng) if t == "color")
        assert "in the top left" in q or "in the bottom right" in q
        seen[a] = q
        assert a == ("red" if "top left" in q else "blue")
    assert set(seen) == {"red", "blue"}


def test_yesno_premises_are_about_half_false_and_false_ones_are_absent():
    rng = np.random.default_rng(3)
    answers = Counter()
    for scene in scenes(400):
        _, question, answer = eval_questions(scene, rng)[QUESTION_TYPES.index("yesno")]
        answers[answer] += 1
        assert answer == true_answer("yesno", scene, question)
    assert 160 < answers["no"] < 240 and answers["yes"] + answers["no"] == 400


def test_conversations_are_llava_turns_with_one_image_token_first():
    rng = np.random.default_rng(4)
    lengths = Counter()
    for scene in scenes(200):
        conv, qtypes = make_conversation(scene, rng)
        assert check_entry({"image": "x.jpg", "conversations": conv}) is None
        assert [t["from"] for t in conv] == ["human", "gpt"] * len(qtypes)
        assert conv[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in conv) == 1
        assert len(set(qtypes)) == len(qtypes) and set(qtypes) <= set(QUESTION_TYPES)
        for i, qtype in enumerate(qtypes):
            question = conv[2 * i]["value"].removeprefix("<image>\n")
            assert conv[2 * i + 1]["value"] == true_answer(qtype, scene, question)
        lengths[len(qtypes)] += 1
    assert set(lengths) == {2, 3, 4}
    conv, qtypes = make_conversation(scenes(1)[0], rng, turns=8)
    assert sorted(qtypes) == sorted(QUESTION_TYPES) and len(conv) == 16
    with pytest.raises(ValueError, match="turns"):
        make_conversation(scenes(1)[0], rng, turns=(3, 2))


def test_generation_is_deterministic_given_the_generator():
    scene = scenes(1)[0]
    a = make_conversation(scene, np.random.default_rng(7))
    assert a == make_conversation(scene, np.random.default_rng(7))
    others = [make_conversation(scene, np.random.default_rng(s)) for s in range(8, 14)]
    assert any(o != a for o in others)
    assert eval_questions(scene, key_rng("000010002", 5)) == eval_questions(
        scene, key_rng("000010002", 5)
    )
    assert key_rng("a").integers(1 << 30) != key_rng("b").integers(1 << 30)


def test_caption_rows_carry_a_true_caption_and_a_brief_request():
    rng = np.random.default_rng(5)
    for scene in scenes(100):
        caption = scene_caption(scene, rng)
        named = mentioned(caption)
        assert set(named["colors"]) == {o["color"] for o in scene["objects"]}
        assert set(named["shapes"]) == {o["shape"] for o in scene["objects"]}
        conv = caption_conversation(caption, rng)
        assert conv[0]["value"].removeprefix("<image>\n") in CAPTION_INSTRUCTIONS
        assert conv[1] == {"from": "gpt", "value": caption}


@pytest.mark.parametrize(
    "text, expected",
    [("Top  Left.", "top left"), (" yes! ", "yes"), ("Red\n", "red"), ("a b?.", "a b"), ("", "")],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def turns(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


GOOD = turns(("human", "<image>\nWhat is it?"), ("gpt", "a cat"))


@pytest.mark.parametrize(
    "entry, reason",
    [
        ({"image": "a.jpg", "conversations": GOOD}, None),
        # LLaVA-Pretrain: the image token at the end of the only human turn
        ({"image": "a.jpg", "conversations": turns(("human", "Caption this.\n<image>"), ("gpt", "x"))}, None),
        ({"image": "a.jpg", "conversations": GOOD + turns(("human", "Why?"), ("gpt", "ok"))}, None),
        (["not", "a", "dict"], "malformed"),
        ({"image": "a.jpg"}, "malformed"),
        ({"image": "a.jpg", "conversations": "<image>\nhi"}, "malformed"),
        ({"image": "a.jpg", "conversations": [{"from": "human"}]}, "malformed"),
        ({"image": "a.jpg", "conversations": [{"from": "human", "value": 3}]}, "malformed"),
        ({"image": ["a.jpg"], "conversations": GOOD}, "malformed"),
        ({"conversations": GOOD}, "no_image"),
        ({"image": "", "conversations": GOOD}, "no_image"),
        ({"image": "a.jpg", "conversations": turns(("human", "What?"), ("gpt", "x"))}, "no_image_token"),
        ({"image": "a.jpg", "conversations": GOOD[::-1]}, "wrong_turn_order"),
        ({"image": "a.jpg", "conversations": GOOD[:1]}, "wrong_turn_order"),
        ({"image": "a.jpg", "conversations": []}, "wrong_turn_order"),
        ({"image": "a.jpg", "conversations": GOOD + GOOD[:1]}, "wrong_turn_order"),
        ({"image": "a.jpg", "conversations": turns(("human", "<image>"), ("human", "x"))}, "wrong_turn_order"),
        ({"image": "a.jpg", "conversations": turns(("user", "<image>"), ("assistant", "x"))}, "wrong_turn_order"),
        ({"image": "a.jpg", "conversations": turns(("human", "<image>\nq"), ("gpt", "  \n"))}, "empty_answer"),
        ({"image": "a.jpg", "conversations": GOOD + turns(("human", "<image> again"), ("gpt", "x"))}, "extra_image_token"),
        ({"image": "a.jpg", "conversations": turns(("human", "<image><image>"), ("gpt", "x"))}, "extra_image_token"),
    ],
)  # fmt: skip
def test_check_entry(entry, reason):
    assert check_entry(entry) == reason


def test_image_first_and_safe_paths():
    moved = image_first(turns(("human", "Caption this.\n<image>"), ("gpt", "x")))
    assert moved[0] == {"from": "human", "value": "<image>\nCaption this."}
    assert safe_image_path("coco/./train2017/1.jpg") == "coco/train2017/1.jpg"
    for bad in ("/etc/passwd", "../x.jpg", "a/../../x.jpg", "s3://other/x.jpg", ".."):
        assert safe_image_path(bad) is None, bad


def entry(i, image="a.jpg"):
    return {"id": str(i), "image": image, "conversations": GOOD}


def test_jsonl_lines_that_do_not_read_cost_only_themselves(tmp_path):
    lines = [
        json.dumps(entry(0)).encode(),
        b"",  # blank lines are not entries
        b'{"id": "1", "image": "caf\xe9.jpg", "conversations": []}',  # Latin-1, not UTF-8
        b'{"id": "2", "image": ',
        json.dumps(entry(3)).encode(),
        b"[1, 2]",  # parses; check_entry calls it malformed
    ]
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\n")
    got = list(read_llava_file(str(path)))
    assert [(i, reason) for i, _, reason in got] == [
        (0, None), (2, "bad_encoding"), (3, "bad_json"), (4, None), (5, None),
    ]  # fmt: skip
    assert got[0][1] == entry(0) and got[3][1] == entry(3) and got[4][1] == [1, 2]
    assert [r for _, _, r in read_llava_file(path.read_bytes())] == [r for _, _, r in got]


def test_a_json_list_with_a_bad_byte_keeps_its_whole_entries(tmp_path):
    good = json.dumps([entry(0), entry(1, image="BAD"), entry(2)]).encode()
    path = tmp_path / "data.json"
    path.write_bytes(good.replace(b"BAD", b"b\xff.jpg"))
    got = list(read_llava_file(str(path)))
    assert [(i, reason) for i, _, reason in got] == [(0, None), (1, "bad_encoding"), (2, None)]
    assert got[2][1] == entry(2) and got[1][1] is None
    # valid UTF-8 that holds U+FFFD itself is not damaged
    real = json.dumps([entry(0, image="\ufffd.jpg")], ensure_ascii=False).encode()
    assert [r for _, _, r in read_llava_file(real, name="x.json")] == [None]


def test_a_json_file_that_does_not_parse_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_bytes(b'[{"id": 1,')
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        list(read_llava_file(str(path)))
    path.write_bytes(b"\n".join(json.dumps(entry(i)).encode() for i in range(2)))
    with pytest.raises(ValueError, match=r"name it \.jsonl"):
        list(read_llava_file(str(path)))
    path.write_bytes(b'{"id": 1}')
    with pytest.raises(ValueError, match="list of entries"):
        list(read_llava_file(str(path)))
    # without a telling name, the format is sniffed
    assert len(list(read_llava_file(json.dumps([entry(0)]).encode()))) == 1
    assert len(list(read_llava_file(json.dumps(entry(0)).encode()))) == 1


def test_table_schema_rows_and_files(tmp_path):
    assert [(f.name, str(f.type)) for f in INSTRUCTION_SCHEMA] == [
        ("id", "string"), ("key", "string"), ("shard", "string"), ("kind", "string"),
        ("conversations", "string"), ("qtypes", "list<element: string>"), ("scene", "string"),
    ]  # fmt: skip
    assert INSTRUCTION_SCHEMA.metadata == {b"mmflow.kind": b"instructions"}
    assert table_file_name("s3://b/x/00003.tar") == "00003.parquet"
    scene = scenes(1)[0]
    conv, qtypes = make_conversation(scene, np.random.default_rng(0))
    rows = [
        instruction_row(id="k-conv0", key="k", shard="/s/00000.tar", kind="conversation",
                        conversations=conv, qtypes=qtypes, scene=scene),
        instruction_row(id="k2", key="k2", shard="/s/00000.tar", kind="caption", conversations=GOOD),
    ]  # fmt: skip
    uri = str(tmp_path / "00000.parquet")
    assert write_instruction_table(Storage(), uri, rows) == 2
    table = pq.read_table(uri)
    assert table.schema.equals(INSTRUCTION_SCHEMA, check_metadata=True)
    back = table.to_pylist()
    assert json.loads(back[0]["conversations"]) == conv and back[0]["qtypes"] == qtypes
    assert (
        json.loads(back[0]["scene"]) == scene and back[1]["scene"] == "" and back[1]["qtypes"] == []
    )
    with pytest.raises(ValueError, match="kind"):
        instruction_row(id="x", key="x", shard="s", kind="chat", conversations=GOOD)
    assert write_instruction_table(Storage(), str(tmp_path / "empty.parquet"), []) == 0
    assert pq.read_table(str(tmp_path / "empty.parquet")).schema.equals(INSTRUCTION_SCHEMA)
    assert isinstance(INSTRUCTION_SCHEMA, pa.Schema) and set(TEMPLATES) == set(QUESTION_TYPES)
