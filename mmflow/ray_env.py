"""The Ray a run uses: the cluster named by ``RAY_ADDRESS`` or a fresh local one."""

from __future__ import annotations

import os


def ensure_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as ``ray job submit`` sets it) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        # address="local": always a fresh local instance, never a stale `ray start` cluster
        # recorded in /tmp/ray (set RAY_ADDRESS=auto to join a local `ray start` on purpose).
        # No dashboard (memory, start-up time), hence no state API: see gcs_actor_liveness.
        ray.init(
            address="local",
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
            runtime_env={"worker_process_setup_hook": "mmflow.ray_env.gcs_actor_liveness"},
        )


def gcs_actor_liveness() -> None:
    """In each worker of the local, dashboard-less Ray. Ray Train's placement-group cleaner asks
    the state API (served by the dashboard) once a second whether the training controller is
    alive; without a dashboard every ask fails, with a warning or a traceback, and the cleaner
    never cleans. Here it asks the GCS directly, which every Ray has. Should Ray's internals
    move, the cleaner is left as it was, with its logger muted."""
    import logging

    try:
        import ray._private.state as gcs_state
        from ray.train.v2._internal.execution.controller import placement_group_cleaner

        def is_actor_alive(actor_id: str, timeout: float | None = None) -> bool:
            info = gcs_state.actors(actor_id=actor_id)
            return bool(info) and info.get("State") != "DEAD"

        placement_group_cleaner.is_actor_alive = is_actor_alive
    except Exception:
        name = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
        logging.getLogger(name).setLevel(logging.ERROR)
