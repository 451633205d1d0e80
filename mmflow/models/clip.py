"""The CLIP model source shared by every stage that needs CLIP.

A CLIP model comes from one of three places, and always travels with its own
image preprocessing and tokenizer:

(a) an open_clip architecture and a pretrained tag, for users with a network
    (``arch: ViT-B-32, pretrained: laion2b_s34b_b79k``), or an architecture
    alone (random weights: tests and benchmarks);
(b) a local checkpoint: a file (``arch`` names its architecture) or a folder
    saved by :func:`save_clip` or by open_clip's ``push_to_hf_hub`` layout
    (``open_clip_config.json`` beside the weights);
(c) the ``model`` output of a ``clip_train`` stage (a folder as in (b)).

Architectures are open_clip JSON configs: open_clip's own, plus the small ones
in ``mmflow/models/configs/`` (``mmflow-clip-tiny``: 32 px images, trains on
two CPUs in minutes). Nothing here imports torch or open_clip at module level,
so pipeline configs that mention :class:`ClipSpec` validate quickly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import model_validator

from mmflow.io.cache import materialize
from mmflow.params import Params
from mmflow.storage import Storage, is_remote, normalize

CONFIG_DIR = Path(__file__).parent / "configs" / "clip"  # one folder per model family
WEIGHTS_FILE = "open_clip_pytorch_model.bin"  # a name open_clip's local-dir loader looks for
CONFIG_FILE = "open_clip_config.json"  # {"model_cfg": ..., "preprocess_cfg": ...}
META_FILE = "mmflow_clip.json"  # {"arch": ..., "tag": ...}: how to name this model in score tables


class ClipSpec(Params):
    """A CLIP model named in a pipeline: ``arch`` and/or ``pretrained`` (see the module doc)."""

    arch: str | None = None  # open_clip architecture, e.g. ViT-B-32 or mmflow-clip-tiny
    pretrained: str | None = None  # tag, checkpoint file, or folder with open_clip_config.json

    @model_validator(mode="after")
    def _check(self) -> ClipSpec:
        if self.pretrained and not self.arch and not _looks_like_dir(self.pretrained):
            raise ValueError(
                f"pretrained={self.pretrained!r} is a tag or a file: name its `arch` too"
            )
        return self

    @property
    def is_set(self) -> bool:
        return bool(self.arch or self.pretrained)


@dataclass(frozen=True)
class ClipSource:
    """A spec resolved to open_clip arguments: ``name`` is an architecture or ``local-dir:PATH``."""

    name: str
    pretrained: str | None
    arch: str  # architecture name, for the record
    tag: str  # pretrained tag, checkpoint path, or run id, for the record


@dataclass
class Clip:
    """A loaded model with what it needs: ``preprocess`` (PIL -> tensor) and ``tokenizer``."""

    model: Any  # open_clip.CLIP, eval mode
    preprocess: Any
    tokenizer: Any
    arch: str
    tag: str


# --- the registry -------------------------------------------------------------------------------


_REGISTERED = False  # open_clip rescans its whole registry on add_model_config: once per process


def register_configs() -> None:
    """Make mmflow's CLIP architecture configs known to open_clip (idempotent, once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import open_clip

    known = set(open_clip.list_models())
    if any(p.stem not in known for p in CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(CONFIG_DIR)
    _REGISTERED = True


def register_config(name: str, model_cfg: dict[str, Any]) -> None:
    """Register a custom architecture under ``name`` in this process (written to a temp JSON file)."""
    import open_clip

    register_configs()
    if open_clip.get_model_config(name) == model_cfg:
        return
    folder = (
        Path(tempfile.gettempdir())
        / "mmflow-clip-configs"
        / _digest(json.dumps(model_cfg, sort_keys=True))
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(model_cfg, indent=2))
    open_clip.add_model_config(path)


def model_config(arch: str) -> dict[str, Any]:
    import open_clip

    register_configs()
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture {arch!r} (see open_clip.list_models())")
    return cfg


# --- resolving and loading ------------------------------------------------------------------------


def resolve(
    spec: ClipSpec | None,
    model_uri: str | None = None,
    run_id: str | None = None,
    storage: Storage | None = None,
) -> ClipSource:
    """Where to load from: a stage's ``model`` output (``model_uri``) or the spec, never both."""
    if model_uri and spec is not None and spec.is_set:
        raise ValueError("a CLIP model is wired as an input and also named in params; keep one")
    if model_uri:
        local = materialize(model_uri, storage)
        meta = _read_json(os.path.join(local, META_FILE))
        return ClipSource(
            f"local-dir:{local}",
            None,
            meta.get("arch", "custom"),
            f"run:{run_id}" if run_id else normalize(model_uri),
        )
    if spec is None or not spec.is_set:
        raise ValueError(
            "no CLIP model: wire a clip_train output as input `model`, "
            "or set params.model.arch (and pretrained)"
        )
    if spec.pretrained and _looks_like_dir(spec.pretrained):
        local = materialize(spec.pretrained, storage)
        meta = _read_json(os.path.join(local, META_FILE))
        return ClipSource(
            f"local-dir:{local}",
            None,
            meta.get("arch", spec.arch or "custom"),
            normalize(spec.pretrained),
        )
    assert spec.arch is not None
    pretrained = spec.pretrained
    if pretrained and (is_remote(pretrained) or os.path.isfile(os.path.expanduser(pretrained))):
        pretrained = materialize(pretrained, storage)  # a checkpoint file
    return ClipSource(spec.arch, pretrained, spec.arch, pretrained or "random-init")


def load_clip(source: ClipSource, device: str = "cpu", train_transform: bool = False) -> Clip:
    """The model (eval mode, on ``device``) with its eval preprocessing (or train, if asked) and tokenizer."""
    import open_clip

    register_configs()
    with quiet():
        model, pre_train, pre_val = open_clip.create_model_and_transforms(
            source.name, pretrained=source.pretrained, device=device, output_dict=True
        )
        tokenizer = open_clip.get_tokenizer(source.name)
    model.eval()
    return Clip(
        model, pre_train if train_transform else pre_val, tokenizer, source.arch, source.tag
    )


def load_transforms(source: ClipSource, train: bool = False) -> tuple[Any, Any]:
    """(image preprocessing, tokenizer) without building the model: for CPU preprocessing workers.

    Follows ``open_clip.create_model``: defaults, then the folder's or the tag's
    ``preprocess_cfg``, with the size taken from the architecture."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    register_configs()
    cfg = open_clip.get_model_config(source.name)
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture {source.name!r}")
    pp = asdict(PreprocessCfg())
    if source.name.startswith("local-dir:"):
        folder = source.name[len("local-dir:") :]
        pp = merge_preprocess_dict(
            pp, _read_json(os.path.join(folder, CONFIG_FILE)).get("preprocess_cfg", {})
        )
    elif source.pretrained:
        pp = merge_preprocess_dict(pp, get_pretrained_cfg(source.name, source.pretrained))
    pp["size"] = cfg["vision_cfg"].get("image_size", pp["size"])
    with quiet():
        tokenizer = open_clip.get_tokenizer(source.name)
    return image_transform_v2(PreprocessCfg(**pp), is_train=train), tokenizer


# --- saving ---------------------------------------------------------------------------------------


def save_clip(model: Any, arch: str, model_cfg: dict[str, Any], out_dir: str, **meta: Any) -> None:
    """Write a folder every open_clip entry point can load:

    - ``create_model_and_transforms("local-dir:" + out_dir)``;
    - ``add_model_config(out_dir/ARCH.json)`` then
      ``create_model_and_transforms(ARCH, pretrained=out_dir/open_clip_pytorch_model.bin)``;
    - ``open_clip_train.main --model ARCH --pretrained ...`` the same way.
    """
    import torch
    from open_clip.model import get_model_preprocess_cfg

    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(out_dir, WEIGHTS_FILE))
    preprocess = {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in get_model_preprocess_cfg(model).items()
    }
    _write_json(
        os.path.join(out_dir, CONFIG_FILE), {"model_cfg": model_cfg, "preprocess_cfg": preprocess}
    )
    _write_json(os.path.join(out_dir, f"{arch}.json"), model_cfg)
    _write_json(os.path.join(out_dir, META_FILE), {"arch": arch, **meta})


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence open_clip's INFO chatter (it logs every step of model creation on the root logger)."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(previous)


# --- small helpers --------------------------------------------------------------------------------


def _looks_like_dir(path: str) -> bool:
    if is_remote(path):
        return not os.path.splitext(path.rstrip("/"))[1]  # s3://bucket/model/ (no file extension)
    return os.path.isdir(os.path.expanduser(path))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
