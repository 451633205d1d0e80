"""Built-in stage types. Importing this package registers them."""

from mmflow.stages import synth_shapes  # noqa: F401
