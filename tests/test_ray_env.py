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


def test_a_quiet_run_turns_hugging_face_progress_bars_off():
    """transformers' "Writing model shards" bar reached the terminal when a stage saved a model
    in the driver: a quiet console turns the bars off, whether transformers is imported after
    (the environment switch) or before (its own switch)."""
    import subprocess
    import sys

    script = (
        "import os, sys\n"
        "os.environ.pop('HF_HUB_DISABLE_PROGRESS_BARS', None)\n"
        "from mmflow.ray_env import _quiet_hugging_face\n"
        "{before}"
        "_quiet_hugging_face()\n"
        "from transformers.utils import logging\n"
        "print(logging.is_progress_bar_enabled())\n"
    )
    for before in ("", "import transformers\n"):
        done = subprocess.run([sys.executable, "-c", script.format(before=before)],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[-1] == "False", (before, done.stdout)


def test_a_later_ray_init_starts_from_no_mmflow_filter(monkeypatch):
    """``ray.shutdown`` removes Ray's printer of worker output, not mmflow's: the next
    ``ensure_ray`` (``ray.init`` stubbed here) drops it, so lines are not shown twice and,
    without a console, the harness does not wait for sync lines no one reads."""
    import ray
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from mmflow import progress
    from mmflow.ray_env import _filter_worker_output, ensure_ray

    class Console:
        def __init__(self):
            self.messages = []

        def worker_message(self, message):
            self.messages.append(message)

    saved = list(dispatcher.handlers)
    try:
        first, second = Console(), Console()
        _filter_worker_output(first, verbose=False)
        assert progress.listening
        monkeypatch.setattr(ray, "is_initialized", lambda: False)
        monkeypatch.setattr(ray, "init", lambda **kwargs: None)
        monkeypatch.setattr(progress, "_sink", None)  # no console this time
        ensure_ray()
        assert not progress.listening
        assert "mmflow_console" not in [name for name, _ in dispatcher.handlers]
        _filter_worker_output(second, verbose=False)
        line = progress.MARK + '{"kind": "line", "text": "hello"}'
        dispatcher.emit({"lines": [line]})
        assert first.messages == [] and len(second.messages) == 1
    finally:
        dispatcher.handlers = saved
        progress.listening = False
