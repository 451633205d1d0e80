"""The LLaVA stages end to end on a tiny pipeline (synth_shapes -> a CLIP as clip_train saves
it -> synth_instructions -> lm_train -> llava_align -> llava_instruct) through the runner, on
real Ray, DeepSpeed and MLflow: each stage's held-out figures and freeze policy, the exported
folder transformers loads offline, the registered model, ``--only llava_instruct`` on the
committed stage 1, ``mmflow chat`` on the pipeline, and llava_instruct on two ZeRO-2 workers,
one killed part way, resumed to the end.

The runs are a few steps long: the figures are measured, but their values mean little; the
quickstart is where they are judged (docs/llava.md)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import ray.cloudpickle
from mlflow import MlflowClient

from mmflow.config import load_pipeline
from mmflow.runner import Runner
from mmflow.storage import Storage
from tests.conftest import pipeline_yaml
from tests.faults import killed_once, two_worker_context

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


STAGES = """
synth:
  type: synth_shapes
  params: {num_samples: 384, samples_per_shard: 128, image_size: 32, mismatch_fraction: 0.2, image_format: png}
clip:
  type: tests.random_models:RandomClip
instructions:
  type: synth_instructions
  inputs: {shards: synth}
  params: {conversations_per_image: 2, turns_min: 2, turns_max: 4}
lm:
  type: lm_train
  inputs: {instructions: instructions}
  params:
    vocab_size: 400
    model_cfg: {num_hidden_layers: 2}
    val_rows: 32
    train: {max_steps: 20, batch_size: 16, warmup_steps: 2, checkpoint_every: 10, log_every: 5}
  resources: {cpus: 2, workers: 1}
align:
  type: llava_align
  inputs: {instructions: instructions, lm: lm, clip: clip}
  params:
    val_rows: 16
    train: {max_steps: 10, batch_size: 16, warmup_steps: 2, checkpoint_every: 5, log_every: 5}
  resources: {cpus: 2, workers: 1}
instruct:
  type: llava_instruct
  inputs: {instructions: instructions, align: align}
  params:
    val_rows: 16
    vqa_images: 8
    train: {max_steps: 20, batch_size: 16, warmup_steps: 2, checkpoint_every: 10, log_every: 5}
  resources: {cpus: 2, workers: 1}
"""
QTYPES = ("color", "shape", "count", "position", "size", "background", "yesno")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_session):
    folder = tmp_path_factory.mktemp("llava")
    path = pipeline_yaml(folder, STAGES, name="lv")
    runner = Runner(load_pipeline(path))
    report = runner.run()
    assert report.executed == ["synth", "clip", "instructions", "lm", "align", "instruct"]
    return runner, path


def _row(runner, name):
    return {r.name: r for r in runner.status()}[name]


def _manifest_model(row) -> dict:
    return json.load(open(os.path.join(row.output, "_MANIFEST.json")))["outputs"]["model"]


def test_each_stage_commits_its_held_out_figures(trained, tmp_path):
    runner, _ = trained
    lm, align, instruct = (_row(runner, n) for n in ("lm", "align", "instruct"))
    assert {r.state for r in runner.status()} == {"done"}

    assert 0 < lm.metrics["val_nll"] < 10 and lm.metrics["val_ppl"] > 1
    assert lm.metrics["samples_seen"] > 0 and lm.metrics["skipped_total"] == 0
    assert _manifest_model(lm)["format"] == "hf-causal-lm" and _manifest_model(lm)["steps"] == 20

    assert 0 < align.metrics["val_caption_nll"] < 10
    assert align.metrics["samples_seen"] > 0 and align.metrics["skipped_total"] == 0
    assert _manifest_model(align)["format"] == "hf-llava" and _manifest_model(align)["steps"] == 10

    m = instruct.metrics
    for k in (
        "vqa_acc",
        "vqa_acc_wrong_image",
        "val_answer_nll",
        "describe_match",
        "samples_seen",
        *(f"vqa_acc_{q}" for q in QTYPES),
    ):
        assert k in m, k
    assert all(0 <= m[k] <= 1 for k in m if k.startswith("vqa_acc"))
    assert 0 < m["val_answer_nll"] < 10 and m["samples_seen"] > 0 and m["skipped_total"] == 0
    info = _manifest_model(instruct)
    assert info["format"] == "hf-llava" and info["steps"] == 20 and info["image_tokens"] == 16

    client = MlflowClient(runner.p.tracking_uri)
    version = client.get_model_version(info["registered_model"], str(info["registered_version"]))
    assert info["registered_model"] == "lv-instruct" and version.run_id == instruct.mlflow_run_id
    run = client.get_run(instruct.mlflow_run_id)
    assert "train/loss" in run.data.metrics and "vqa_acc" in run.data.metrics
    # the sample answers: a table of the first pictures' questions and a sheet of the pictures
    assert [f.path for f in client.list_artifacts(instruct.mlflow_run_id, "images/answers")] == [
        "images/answers/step_000020.png"
    ]
    local = client.download_artifacts(instruct.mlflow_run_id, "vqa/step_000020.json", str(tmp_path))
    table = json.load(open(local))
    assert table["columns"] == ["key", "type", "question", "answer", "truth"]
    assert len(table["data"]) == 8 * 8  # 8 pictures, one question of each of the 8 types


def test_the_instruct_folder_is_what_transformers_loads_offline(trained, monkeypatch):
    import huggingface_hub.constants
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    runner, _ = trained
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    folder = _row(runner, "instruct").outputs["model"]
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    asked = {"type": "text", "text": "What color is the background?"}
    msgs = [{"role": "user", "content": [{"type": "image"}, asked]}]
    inputs = processor(images=Image.new("RGB", (32, 32), (15, 15, 15)),
                       text=processor.apply_chat_template(msgs, add_generation_prompt=True), return_tensors="pt")  # fmt: skip
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)  # fmt: skip
    assert out.shape[1] > inputs["input_ids"].shape[1]
    meta = json.load(open(os.path.join(folder, "mmflow_llava.json")))
    assert meta["stage"] == "instruct" and meta["steps"] == 20


def test_each_stage_trains_only_what_its_freeze_policy_says(trained):
    """Stage 1 keeps the pipeline's CLIP (converted) and lm_train's LM as they were; stage 2
    changes the LM and the projector and keeps the tower."""
    import torch
    from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

    from mmflow.models.clip import load_clip, resolve
    from mmflow.models.llava_vision import open_clip_vision

    runner, _ = trained
    out = {n: _row(runner, n).outputs["model"] for n in ("clip", "lm", "align", "instruct")}
    clip_cfg = json.load(open(os.path.join(out["clip"], "open_clip_config.json")))["model_cfg"]
    _, tower = open_clip_vision(load_clip(resolve(None, out["clip"])).model.visual, clip_cfg)
    lm = LlamaForCausalLM.from_pretrained(out["lm"]).model.state_dict()
    align, instruct = (
        LlavaForConditionalGeneration.from_pretrained(out[n]).model for n in ("align", "instruct")
    )

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert same(align.vision_tower.state_dict(), tower)  # the pipeline's CLIP, weight for weight
    assert same(align.language_model.state_dict(), lm)  # frozen in stage 1
    assert same(instruct.vision_tower.state_dict(), tower)  # frozen in stage 2 (train_vision off)
    assert not same(instruct.language_model.state_dict(), lm)
    assert not same(
        instruct.multi_modal_projector.state_dict(), align.multi_modal_projector.state_dict()
    )


def _picture(tmp_path) -> str:
    from mmflow.stages.synth_shapes import SynthShapesParams, make_sample

    data, _ = make_sample(0, 7, SynthShapesParams(image_size=32, image_format="png"))
    path = tmp_path / "pic.png"
    path.write_bytes(data)
    return str(path)


def test_mmflow_chat_answers_about_a_picture(trained, tmp_path, capsys):
    from mmflow.cli import main

    _, path = trained
    capsys.readouterr()
    assert main(["chat", path, "What color is the background?", "--image", _picture(tmp_path),
                 "--max-new-tokens", "8"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1, out

    (tmp_path / "notes.txt").write_text("not a picture")
    assert main(["chat", path, "What color is it?", "--image", str(tmp_path / "notes.txt")]) == 2
    err = capsys.readouterr().err
    assert "mmflow chat:" in err and "notes.txt" in err


def test_mmflow_chat_takes_the_question_after_the_image(trained, tmp_path, capsys):
    """The order the usage line and pipelines/quickstart.yaml show:
    ``mmflow chat PIPELINE --image PIC QUESTION``."""
    from mmflow.cli import main

    _, path = trained
    try:
        code = main(["chat", path, "--image", _picture(tmp_path), "What color is the background?",
                     "--max-new-tokens", "8"])  # fmt: skip
    except SystemExit as e:  # argparse refused the command line
        code = e.code
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.count("\n") == 1, captured.out


def test_only_llava_instruct_reruns_on_the_committed_stage_1(trained):
    runner, path = trained
    changed = Runner(load_pipeline(path, ["instruct.params.train.max_steps=24"]))
    assert [
        n for n in changed.fingerprints if changed.fingerprints[n] != runner.fingerprints[n]
    ] == ["instruct"]
    report = changed.run(only=["instruct"])
    assert report.executed == ["instruct"] and report.cached == []
    assert _manifest_model(_row(changed, "instruct"))["steps"] == 24
    assert _row(changed, "align").output == _row(runner, "align").output  # stage 1 as it was
    again = changed.run()  # every other stage was already committed
    assert again.executed == [] and again.cached == list(changed.p.stages)


@pytest.mark.slow  # a two-worker Ray Train run and its restart (1-2 min here): -m "not slow"
def test_zero2_on_two_workers_killed_part_way_resumes_to_the_same_step(trained, tmp_path):
    from mmflow.train import fit

    runner, _ = trained
    task = _task_like_the_stage(runner)
    killing = killed_once(task, str(tmp_path / "killed"), at_step=7)
    ctx = two_worker_context(tmp_path, "instruct")
    cfg = task.train.model_copy(update={"max_failures": 1, "checkpoint_every": 5})
    final = fit(killing, cfg, ctx)
    assert os.path.exists(tmp_path / "killed") and final["step"] == 12
    assert json.load(open(tmp_path / "model" / "mmflow_llava.json"))["steps"] == 12
    assert (tmp_path / "model" / "model.safetensors").exists()


def _task_like_the_stage(runner):
    """llava_instruct's task, built from its committed inputs as the stage builds it, without
    evaluation data."""
    from transformers import AutoConfig

    from mmflow.data.instruction_rows import table_pairs
    from mmflow.models.llava import VisionLayout
    from mmflow.stages.llava_instruct import InstructTrainConfig
    from mmflow.tasks.llava import LlavaTask
    from mmflow.tasks.llava_setup import pixels_of_export, tokenizer_json

    align = _row(runner, "align").outputs["model"]
    config = AutoConfig.from_pretrained(align)
    layout = VisionLayout(config.vision_feature_layer, config.vision_feature_select_strategy)
    pairs = table_pairs(Storage(), _row(runner, "instructions").outputs["instructions"])
    return LlavaTask(
        mode="instruct", sources={"llava": align}, layout=layout, image_processor=pixels_of_export(align),
        image_tokens=layout.image_tokens(config.vision_config),
        train=InstructTrainConfig(max_steps=12, batch_size=8, warmup_steps=2), tokenizer_json=tokenizer_json(align),
        max_len=int(config.text_config.max_position_embeddings), shuffle_buffer=64, threads=1,
        data={"pairs": pairs, "kinds": ("conversation",), "holdout_fraction": 0.05, "images": True},
        save_meta={"align": align},
    )  # fmt: skip
