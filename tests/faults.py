"""Faults injected into real training runs, shared by the stage tests."""

from __future__ import annotations

import os
import sys

import ray.cloudpickle

# Ray's workers cannot import the tests package: send this module's code by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def killed_once(task, marker: str, at_step: int):
    """A copy of a training task whose rank 1 process dies at ``at_step`` the first time (a lost
    worker); ``marker`` is the file that records the death so the restarted group trains on."""

    class KilledOnce(type(task)):
        def loss(self, model, batch):
            import torch.distributed as dist

            if batch["step"] == at_step and dist.get_rank() == 1 and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)
            return super().loss(model, batch)

    killing = KilledOnce.__new__(KilledOnce)
    killing.__dict__.update(task.__dict__)
    return killing


def two_worker_context(tmp_path, stage: str):
    """The StageContext of a stage that ``fit`` runs directly on two one-CPU workers (no
    runner, no tracking), its model written to ``tmp_path/model``."""
    from mmflow.stage import Resources, StageContext
    from mmflow.storage import Storage

    return StageContext(
        pipeline="p", stage=stage, params=None, resources=Resources(cpus=1, workers=2),
        inputs={}, outputs={"model": str(tmp_path / "model")}, work_uri=str(tmp_path / "work"),
        storage=Storage(), tracking_uri="", run_id=None,
    )  # fmt: skip
