"""The CLIP model source: every way in gives the same model with its own preprocessing and tokenizer."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from mmflow.models.clip import (
    WEIGHTS_FILE,
    ClipSpec,
    load_clip,
    load_transforms,
    resolve,
    save_clip,
)
from mmflow.stages.synth_shapes import SynthShapesParams, make_sample

ARCH = "mmflow-clip-tiny"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A randomly initialised tiny CLIP saved the way clip_train saves it."""
    import open_clip

    from mmflow.models.clip import model_config

    cfg = model_config(ARCH)  # registers mmflow's configs with open_clip
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH)
    out = tmp_path_factory.mktemp("clip") / "model"
    save_clip(model, ARCH, cfg, str(out), source="test")
    return model.eval(), str(out)


def sample_image() -> Image.Image:
    data, _ = make_sample(0, 3, SynthShapesParams(num_samples=4))
    return Image.open(io.BytesIO(data)).convert("RGB")


def features(clip, image: Image.Image, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        img = clip.model.encode_image(clip.preprocess(image)[None], normalize=True)
        txt = clip.model.encode_text(clip.tokenizer([caption]), normalize=True)
    return img, txt


def test_saved_folder_loads_through_every_entry_point(saved):
    import open_clip

    model, folder = saved
    image, caption = sample_image(), "a red circle"
    with torch.no_grad():
        want = model.encode_image(
            load_transforms(resolve(ClipSpec(pretrained=folder)))[0](image)[None]
        )

    # (b)/(c): the folder itself, as a stage output or a local path
    for source in (
        resolve(None, model_uri=folder, run_id="abc"),
        resolve(ClipSpec(pretrained=folder)),
    ):
        clip = load_clip(source)
        assert clip.arch == ARCH
        img, txt = features(clip, image, caption)
        assert torch.allclose(
            clip.model.encode_image(clip.preprocess(image)[None]), want, atol=1e-5
        )
        assert img.shape == txt.shape == (1, 64)
    assert resolve(None, model_uri=folder, run_id="abc").tag == "run:abc"

    # open_clip directly: local-dir, and the registered config + a weights file
    m1, _, pre = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    open_clip.add_model_config(f"{folder}/{ARCH}.json")
    m2, _, _ = open_clip.create_model_and_transforms(ARCH, pretrained=f"{folder}/{WEIGHTS_FILE}")
    for m in (m1, m2):
        with torch.no_grad():
            assert torch.allclose(m.eval().encode_image(pre(image)[None]), want, atol=1e-5)

    # (a): an architecture and a checkpoint file, through the spec
    clip = load_clip(resolve(ClipSpec(arch=ARCH, pretrained=f"{folder}/{WEIGHTS_FILE}")))
    with torch.no_grad():
        assert torch.allclose(
            clip.model.encode_image(clip.preprocess(image)[None]), want, atol=1e-5
        )


def test_transforms_without_the_model_match_the_models_own(saved):
    _, folder = saved
    image = sample_image()
    for spec in (ClipSpec(pretrained=folder), ClipSpec(arch=ARCH), ClipSpec(arch="ViT-B-32")):
        source = resolve(spec)
        transform, tokenizer = load_transforms(source)
        if spec.arch == "ViT-B-32":  # no weights needed to compare preprocessing
            import open_clip

            _, _, own = open_clip.create_model_and_transforms("ViT-B-32")
            own_tok = open_clip.get_tokenizer("ViT-B-32")
        else:
            clip = load_clip(source)
            own, own_tok = clip.preprocess, clip.tokenizer
        assert torch.equal(transform(image), own(image))
        assert torch.equal(tokenizer(["a blue square"]), own_tok(["a blue square"]))


def test_spec_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="name its `arch`"):
        ClipSpec(pretrained="laion2b_s34b_b79k")
    with pytest.raises(ValueError, match="no CLIP model"):
        resolve(ClipSpec())
    with pytest.raises(ValueError, match="keep one"):
        resolve(ClipSpec(arch=ARCH), model_uri=str(tmp_path))
    assert (
        resolve(ClipSpec(arch="ViT-B-32", pretrained="laion2b_s34b_b79k")).tag
        == "laion2b_s34b_b79k"
    )


def test_open_clips_own_trainer_trains_on_mmflow_shards(saved, tmp_path):
    """``python -m open_clip_train.main`` (shipped in open-clip-torch) reads mmflow's shards and
    a clip_train-style folder (``local-dir:``) in the locked environment: the webdataset pin
    (0.2.86; later ones break its ``group_by_keys_nothrow`` with ``KeyError: 'fname'``)."""
    import glob
    import subprocess
    import sys

    from mmflow.stages.synth_shapes import write_shard
    from mmflow.storage import Storage

    shapes = SynthShapesParams(num_samples=128, samples_per_shard=64, image_size=32)
    for shard in range(2):
        write_shard(shard, str(tmp_path / "shards"), shapes, Storage())
    cmd = [
        sys.executable, "-m", "open_clip_train.main", "--dataset-type", "webdataset",
        "--train-data", str(tmp_path / "shards" / "{00000..00001}.tar"), "--train-num-samples", "128",
        "--batch-size", "64", "--epochs", "1", "--model", f"local-dir:{saved[1]}", "--workers", "0",
        "--device", "cpu", "--precision", "fp32", "--logs", str(tmp_path / "logs"), "--name", "run",
        "--save-frequency", "1", "--report-to", "",
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (tmp_path / "logs" / "run" / "out.log").read_text()
    assert "Train Epoch: 0 [128/128 (100%)]" in log and "Contrastive_loss" in log
    assert glob.glob(str(tmp_path / "logs" / "run" / "checkpoints" / "epoch_1.pt"))
