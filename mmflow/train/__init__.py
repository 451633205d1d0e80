"""Training: the shared harness every training stage runs its model through."""

from mmflow.train.harness import TrainConfig, TrainTask, complete_checkpoints, fit

__all__ = ["TrainConfig", "TrainTask", "complete_checkpoints", "fit"]
