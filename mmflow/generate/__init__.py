"""Generation from trained models: autoregressive sampling with a KV cache (``sampling``)."""

from mmflow.generate.sampling import (
    SamplingConfig,
    generate_caption_ids,
    generate_image_tokens,
    sample,
    sample_no_cache,
)

__all__ = [
    "SamplingConfig",
    "generate_caption_ids",
    "generate_image_tokens",
    "sample",
    "sample_no_cache",
]
