"""Built-in stage types. Importing this package registers them."""

from mmflow.stages import clip_filter, clip_train, synth_shapes  # noqa: F401
