"""Writing Hugging Face folders the way every mmflow stage does: safetensors weights, and no
progress bars. transformers draws a "Writing model shards" bar on every ``save_pretrained``;
in a Ray job log (or on the quickstart's terminal) that is noise. It is switched off here,
where the saving happens, and not in the driver's environment only, because the workers of a
remote cluster do not inherit that environment."""

from __future__ import annotations

import os
from typing import Any


def save_pretrained(out_dir: str, *parts: Any) -> None:
    """``part.save_pretrained(out_dir)`` for each of ``parts`` (models, tokenizers,
    processors): models as safetensors, with transformers' progress bars off."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers import PreTrainedModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    for part in parts:
        if isinstance(part, PreTrainedModel):
            part.save_pretrained(out_dir, safe_serialization=True)
        else:
            part.save_pretrained(out_dir)
