"""Built-in stage types. Importing this package registers them."""

from mmflow.stages import (  # noqa: F401
    clip_filter,
    clip_train,
    import_shards,
    ingest_urls,
    pretokenize,
    synth_shapes,
    vqgan_train,
)
