"""LLaVA's vision tower: the pipeline's own CLIP, or a pretrained CLIP/SigLIP, as transformers holds it.

The default path needs no download: ``clip_train``'s open_clip ViT becomes transformers'
``CLIPVisionModel`` by renaming weights (:func:`open_clip_vision`; the same network, a test
holds their outputs equal), and its eval preprocessing becomes a ``CLIPImageProcessor``. With
a network, ``pretrained`` names a Hugging Face CLIP or SigLIP model (hub name or local path)
and its vision half is used as it is. :func:`prepare_vision_tower` writes either as a folder
(``save_pretrained``) beside the preprocessing settings :class:`mmflow.models.llava.Pixels` takes.
"""

from __future__ import annotations

import json
import os
from typing import Any

from mmflow.models.common.hf import save_pretrained


def open_clip_vision(visual, model_cfg: dict[str, Any]):
    """(``CLIPVisionConfig``, state dict) of an open_clip ``VisionTransformer`` for transformers'
    ``CLIPVisionModel``: the same network, weights renamed (q, k, v split from ``in_proj``)."""
    from transformers import CLIPVisionConfig

    vc = model_cfg["vision_cfg"]
    if (
        not isinstance(vc.get("layers"), int)
        or vc.get("timm_model_name")
        or vc.get("attentional_pool")
    ):
        raise ValueError(
            "only open_clip's plain ViT towers convert to transformers' CLIPVisionModel"
        )
    width = int(vc["width"])
    heads = width // int(vc.get("head_width", 64))
    config = CLIPVisionConfig(
        hidden_size=width, intermediate_size=int(width * float(vc.get("mlp_ratio", 4.0))),
        num_hidden_layers=int(vc["layers"]), num_attention_heads=heads,
        image_size=int(vc["image_size"]), patch_size=int(vc["patch_size"]),
        hidden_act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
        projection_dim=int(model_cfg.get("embed_dim", width)), layer_norm_eps=1e-5,
    )  # fmt: skip
    src = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    out = {
        "embeddings.class_embedding": src["class_embedding"],
        "embeddings.patch_embedding.weight": src["conv1.weight"],
        "embeddings.position_embedding.weight": src["positional_embedding"],
        "pre_layrnorm.weight": src["ln_pre.weight"], "pre_layrnorm.bias": src["ln_pre.bias"],
        "post_layernorm.weight": src["ln_post.weight"], "post_layernorm.bias": src["ln_post.bias"],
    }  # fmt: skip
    for i in range(config.num_hidden_layers):
        a, b = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        q, k, v = src[a + "attn.in_proj_weight"].chunk(3)
        qb, kb, vb = src[a + "attn.in_proj_bias"].chunk(3)
        for name, w, bias in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
            out[f"{b}self_attn.{name}_proj.weight"], out[f"{b}self_attn.{name}_proj.bias"] = w, bias
        pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}  # fmt: skip
        for old, new in pairs.items():
            out[f"{b}{new}.weight"], out[f"{b}{new}.bias"] = (
                src[f"{a}{old}.weight"],
                src[f"{a}{old}.bias"],
            )
    left = sorted(set(src) - _converted_names(config.num_hidden_layers))
    if left:  # e.g. layer scale (ls_1.gamma): loading strictly would still compute another network
        raise ValueError(
            f"open_clip vision weights with no place in CLIPVisionModel: {', '.join(left[:4])} "
            "(layer scale, qk-norm and scaled attention do not convert)"
        )
    return config, out


def _converted_names(layers: int) -> set[str]:
    """The open_clip weights :func:`open_clip_vision` carries over (``proj`` is CLIP's
    projection to the joint space, which LLaVA does not use)."""
    names = {"class_embedding", "conv1.weight", "positional_embedding", "ln_pre.weight", "ln_pre.bias",
             "ln_post.weight", "ln_post.bias", "proj"}  # fmt: skip
    for i in range(layers):
        a = f"transformer.resblocks.{i}."
        names |= {a + "attn.in_proj_weight", a + "attn.in_proj_bias"}
        names |= {f"{a}{n}.{w}" for n in ("attn.out_proj", "ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj")
                  for w in ("weight", "bias")}  # fmt: skip
    return names


def clip_image_processor(preprocess_cfg: dict[str, Any], image_size: int):
    """open_clip's eval preprocessing (resize shortest side, centre crop, normalise) as a
    transformers ``CLIPImageProcessor``."""
    from transformers import CLIPImageProcessor

    resample = {"bilinear": 2, "bicubic": 3, "nearest": 0}[
        preprocess_cfg.get("interpolation", "bicubic")
    ]
    return CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        resample=resample, image_mean=list(preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        image_std=list(preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
        do_convert_rgb=True,
    )  # fmt: skip


PIXELS_FILE = "mmflow_pixels.json"  # Pixels(**this): size, mean, std, resample


def pixels_of(image_processor) -> dict[str, Any]:
    """The :class:`~mmflow.models.llava.Pixels` settings of a transformers image processor."""
    crop = getattr(image_processor, "crop_size", None) or image_processor.size
    size = crop.get("height") or crop.get("shortest_edge")
    return {"size": int(size), "mean": [float(x) for x in image_processor.image_mean],
            "std": [float(x) for x in image_processor.image_std], "resample": int(image_processor.resample)}  # fmt: skip


def prepare_vision_tower(
    out_dir: str, clip_dir: str | None = None, pretrained: str | None = None
) -> dict[str, Any]:
    """Write the vision tower into ``out_dir`` (``save_pretrained``, safetensors) with its
    ``mmflow_pixels.json``; from a ``clip_train`` folder (``clip_dir``) or a Hugging Face CLIP /
    SigLIP model (``pretrained``). Returns the pixel settings."""
    if bool(clip_dir) == bool(pretrained):
        raise ValueError(
            "a vision tower comes from a clip_train model or from `pretrained`, exactly one"
        )
    if clip_dir:
        from transformers import CLIPVisionModel

        from mmflow.models.clip import CONFIG_FILE, load_clip, resolve

        with open(os.path.join(clip_dir, CONFIG_FILE)) as f:
            cfgs = json.load(f)
        config, state = open_clip_vision(
            load_clip(resolve(None, clip_dir)).model.visual, cfgs["model_cfg"]
        )
        tower = CLIPVisionModel(config)
        tower.load_state_dict(state, strict=True)
        processor = clip_image_processor(cfgs.get("preprocess_cfg", {}), config.image_size)
    else:
        from transformers import AutoConfig, AutoImageProcessor, CLIPVisionModel, SiglipVisionModel

        kind = AutoConfig.from_pretrained(pretrained).model_type
        cls = SiglipVisionModel if kind.startswith("siglip") else CLIPVisionModel
        tower = cls.from_pretrained(pretrained)
        processor = AutoImageProcessor.from_pretrained(pretrained)
    save_pretrained(out_dir, tower)
    settings = pixels_of(processor)
    with open(os.path.join(out_dir, PIXELS_FILE), "w") as f:
        json.dump(settings, f, indent=2)
    return settings
