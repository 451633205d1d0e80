"""The perceptual loss's feature network for VQ-GAN training: which one (``PerceptualSpec``,
a stage param), the picklable recipe the driver makes from the spec and the CLIP wired into
the stage, if any (``perceptual_plan``, given that CLIP's folder and MLflow run id), and the
frozen network each worker builds from it (``build_perceptual``): a CLIP image tower,
LPIPS/VGG16 from local weight files, or none. Nothing here imports torch at module level, nor
the stage contract."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, model_validator

from mmflow.models.clip import ClipSpec
from mmflow.params import Params


class PerceptualSpec(Params):
    """The feature network of the perceptual loss."""

    kind: Literal["auto", "clip", "lpips", "none"] = Field(
        "auto", description="auto: the wired `clip` input if any, else none"
    )
    weight: float = Field(0.1, ge=0, description="perceptual loss weight")
    clip: ClipSpec = Field(
        default_factory=ClipSpec, description="CLIP to use when no `clip` input is wired"
    )
    vgg_weights: str | None = Field(
        None, description="lpips: torchvision VGG16 state dict file (e.g. vgg16-397923af.pth)"
    )
    lpips_weights: str | None = Field(
        None, description="lpips: the lpips package's vgg.pth (linear layers); none = uniform"
    )

    @model_validator(mode="after")
    def _check(self) -> PerceptualSpec:
        if self.kind == "lpips" and not self.vgg_weights:
            raise ValueError("perceptual kind 'lpips' needs vgg_weights (a local VGG16 file)")
        return self


def perceptual_plan(
    spec: PerceptualSpec,
    clip_uri: str | None = None,
    clip_run_id: str | None = None,
    stage: str = "vqgan_train",
) -> dict[str, Any] | None:
    """What the workers build as the perceptual network (a picklable recipe), or None.

    ``clip_uri`` is the folder of a CLIP wired into the stage (its ``clip`` input; None when
    unwired) and ``clip_run_id`` the MLflow run that logged it; ``stage`` names the stage in
    the note printed when that CLIP goes unused."""
    kind = spec.kind
    if kind == "auto":
        kind = "clip" if clip_uri is not None or spec.clip.is_set else "none"
    if spec.weight == 0 or kind == "none":
        if clip_uri is not None:
            print(f"[{stage}] note: the `clip` input is unused (perceptual kind {spec.kind!r}, weight {spec.weight})", flush=True)  # fmt: skip
        return None
    if kind == "clip":
        if clip_uri is not None and spec.clip.is_set:
            raise ValueError(
                "a CLIP is wired as input `clip` and also named in loss.perceptual.clip; keep one"
            )
        if clip_uri is None and not spec.clip.is_set:
            raise ValueError(
                "perceptual kind 'clip' needs a `clip` input (e.g. clip_train) or loss.perceptual.clip"
            )
        return {
            "kind": "clip",
            "spec": None if clip_uri is not None else spec.clip.model_dump(),
            "uri": clip_uri,
            "run_id": clip_run_id if clip_uri is not None else None,
        }
    for path in (spec.vgg_weights, spec.lpips_weights):
        if path and not os.path.isfile(os.path.expanduser(path)):
            raise FileNotFoundError(f"loss.perceptual: no weights file {path}")
    return {"kind": "lpips", "vgg": spec.vgg_weights, "lpips": spec.lpips_weights}


def build_perceptual(plan: dict[str, Any] | None):
    """The frozen feature network a plan describes (in the worker that uses it)."""
    if plan is None:
        return None
    from mmflow.models.vqgan_losses import LPIPS, ClipPerceptual

    if plan["kind"] == "clip":
        from mmflow.models.clip import ClipSpec, load_clip, resolve

        spec = ClipSpec(**plan["spec"]) if plan["spec"] else None
        clip = load_clip(resolve(spec, plan["uri"], plan["run_id"]))
        return ClipPerceptual(clip.model.visual)
    return LPIPS(
        os.path.expanduser(plan["vgg"]), plan["lpips"] and os.path.expanduser(plan["lpips"])
    )
