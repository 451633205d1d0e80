"""The Ray a run uses: the embedded local Ray and its worker setup hook."""

from __future__ import annotations


def test_placement_group_cleaner_asks_the_gcs_when_there_is_no_dashboard(ray_session):
    """The hook the local Ray runs in each worker: Ray Train's cleaner learns whether an actor
    lives from the GCS, where its own state-API query fails without a dashboard."""
    import time

    from ray.train.v2._internal.execution.controller import placement_group_cleaner

    from mmflow.ray_env import gcs_actor_liveness

    @ray_session.remote(num_cpus=0)
    class Probe:
        def actor_id(self) -> str:
            return ray_session.get_runtime_context().get_actor_id()

    probe = Probe.remote()
    actor_id = ray_session.get(probe.actor_id.remote())
    original = placement_group_cleaner.is_actor_alive
    try:
        gcs_actor_liveness()
        is_alive = placement_group_cleaner.is_actor_alive
        assert is_alive is not original and is_alive(actor_id, timeout=5)
        ray_session.kill(probe)
        deadline = time.time() + 30
        while is_alive(actor_id, timeout=5) and time.time() < deadline:
            time.sleep(0.2)
        assert not is_alive(actor_id, timeout=5)
        assert not is_alive("ff" * 16, timeout=5)  # an actor the GCS never saw
    finally:
        placement_group_cleaner.is_actor_alive = original
