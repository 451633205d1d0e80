"""CLIP score: how well a picture shows what a text says, as a CLIP model reads it.

The score of a pair is the cosine of CLIP's L2-normalised image and text embeddings, the same
figure ``clip_filter`` keeps or drops pairs by (``clip_score``), so a drawn picture's score
compares directly with the real pictures' (DALL-E's re-ranking and the text-to-image papers'
"CLIP score" use it, often times 100). Where the data has no ground truth for the attribute
judge (web captions), it is the one reading of whether generated pictures follow their
prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmflow.models.clip import Clip


def _pil(picture: Any):
    """A uint8 (3, H, W) tensor or a PIL image -> an RGB PIL image."""
    from PIL import Image

    if isinstance(picture, torch.Tensor):
        if picture.dtype != torch.uint8 or picture.dim() != 3 or picture.shape[0] != 3:
            raise ValueError(f"a picture is a uint8 (3, H, W) tensor, got {picture.dtype} "
                             f"{tuple(picture.shape)}")  # fmt: skip
        return Image.fromarray(picture.permute(1, 2, 0).cpu().numpy())
    return picture.convert("RGB")


@torch.inference_mode()
def clip_scores(
    clip: Clip, pictures: Sequence[Any] | torch.Tensor, texts: Sequence[str], batch_size: int = 256
) -> torch.Tensor:
    """(N,) float32 cosines of picture i against text i, through the model's own preprocessing
    and tokenizer; ``pictures`` uint8 (N, 3, H, W) or PIL images."""
    if len(pictures) != len(texts):
        raise ValueError(f"{len(pictures)} pictures for {len(texts)} texts")
    device = next(clip.model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = pictures[start : start + batch_size]
        images = torch.stack([clip.preprocess(_pil(p)) for p in chunk]).to(device)
        tokens = clip.tokenizer(list(texts[start : start + batch_size])).to(device)
        image_f = clip.model.encode_image(images, normalize=True).float()
        text_f = clip.model.encode_text(tokens, normalize=True).float()
        out.append((image_f * text_f).sum(-1).cpu())
    return torch.cat(out) if out else torch.empty(0)
