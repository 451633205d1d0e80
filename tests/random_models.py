"""Untrained models saved the way their training stages save them, as test stages: the
folders the downstream stages read are real, and a Ray Train start per test module is saved.
Their training stages are tested on their own (tests/stages/test_clip_train.py, ...)."""

from __future__ import annotations

import tempfile

from mmflow.params import Params
from mmflow.stage import Resources, Stage, StageContext


class RandomClipParams(Params):
    arch: str = "mmflow-clip-tiny"
    seed: int = 0


class RandomClip(Stage):
    """A randomly initialised open_clip architecture, saved as clip_train saves it (``save_clip``)."""

    type = "test_random_clip"
    Params = RandomClipParams
    outputs = {"model": "model"}
    resources = Resources(workers=0)

    def run(self, ctx: StageContext) -> None:
        import open_clip
        import torch

        from mmflow.models.clip import model_config, save_clip

        p: RandomClipParams = ctx.params
        cfg = model_config(p.arch)  # registers mmflow's configs with open_clip
        torch.manual_seed(p.seed)
        with tempfile.TemporaryDirectory() as tmp:
            save_clip(open_clip.create_model(p.arch), p.arch, cfg, tmp, source="clip_train")
            ctx.storage.upload_dir(tmp, ctx.outputs["model"])
