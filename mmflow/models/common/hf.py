"""Writing Hugging Face folders the way every mmflow stage does: no progress bars.
transformers draws a "Writing model shards" bar on every ``save_pretrained``; in a Ray job log
(or on the quickstart's terminal) that is noise. It is switched off here, where the saving
happens, and not in the driver's environment only, because the workers of a remote cluster do
not inherit that environment. (transformers 5 writes weights as safetensors by default.)"""

from __future__ import annotations

from typing import Any


def save_pretrained(out_dir: str, *parts: Any) -> None:
    """``part.save_pretrained(out_dir)`` for each of ``parts`` (models, tokenizers,
    processors), with transformers' progress bars off."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    for part in parts:
        part.save_pretrained(out_dir)
