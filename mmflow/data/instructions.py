"""Instruction data for LLaVA: conversations about synthetic scenes, the checks an imported
LLaVA JSON/JSONL entry must pass, and the instruction table both stages write.

A conversation is LLaVA's list of turns, ``[{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]``, with ``<image>`` once, in the first human turn.
Questions about a ``synth_shapes`` scene come from several phrasings per type; answers are short
and canonical (lower case, no final punctuation, one fixed wording per fact), so that exact match
after :func:`normalize_answer` is a meaningful score.

The table (:data:`INSTRUCTION_SCHEMA`) is Parquet, one file per image shard and named like it
(``00003.parquet`` for ``00003.tar``), so a reader can stream a table file beside its shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmflow.data.shapes_vocab import COLORS, ONE, SHAPES, TWO, scene_prompt
from mmflow.storage import Storage

IMAGE_TOKEN = "<image>"
HUMAN, GPT = "human", "gpt"
QUESTION_TYPES = ("color", "shape", "count", "position", "size", "background", "yesno", "describe")
TEMPLATES: dict[str, tuple[str, ...]] = {
    # {obj} is the shape alone, or "{shape} in the {position}" when the scene has two of it
    "color": ("What color is the {obj}?", "What is the color of the {obj}?",
              "Which color does the {obj} have?"),
    "shape": ("What shape is the {color} object?", "What is the shape of the {color} object?",
              "Which shape is {color}?"),
    "count": ("How many shapes are there?", "How many objects are in the picture?",
              "Count the shapes in the image."),
    "position": ("Where is the {color} {shape}?", "Where is the {color} {shape} located?",
                 "In which part of the image is the {color} {shape}?"),
    "size": ("Is the {color} {shape} small or large?", "What size is the {color} {shape}?",
             "Is the {color} {shape} large or small?"),
    "background": ("What color is the background?", "What is the background color?",
                   "Which color is the background of the image?"),
    "yesno": ("Is there a {color} {shape} in the picture?", "Can you see a {color} {shape}?",
              "Does the image contain a {color} {shape}?"),
    "describe": ("Describe the picture.", "What is in this image?",
                 "Describe the image in one sentence.", "What does the picture show?"),
}  # fmt: skip
# Stage-1 (alignment) instructions: LLaVA-Pretrain pairs every caption with a brief request.
CAPTION_INSTRUCTIONS = (
    "Describe the image briefly.",
    "Give a short caption for the picture.",
    "Write a brief description of the image.",
    "Summarize the picture in a few words.",
    "Provide a short description of this image.",
)
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def key_rng(key: str, seed: int = 0) -> np.random.Generator:
    """A generator that depends on (seed, sample key) only: the same conversations however the
    samples are sharded or the work is split."""
    return np.random.default_rng([seed, int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)])


def scene_caption(scene: dict[str, Any], rng: np.random.Generator) -> str:
    """A true caption of the scene, from synth_shapes' own templates (never the shard caption,
    which may deliberately describe another scene)."""
    a, objs = scene["objects"][0], scene["objects"]
    fields = dict(
        color=a["color"],
        shape=a["shape"],
        size=a["size"],
        position=a["position"],
        bg=scene["background"],
    )
    if len(objs) == 1:
        return _pick(rng, ONE).format(**fields)
    b = objs[1]
    return _pick(rng, TWO).format(**fields, color2=b["color"], shape2=b["shape"], size2=b["size"])


def ask(qtype: str, scene: dict[str, Any], rng: np.random.Generator) -> tuple[str, str]:
    """(question, canonical answer) of one type about the scene."""
    objs, bg = scene["objects"], scene["background"]
    o = _pick(rng, objs)
    template = _pick(rng, TEMPLATES[qtype])
    if qtype == "color":
        twin = sum(x["shape"] == o["shape"] for x in objs) > 1  # colours are unique, shapes not
        obj = f"{o['shape']} in the {o['position']}" if twin else o["shape"]
        return template.format(obj=obj), o["color"]
    if qtype == "count":
        return template, NUMBERS[len(objs)] if len(objs) < len(NUMBERS) else str(len(objs))
    if qtype == "background":
        return template, bg
    if qtype == "describe":
        return template, scene_prompt(scene)
    if qtype == "yesno":
        present = {(x["color"], x["shape"]) for x in objs}
        if rng.random() < 0.5:  # a true premise
            return template.format(color=o["color"], shape=o["shape"]), "yes"
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        color, shape = _pick(rng, absent)
        return template.format(color=color, shape=shape), "no"
    answer = {"shape": o["shape"], "position": o["position"], "size": o["size"]}[qtype]
    return template.format(color=o["color"], shape=o["shape"]), answer


def make_conversation(
    scene: dict[str, Any], rng: np.random.Generator, turns: int | tuple[int, int] = (2, 4)
) -> tuple[list[dict[str, str]], list[str]]:
    """A multi-turn LLaVA conversation about the scene and the question type of each QA turn.

    ``turns`` is a count or an inclusive (min, max) range; each type is asked at most once, so
    a conversation never repeats itself."""
    lo, hi = (turns, turns) if isinstance(turns, int) else turns
    if not 1 <= lo <= hi <= len(QUESTION_TYPES):
        raise ValueError(f"turns must lie in 1..{len(QUESTION_TYPES)}, min <= max; got {turns}")
    n = int(rng.integers(lo, hi + 1))
    qtypes = [QUESTION_TYPES[i] for i in rng.permutation(len(QUESTION_TYPES))[:n]]
    conversation = []
    for i, qtype in enumerate(qtypes):
        question, answer = ask(qtype, scene, rng)
        human = f"{IMAGE_TOKEN}\n{question}" if i == 0 else question
        conversation += [{"from": HUMAN, "value": human}, {"from": GPT, "value": answer}]
    return conversation, qtypes


def caption_conversation(caption: str, rng: np.random.Generator) -> list[dict[str, str]]:
    """A stage-1 image-caption pair as a one-turn conversation."""
    return [
        {"from": HUMAN, "value": f"{IMAGE_TOKEN}\n{_pick(rng, CAPTION_INSTRUCTIONS)}"},
        {"from": GPT, "value": caption},
    ]


def eval_questions(scene: dict[str, Any], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """One (qtype, question, answer) per question type, for held-out evaluation; the question
    carries no image token (the caller puts it where its prompt wants it)."""
    return [(qtype, *ask(qtype, scene, rng)) for qtype in QUESTION_TYPES]


_SPACES = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Lower case, spaces collapsed, trailing punctuation dropped: "Top  left." -> "top left"."""
    return _SPACES.sub(" ", text.lower()).strip().rstrip(".!?,;:").strip()


# -- imported LLaVA files ----------------------------------------------------------------------

ENTRY_PROBLEMS = (
    "malformed",
    "no_image",
    "wrong_turn_order",
    "no_image_token",
    "extra_image_token",
    "empty_answer",
)  # checked in this order: the first that applies is the reason
READ_PROBLEMS = ("bad_encoding", "bad_json")


def check_entry(entry: Any) -> str | None:
    """Why a LLaVA entry cannot be trained on (one of :data:`ENTRY_PROBLEMS`), or None.

    LLaVA-Pretrain entries (one human turn ``"<image>\\n..."`` or ``"...\\n<image>"``, one gpt
    caption) are one-turn conversations and pass."""
    if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
        return "malformed"
    turns = entry["conversations"]
    if not all(
        isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)
        for t in turns
    ):
        return "malformed"
    image = entry.get("image")
    if image is None or image == "":  # LLaVA's text-only entries: nothing to look at
        return "no_image"
    if not isinstance(image, str):
        return "malformed"
    expected = [HUMAN, GPT] * (len(turns) // 2)
    if not turns or len(turns) % 2 or [t["from"] for t in turns] != expected:
        return "wrong_turn_order"
    if IMAGE_TOKEN not in turns[0]["value"]:
        return "no_image_token"
    if sum(t["value"].count(IMAGE_TOKEN) for t in turns) > 1:
        return "extra_image_token"
    if any(not t["value"].strip() for t in turns[1::2]):
        return "empty_answer"
    return None


def image_first(turns: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The turns as ``{from, value}`` only, ``<image>`` moved to the front of the first human
    turn (LLaVA's own ``preprocess_multimodal`` does this), so every row reads the same way."""
    out = [{"from": t["from"], "value": t["value"]} for t in turns]
    rest = out[0]["value"].replace(IMAGE_TOKEN, "").strip()
    out[0]["value"] = f"{IMAGE_TOKEN}\n{rest}"
    return out


def safe_image_path(image: str) -> str | None:
    """The entry's image path normalised (the dedupe key), or None when it would leave the image
    folder (absolute, ``..``): a file must not be able to make the import read anything else."""
    path = posixpath.normpath(image.replace("\\", "/"))
    if path.startswith("/") or path == ".." or path.startswith("../") or "://" in image:
        return None
    return path


def read_llava_file(
    source: str | bytes, *, name: str | None = None, storage: Storage | None = None
) -> Iterator[tuple[int, Any, str | None]]:
    """(index, entry, None) per entry of a LLaVA ``.json`` (a list) or ``.jsonl`` file, or
    (index, None, reason) with a reason of :data:`READ_PROBLEMS`; entries are not checked here
    (:func:`check_entry`). ``source`` is a URI (local or ``s3://``) or the file's bytes; without
    a telling name the format is sniffed (a list starts with ``[``). A JSONL index is the line
    number (blank lines are skipped); a ``.json`` that does not parse raises ``ValueError``."""
    name = name or (source if isinstance(source, str) else "<bytes>")
    data = (storage or Storage()).read_bytes(source) if isinstance(source, str) else source
    data = data.removeprefix(b"\xef\xbb\xbf")  # a BOM is not part of the first entry
    if name.endswith(".jsonl") or (not name.endswith(".json") and data.lstrip()[:1] != b"["):
        yield from _read_jsonl(data)
    else:
        yield from _read_json_list(data, name)


def _read_jsonl(data: bytes) -> Iterator[tuple[int, Any, str | None]]:
    for i, line in enumerate(data.split(b"\n")):  # per line: one bad byte costs one entry
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            yield i, None, "bad_encoding"
            continue
        try:
            yield i, json.loads(text), None
        except json.JSONDecodeError:
            yield i, None, "bad_json"


def _read_json_list(data: bytes, name: str) -> Iterator[tuple[int, Any, str | None]]:
    try:
        text, damaged = data.decode("utf-8"), False
    except UnicodeDecodeError:  # keep what is whole: only strings holding a bad byte are lost
        text, damaged = data.decode("utf-8", errors="replace"), True
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (one object per line? name it .jsonl)" if text.lstrip()[:1] == "{" else ""
        raise ValueError(f"{name}: not valid JSON{hint}: {e}") from None
    if not isinstance(entries, list):
        kind = type(entries).__name__
        raise ValueError(f"{name}: a LLaVA .json file is a list of entries, not a {kind}")
    for i, entry in enumerate(entries):
        if damaged and "\ufffd" in json.dumps(entry, ensure_ascii=False):
            yield i, None, "bad_encoding"
        else:
            yield i, entry, None


# -- the table ---------------------------------------------------------------------------------

TABLE_FORMAT = "mmflow-instructions"
INSTRUCTION_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # unique within the table
        ("key", pa.string()),  # the image's sample key in its shard
        ("shard", pa.string()),  # normalised URI of the .tar holding the image
        ("kind", pa.string()),  # "caption" (stage 1) or "conversation" (stage 2)
        ("conversations", pa.string()),  # the JSON-encoded LLaVA list of turns
        # per QA turn; ["caption"]; [] when imported. "element" is the name Parquet reads back,
        # so a file's schema equals this one
        ("qtypes", pa.list_(pa.field("element", pa.string()))),
        ("scene", pa.string()),  # JSON of the synth scene, "" when unknown
    ],
    metadata={"mmflow.kind": "instructions"},
)
KINDS = ("caption", "conversation")


def instruction_row(
    *,
    id: str,
    key: str,
    shard: str,
    kind: str,
    conversations: list[dict[str, str]],
    qtypes: Sequence[str] = (),
    scene: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One table row; ``shard`` must already be normalised (``mmflow.storage.normalize``)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return {
        "id": id,
        "key": key,
        "shard": shard,
        "kind": kind,
        "conversations": json.dumps(conversations, ensure_ascii=False),
        "qtypes": list(qtypes),
        "scene": json.dumps(scene, sort_keys=True) if scene is not None else "",
    }


def table_file_name(shard_uri: str) -> str:
    """``.../00003.tar`` -> ``00003.parquet``: a table file is named after its image shard."""
    base = posixpath.basename(shard_uri.replace("\\", "/"))
    return (base[: -len(".tar")] if base.endswith(".tar") else base) + ".parquet"


def write_instruction_table(storage: Storage, uri: str, rows: list[dict[str, Any]]) -> int:
    """Publish ``rows`` (from :func:`instruction_row`) as one Parquet file; returns the count."""
    table = pa.Table.from_pylist(rows, schema=INSTRUCTION_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_atomic(uri, buf.getvalue())
    return table.num_rows
