"""``joint_train`` end to end on a small token table: DeepSpeed, held-out figures, the model
drawing and captioning through ``mmflow generate``, ZeRO-2 kill and resume, ZeRO-3 export,
and a param change rerunning only this stage.

The VQ-GAN here is untrained (random weights, saved the way ``vqgan_train`` saves): the
table is real, the figures are measured, but their values mean nothing; the quickstart is
where they are judged (docs/joint.md)."""

from __future__ import annotations

import glob
import json
import os
import sys

import pytest
import ray.cloudpickle
from mlflow import MlflowClient

from mmflow.config import load_pipeline
from mmflow.runner import Runner
from mmflow.stage import Stage, StageContext
from tests.conftest import pipeline_yaml, run_cli
from tests.faults import killed_once, two_worker_context

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class RandomVqgan(Stage):
    """An untrained 32 px VQ-GAN (f4: 8x8 codes of 64), saved as vqgan_train saves it."""

    type = "test_joint_random_vqgan"
    outputs = {"model": "model"}

    def run(self, ctx: StageContext) -> None:
        import tempfile

        import torch

        from mmflow.models.vqgan import VQGAN, VQGANConfig, save_vqgan

        torch.manual_seed(0)
        cfg = VQGANConfig(image_size=32, channels=16, channel_mult=(1, 2, 2), z_channels=16,
                          codebook_size=64, codebook_dim=4)  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            save_vqgan(VQGAN(cfg).eval(), tmp, "test-random")
            ctx.storage.upload_dir(tmp, ctx.outputs["model"])


STAGES = """
synth:
  type: synth_shapes
  params: {num_samples: 480, samples_per_shard: 240, image_size: 32, mismatch_fraction: 0.0}
vq:
  type: tests.stages.test_joint_train:RandomVqgan
clip:
  type: tests.random_models:RandomClip
tok:
  type: pretokenize
  inputs: {shards: synth, model: vq}
  params: {vocab_size: 300, preview: 0}
joint:
  type: joint_train
  inputs: {tokens: tok.tokens, vqgan: vq, shards: synth, clip: clip}
  params:
    model_cfg: {dim: 64, n_layers: 2, n_heads: 2, mlp_hidden: 128, max_seq_len: 160}
    train: {max_steps: 12, batch_size: 16, warmup_steps: 2, checkpoint_every: 6, log_every: 4}
    val_rows: 32
    eval_prompts: 8
    eval_captions: 8
    judge_steps: 100
    judge_images: 200
    preview: 4
  resources: {cpus: 2, workers: 1}
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_session):
    folder = tmp_path_factory.mktemp("joint")
    path = pipeline_yaml(folder, STAGES)
    runner = Runner(load_pipeline(path))
    runner.run()
    return runner, path


def _row(runner, name="joint"):
    return {r.name: r for r in runner.status()}[name]


def test_joint_train_reports_held_out_figures_and_registers_the_model(trained):
    runner, _ = trained
    row = _row(runner)
    assert row.state == "done"
    for k in ("val_text_nll", "val_image_nll", "t2i_color_match", "t2i_shape_match",
              "t2i_match", "t2i_match_noguide", "i2t_match", "judge_acc", "t2i_match_best",
              "t2i_best_guidance", "t2i_clip_score", "t2i_clip_score_noguide",
              "real_clip_score"):  # fmt: skip
        assert k in row.metrics, k
    for k in ("t2i_clip_score", "t2i_clip_score_noguide", "real_clip_score"):
        assert -1 <= row.metrics[k] <= 1, (k, row.metrics[k])  # cosines
    assert row.metrics["t2i_guidance"] == 3.0  # the fixed scale the guided figures used
    assert 0 < row.metrics["val_image_nll"] < 10 and 0 <= row.metrics["t2i_match"] <= 1
    assert row.metrics["judge_acc_color"] > 0.5  # 100 steps on 200 pictures: far above chance (1/6)
    man = json.load(open(os.path.join(row.output, "_MANIFEST.json")))
    info = man["outputs"]["model"]
    assert info["format"] == "mmflow-joint" and info["steps"] == 12
    client = MlflowClient(runner.p.tracking_uri)
    version = client.get_model_version(info["registered_model"], str(info["registered_version"]))
    assert version.run_id == row.mlflow_run_id
    run = client.get_run(row.mlflow_run_id)
    assert run.data.params["params.sampling.guidance_scale"] == "3.0"
    assert "train/tokens_per_s" in run.data.metrics
    images = [f.path for f in client.list_artifacts(row.mlflow_run_id, "images/generated")]
    assert images, "no grid of generated pictures in MLflow"


def test_the_model_draws_and_captions(trained):
    from mmflow.generate.joint import load_painter
    from mmflow.generate.sampling import SamplingConfig

    runner, _ = trained
    painter = load_painter(_row(runner).outputs["model"])
    # the stage's own sampling settings travel with the model (mmflow generate's defaults)
    assert painter.sampling["guidance_scale"] == 3.0 and painter.sampling["temperature"] == 0.7
    assert painter.vocab.prompt_repeats == 2  # the stage default, saved with the model
    pictures = painter.draw(["a red circle on a white background"] * 3, SamplingConfig(seed=1))
    assert pictures.shape == (3, 3, 32, 32) and pictures.dtype.is_floating_point is False
    again = painter.draw(["a red circle on a white background"] * 3, SamplingConfig(seed=1))
    assert (pictures == again).all()  # seeded
    captions = painter.caption_codes(painter.encode_images([_pil(pictures[0])]),
                                     SamplingConfig(temperature=0))  # fmt: skip
    assert len(captions) == 1 and isinstance(captions[0], str)


def test_prompt_repeats_default_fits_the_context_and_a_set_value_is_kept():
    from mmflow.models.joint import JointVocab
    from mmflow.stages.joint_train import JointTrainParams, fitting_vocab

    def repeats(p, max_text_len, context=128):
        vocab = JointVocab(text_vocab=300, codebook_size=64, image_tokens=64,
                           max_text_len=max_text_len)  # fmt: skip
        return fitting_vocab(p, vocab, context).prompt_repeats

    default = JointTrainParams()
    assert repeats(default, 20) == 2  # 2 x 20 + 64 + 5 = 109 fits
    assert repeats(default, 41) == 1  # 82 + 69 would not: once
    assert repeats(default, 80) == 1  # not even once: the stage's error says so
    assert repeats(JointTrainParams(prompt_repeats=3), 41) == 3  # asked: kept


def test_a_layout_longer_than_the_context_stops_the_stage_before_any_work(trained):
    from mmflow.runner import StageFailed

    runner, path = trained
    changed = Runner(load_pipeline(path, ["joint.params.prompt_repeats=8"]))
    with pytest.raises(
        StageFailed,
        match=r"joint: sequences of \d+ tokens .*prompt_repeats 8 x "
        r"max_text_len \d+ text .* exceed max_seq_len 160 .*lower prompt_repeats",
    ):
        changed.run()
    row = _row(changed)
    assert row.state != "done" and not row.metrics  # not even the judge ran


def test_a_clip_both_wired_and_named_stops_at_load(trained, tmp_path):
    from mmflow.config import ConfigError

    _, path = trained
    with pytest.raises(ConfigError, match=r"joint.*params\.clip.*also wired as input `clip`"):
        load_pipeline(path, ["joint.params.clip.arch=mmflow-clip-tiny"])


def test_auto_guidance_is_checked_at_load(tmp_path):
    from mmflow.config import ConfigError

    path = pipeline_yaml(tmp_path, STAGES)
    auto = "joint.params.sampling.guidance_scale=auto"
    assert load_pipeline(path, [auto]).stages["joint"].params.sampling.auto
    for bad, said in (("-1", "must be >= 0 or 'auto'"), ("often", "auto")):
        with pytest.raises(ConfigError, match=rf"joint.*guidance_scale.*{said}"):
            load_pipeline(path, [f"joint.params.sampling.guidance_scale={bad}"])
    with pytest.raises(ConfigError, match=r"joint.*auto picks a scale from guidance_sweep"):
        load_pipeline(path, [auto, "joint.params.guidance_sweep=[]"])
    # nothing to judge the sweep's pictures by: no ground-truth shards, no CLIP
    unjudged = STAGES.replace("vqgan: vq, shards: synth, clip: clip", "vqgan: vq")
    with pytest.raises(ConfigError, match=r"joint.*guidance_scale.*auto needs a judge"):
        load_pipeline(pipeline_yaml(tmp_path, unjudged, filename="u.yaml"), [auto])


def _without_ground_truth(shard: str, out: str) -> None:
    """A copy of a synth shard whose json lost its ``synth`` scene, as web data has none."""
    import io
    import tarfile

    with tarfile.open(shard) as src, tarfile.open(out, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name.endswith(".json"):
                meta = json.loads(data)
                meta.pop("synth")
                data = json.dumps(meta).encode()
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))


def test_without_ground_truth_the_held_out_captions_are_the_prompts(trained, tmp_path):
    from mmflow.data.holdout import is_held_out
    from mmflow.data.shards import list_shards
    from mmflow.data.token_table import table_files
    from mmflow.storage import Storage
    from mmflow.tasks.joint_eval import build_eval_set, read_table

    runner, _ = trained
    tok = _row(runner, "tok").outputs
    files = table_files(tok["tokens"])
    tokenizer_json = open(os.path.join(tok["text_tokenizer"], "tokenizer.json")).read()
    web = []
    for i, uri in enumerate(list_shards(Storage(), _row(runner, "synth").outputs["shards"])):
        web.append(str(tmp_path / f"{i:05d}.tar"))
        _without_ground_truth(uri.removeprefix("file://"), web[-1])
    kw = dict(holdout_fraction=0.1, max_text_len=64, image_size=32, val_rows=8, prompts=6,
              captions=6, judge_steps=1, judge_train_images=10, threads=1)  # fmt: skip
    es, judge, _ = build_eval_set(files, web, tokenizer_json, **kw)
    table = read_table(files)
    held = [t for k, t in zip(table["key"], table["text_ids"], strict=True) if is_held_out(k, 0.1)]
    assert judge == {} and es.judge_state is None and not es.caption_codes
    assert es.prompt_ids == held[:6] and len(es.prompts) == 6
    captions = {m.decode() for m in _members(web, ".txt")}
    assert set(es.prompts) <= captions  # decoded back to the shards' own captions
    assert es.prompt_pictures.shape == (6, 3, 32, 32)
    # no shards: the prompts still, but no real pictures to score beside the drawn ones
    es, _, _ = build_eval_set(files, None, tokenizer_json, **kw)
    assert es.prompt_ids == held[:6] and es.prompt_pictures is None


def _members(tars: list[str], suffix: str) -> list[bytes]:
    import tarfile

    out = []
    for path in tars:
        with tarfile.open(path) as t:
            out += [t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(suffix)]
    return out


def _pil(picture):
    from PIL import Image

    return Image.fromarray(picture.permute(1, 2, 0).numpy())


def test_generate_cli_writes_pictures_and_refuses_bad_prompts(trained, tmp_path):
    _, path = trained
    out = tmp_path / "d"
    r = run_cli("generate", path, "--prompt", "a blue square on a black background",
                "--n", "8", "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert len(glob.glob(str(out / "0*.png"))) == 8 and (out / "contact_sheet.png").exists()
    r = run_cli("generate", path, "--prompt", "a zebra on a tricycle", "--out", str(out))
    assert r.returncode == 2 and "'zebra'" in r.stderr and "never appeared" in r.stderr
    r = run_cli("generate", path, "--prompt", "a red circle " * 30, "--out", str(out))
    assert r.returncode == 2 and "takes at most" in r.stderr
    r = run_cli("generate", path, "--caption", str(out / "000.png"))
    assert r.returncode == 0 and r.stdout.startswith(str(out / "000.png")), r.stderr
    (tmp_path / "bad.png").write_bytes(b"not a png")
    r = run_cli("generate", path, "--caption", str(tmp_path / "bad.png"))
    assert r.returncode == 2 and "bad.png" in r.stderr


def test_zero3_rerun_touches_only_joint_exports_a_plain_model_and_its_auto_guidance(trained):
    from mmflow.generate.joint import load_painter
    from mmflow.generate.sampling import SamplingConfig

    runner, path = trained
    changed = Runner(load_pipeline(path, ["joint.params.train.zero_stage=3",
                                          "joint.params.sampling.guidance_scale=auto"]))  # fmt: skip
    assert [
        n for n in changed.fingerprints if changed.fingerprints[n] != runner.fingerprints[n]
    ] == ["joint"]
    report = changed.run()
    assert report.executed == ["joint"] and report.cached == ["synth", "vq", "clip", "tok"]
    painter = load_painter(_row(changed).outputs["model"])
    assert painter.draw(["a green diamond"], SamplingConfig()).shape == (1, 3, 32, 32)
    # auto: the sweep's best scale (on draws of its own) drew the figures and went with the model
    m = _row(changed).metrics
    assert m["t2i_guidance"] == m["t2i_best_guidance"] and m["t2i_guidance"] in (1, 1.5, 2, 3, 5)
    assert painter.sampling_for(drawing=True).guidance_scale == m["t2i_guidance"]


def test_zero2_on_two_workers_killed_part_way_resumes_to_the_same_step(trained, tmp_path):
    from mmflow.stages.joint_train import training_rows
    from mmflow.train import fit

    runner, _ = trained
    task = _task_like_the_stage(runner)
    killing = killed_once(task, str(tmp_path / "killed"), at_step=7)
    ctx = two_worker_context(tmp_path, "joint")
    cfg = task.train.model_copy(update={"max_failures": 1, "checkpoint_every": 5})
    files = _row(runner, "tok").outputs["tokens"]
    from mmflow.data.token_table import table_files

    final = fit(killing, cfg, ctx, datasets={"train": training_rows(table_files(files), 0.1)})
    assert os.path.exists(tmp_path / "killed") and final["step"] == 12
    assert json.load(open(tmp_path / "model" / "joint.json"))["steps"] == 12


def _task_like_the_stage(runner):
    """The stage's task, built from its committed inputs, without evaluation data."""
    import pyarrow.parquet as pq

    from mmflow.data.token_table import read_metadata, table_files
    from mmflow.generate.sampling import SamplingConfig
    from mmflow.models.joint import JointVocab, joint_config
    from mmflow.stages.joint_train import JointTrainConfig, _longest_caption
    from mmflow.tasks.joint import JointTask
    from mmflow.tasks.joint_eval import JointEvalSet

    tok = _row(runner, "tok").outputs
    meta = read_metadata(pq.read_schema(table_files(tok["tokens"])[0]))
    files = table_files(tok["tokens"])
    vocab = JointVocab(text_vocab=int(meta["text_vocab_size"]), codebook_size=64,
                       image_tokens=64, max_text_len=_longest_caption(files))  # fmt: skip
    return JointTask(
        cfg=joint_config("joint-tiny", {"dim": 64, "n_layers": 2, "n_heads": 2, "mlp_hidden": 128}),
        vocab=vocab, train=JointTrainConfig(max_steps=12, batch_size=8, warmup_steps=2),
        i2t_share=0.3, cond_dropout=0.1, loss_weights={"text": 1.0, "image": 1.0},
        shuffle_buffer=64, sampling=SamplingConfig(), eval_set=JointEvalSet(),
        vqgan_uri=_row(runner, "vq").outputs["model"],
        tokenizer_json=open(os.path.join(tok["text_tokenizer"], "tokenizer.json")).read(),
        save_meta={"arch": "joint-tiny"},
    )  # fmt: skip
