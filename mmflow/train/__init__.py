"""Training: the shared harness every training stage runs its model through.

``config`` (what a stage supplies), ``harness`` (``fit`` and the worker loop on Ray Train),
``engines`` (DDP and DeepSpeed), ``checkpoints`` (storage checkpoints and resume). Importing
this package does not import torch; the workers do.
"""

from mmflow.train.checkpoints import complete_checkpoints
from mmflow.train.config import TrainConfig, TrainTask
from mmflow.train.harness import fit

__all__ = ["TrainConfig", "TrainTask", "complete_checkpoints", "fit"]
