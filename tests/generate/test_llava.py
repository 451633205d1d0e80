"""Chat with a LLaVA: a tiny one (the converted tiny CLIP tower, a tiny Llama) trained here on
synthetic pictures answers 200 held-out questions exactly as transformers' own ``generate`` over
the exported folder does, one at a time and batched; long prompts, non-pictures and a scripted
several-turn session.

The model is trained in this process with plain torch (no Ray): the stages' harness is tested
in tests/stages/test_llava_stages.py; here the object is the decoding loop against the
reference implementation."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mmflow.data.instructions import eval_questions, make_conversation
from mmflow.generate.llava import Chat, chat_session, load_chat, read_image
from mmflow.generate.sampling import SamplingConfig
from mmflow.models.llava import (
    IMAGE_TOKEN,
    ChatIds,
    Pixels,
    VisionLayout,
    encode_conversation,
    hf_tokenizer,
    next_token_loss,
    pad_batch,
    processor_for,
    save_llava,
    set_trainable,
)
from mmflow.stages.synth_shapes import SynthShapesParams, make_sample
from tests.models.test_llava import chat_tokenizer, messages, tiny_llava, tiny_tower

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: see conftest

SHAPES = SynthShapesParams(image_size=32, num_samples=2000)  # 32 px: the tower's size, no resize
TRAIN_PICTURES, STEPS, BATCH = 320, 160, 32
HELD_OUT = range(1000, 1025)  # 25 pictures never trained on, 8 questions each
LAYOUT = VisionLayout()


def picture(i: int) -> tuple[bytes, dict]:
    data, truth = make_sample(SHAPES.seed, i, SHAPES)
    return data, truth["scene"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(folder, last loss): the tiny LLaVA trained and saved as the stages save it (its time is
    not asserted: the same training takes 3.5 times as long on one 2-core machine as on
    another)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(TRAIN_PICTURES):
        data, scene = picture(i)
        rows.append((data, make_conversation(scene, rng, (1, 4))[0]))
    corpus = [t["value"].replace(IMAGE_TOKEN, "") for _, turns in rows for t in turns]
    tok = chat_tokenizer(corpus, vocab_size=400)
    tower, image_processor = tiny_tower(seed=0)
    model, _ = tiny_llava(tok, tower, {"num_hidden_layers": 2}, LAYOUT)
    pixels = Pixels.of(image_processor)
    chat = ChatIds.of(tok)
    encode = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    n_image = LAYOUT.image_tokens(tower.config)
    seqs = [encode_conversation(turns, encode, chat, n_image) for _, turns in rows]
    px = torch.from_numpy(np.stack([pixels(data) for data, _ in rows]))

    set_trainable(model, projector=True, lm=True)
    model.train()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0
    )
    gen = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        pick = torch.randperm(len(seqs), generator=gen)[:BATCH].tolist()
        b = pad_batch([seqs[i] for i in pick], chat.pad)
        logits = model(
            input_ids=b["input_ids"], pixel_values=px[pick], attention_mask=b["attention_mask"]
        ).logits
        loss, _ = next_token_loss(logits, b["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    folder = str(tmp_path_factory.mktemp("llava") / "model")
    save_llava(model.eval(), processor_for(hf_tokenizer(tok), image_processor, tower.config, LAYOUT), folder,
               stage="test", steps=STEPS)  # fmt: skip
    return folder, float(loss.detach())


@pytest.fixture(scope="module")
def held_out():
    """(PIL picture, qtype, question, truth) for 200 questions about 25 held-out pictures."""
    rng = np.random.default_rng(1)
    out = []
    for i in HELD_OUT:
        data, scene = picture(i)
        img = Image.open(io.BytesIO(data)).convert("RGB")
        out += [(img, qtype, q, a) for qtype, q, a in eval_questions(scene, rng)]
    return out


@pytest.fixture(scope="module")
def offline():
    """No request may reach the Hub: the folder must hold everything."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def reference(trained, offline):
    """transformers' own model and processor over the folder."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = trained[0]
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    return model, AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def chat(trained, offline) -> Chat:
    return load_chat(trained[0])


def hf_answer(reference, img, msgs, max_new_tokens=8) -> str:
    model, processor = reference
    end = processor.tokenizer.convert_tokens_to_ids("<|end|>")
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = processor(images=img, text=text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end,
                             pad_token_id=processor.tokenizer.pad_token_id)  # fmt: skip
    return processor.tokenizer.decode(
        out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    ).strip()


def question(q: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]


def test_the_folder_is_what_transformers_loads(trained, reference, chat):
    folder, loss = trained
    model, processor = reference
    assert loss < 1.0, f"final training loss {loss:.2f}: the model learnt nothing to decode"
    assert type(processor).__name__ == "LlavaProcessor"
    assert model.config.image_seq_length == chat.image_tokens == 16
    assert processor.tokenizer.chat_template == processor.chat_template
    meta = json.load(open(os.path.join(folder, "mmflow_llava.json")))
    assert meta == {"stage": "test", "steps": STEPS}
    assert os.path.exists(os.path.join(folder, "model.safetensors"))
    assert chat.max_len == 256
    assert chat.ids.end == processor.tokenizer.convert_tokens_to_ids("<|end|>")


def test_chat_answers_as_transformers_generate_does(reference, chat, held_out):
    from mmflow.eval.vqa import vqa_scores

    ours = [chat.ask(img, q, max_new_tokens=8) for img, _, q, _ in held_out]
    theirs = [hf_answer(reference, img, question(q)) for img, _, q, _ in held_out]
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    differ = [
        (q, a, b) for (_, _, q, _), a, b in zip(held_out, ours, theirs, strict=True) if a != b
    ]
    assert same >= 0.99 * len(held_out), differ[:5]
    # the agreement is about something: the answers follow the pictures and the questions
    assert len(set(ours)) >= 10
    scores = vqa_scores(
        (qtype, a, truth) for (_, qtype, _, truth), a in zip(held_out, ours, strict=True)
    )
    assert scores["vqa_acc_background"] > 0.6 and scores["vqa_acc"] > 0.3, scores

    # batched: prompts of several lengths, one call
    px = torch.from_numpy(np.stack([chat.pixels(img) for img, *_ in held_out]))
    convs = [[{"from": "human", "value": f"{IMAGE_TOKEN}\n{q}"}] for _, _, q, _ in held_out]
    assert len({len(chat.prompt_ids(c)) for c in convs}) > 3
    batched = chat.answer_batch(px, convs, max_new_tokens=8)
    assert sum(a == b for a, b in zip(batched, theirs, strict=True)) >= 0.99 * len(held_out)
    assert sum(a == b for a, b in zip(batched, ours, strict=True)) >= 0.99 * len(held_out)


def test_sampled_answers_are_seeded(chat, held_out):
    img, _, q, _ = held_out[0]
    hot = SamplingConfig(temperature=2.0, seed=3)
    draws = [chat.ask(img, q, cfg=hot, max_new_tokens=8) for _ in range(2)]
    assert draws[0] == draws[1]  # the same seed, the same answer
    others = {
        chat.ask(img, q, cfg=SamplingConfig(temperature=2.0, seed=s), max_new_tokens=8)
        for s in range(6)
    }
    assert len(others) > 1


def test_a_prompt_over_the_context_is_refused(chat, held_out):
    img = held_out[0][0]
    long = "red circle " * 150  # ~300 tokens and 16 for the picture: over 256
    with pytest.raises(ValueError, match="over the model's context of 256 tokens"):
        chat.ask(img, long)
    with pytest.raises(ValueError, match="16 of them the picture"):
        # a short question, but the answer it may take would not fit
        chat.ask(img, "What color is the background?", max_new_tokens=250)


def test_read_image_names_a_file_that_is_not_a_picture(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    with pytest.raises(ValueError, match=r"notes\.txt: not a picture"):
        read_image(str(notes))
    with pytest.raises(FileNotFoundError, match=r"gone\.png: no such picture"):
        read_image(str(tmp_path / "gone.png"))
    grey = tmp_path / "grey.png"
    Image.new("L", (40, 30), 100).save(grey)
    img = read_image(str(grey))
    assert img.mode == "RGB" and img.size == (40, 30)


def test_chat_session_answers_several_turns_and_returns_them(chat, reference, held_out):
    img = held_out[0][0]
    questions = iter(
        ["What color is the background?", "How many shapes are there?", "  What shape is it?  ", ""]
    )
    shown: list[str] = []
    history = chat_session(
        chat, img, max_new_tokens=8, read=lambda prompt: next(questions), write=shown.append
    )
    assert [t["from"] for t in history] == ["human", "gpt"] * 3
    assert history[0]["value"] == f"{IMAGE_TOKEN}\nWhat color is the background?"
    # stripped; only the first turn holds the picture
    assert history[4]["value"] == "What shape is it?"
    assert shown == [f"llava> {t['value']}" for t in history[1::2]]
    # each turn answered with the earlier ones as context, as transformers answers them
    for k in (1, 2):
        earlier, asked = history[: 2 * k], history[2 * k]["value"]
        assert history[2 * k + 1]["value"] == chat.ask(img, asked, earlier, max_new_tokens=8)
        assert history[2 * k + 1]["value"] == hf_answer(
            reference, img, messages(history[: 2 * k + 1])
        )

    # end of input ends the session too; a turn over the context is reported and ends it
    def script(*lines):
        it = iter(lines)

        def read(prompt):
            try:
                return next(it)
            except StopIteration:
                raise EOFError from None

        return read

    shown.clear()
    history = chat_session(
        chat, img, max_new_tokens=8, read=script("How many shapes are there?"), write=shown.append
    )
    assert len(history) == 2 and len(shown) == 1
    shown.clear()
    history = chat_session(chat, img, max_new_tokens=8, read=script("Describe the picture.", "red " * 300),
                           write=shown.append)  # fmt: skip
    assert len(history) == 2 and shown[-1].startswith("mmflow chat: ") and "context" in shown[-1]


def test_load_chat_refuses_a_folder_without_a_model(tmp_path):
    with pytest.raises(ValueError, match="not a LLaVA model folder"):
        load_chat(str(tmp_path))
