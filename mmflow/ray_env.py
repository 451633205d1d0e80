"""The Ray a run uses: the cluster named by ``RAY_ADDRESS`` or a fresh local one; and, while
a console is installed (``mmflow.console``), Ray's own output kept off it."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import tempfile

from mmflow import progress

DRIVER_LOG = "mmflow-driver.log"
log = logging.getLogger(__name__)


def ensure_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as ``ray job submit`` sets it) or start a local one.

    With a console installed and not verbose, Ray keeps its output to itself: workers' lines
    stay in Ray's log files (the console takes out only mmflow's own, see
    :func:`mmflow.progress.decode`), and the driver's loggers and warnings go to
    ``mmflow-driver.log`` in Ray's log folder, which the console names once."""
    import ray

    if ray.is_initialized():
        return
    _unfilter_worker_output()  # an earlier ray.init of this process may have left its filter
    console = progress.installed()
    quiet = console is not None and not console.verbose
    buffer = _hold_driver_logs(verbose=not quiet) if console is not None else None
    if quiet:
        _to_root("ray")
        _quiet_ray_data()  # before the workers start: they inherit its settings
        _quiet_hugging_face()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True, configure_logging=not quiet)
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
    if console is not None:
        _console_after_init(console, buffer, quiet)


def _console_after_init(console, buffer, quiet: bool) -> None:
    """The driver's log file in Ray's log folder, worker output through the console, and one
    line saying which Ray this is and where its logs are."""
    import ray

    logs = _logs_dir()
    path = _write_driver_logs(buffer, os.path.join(logs, DRIVER_LOG))
    console.log_file = path
    _filter_worker_output(console, verbose=not quiet)
    if quiet:
        _to_root("ray")  # ray.init may have given it a handler again
    which = "a local instance"
    if os.environ.get("RAY_ADDRESS"):
        which = f"joined the cluster at {ray.get_runtime_context().gcs_address}"
    shown = "shown here" if not quiet else "--verbose shows them here"
    progress.say(f"[mmflow] Ray: {which}; its logs: {logs} (this driver's: {path}; {shown})")


def _hold_driver_logs(verbose: bool) -> logging.handlers.MemoryHandler:
    """Every logger that reaches the root (Ray's with configure_logging=False, Ray Train's and
    Ray Data's in the driver) and Python's warnings, held until Ray's log folder is known."""
    root = logging.getLogger()
    buffer = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    root.addHandler(buffer)
    root.setLevel(min(root.level or logging.WARNING, logging.INFO))
    logging.captureWarnings(True)
    if verbose:
        root.addHandler(logging.StreamHandler())
    return buffer


def _write_driver_logs(buffer: logging.handlers.MemoryHandler | None, path: str) -> str:
    try:
        handler: logging.Handler = logging.FileHandler(path)
    except OSError:  # a read-only Ray folder (a cluster's): beside the other temporary files
        path = os.path.join(tempfile.gettempdir(), f"mmflow-driver-{os.getpid()}.log")
        handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if buffer is not None:
        buffer.setTarget(handler)
        buffer.flush()
        root.removeHandler(buffer)
        buffer.close()
    return path


def _logs_dir() -> str:
    try:
        from ray._private.worker import _global_node

        return _global_node.get_logs_dir_path()
    except Exception:  # Ray moved it
        return tempfile.gettempdir()


def _filter_worker_output(console, verbose: bool) -> None:
    """Ray's printer of worker output replaced by one that hands mmflow's marked lines to the
    console and, with ``verbose``, prints the others as Ray does. Should Ray's internals move,
    Ray's printer stays: everything shows, nothing is lost."""
    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        log.warning("Ray's worker output dispatcher moved; worker output is not filtered")
        return

    def handle(data: dict) -> None:
        rest = []
        for line in data.get("lines", []):
            message = progress.decode(line)
            if message is None:
                rest.append(line)
            elif message["kind"] == "sync":
                progress.synced(str(message.get("token")))
            else:
                console.worker_message(message)
        if verbose and rest:
            ray_worker.print_to_stdstream({**data, "lines": rest}, ignore_prefix=False)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("mmflow_console", handle)
    progress.listening = True


def _unfilter_worker_output() -> None:
    """No mmflow handler of worker output (``ray.shutdown`` removes Ray's printer, not ours):
    a later ``ray.init`` without a console must not wait for sync lines no one reads, nor one
    with a console show each line twice."""
    progress.listening = False
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    dispatcher.remove_handler("mmflow_console")


def _to_root(*names: str) -> None:
    """These loggers without the handlers that print to the terminal (Ray gives "ray" and
    "ray.data" their own) and passing their records on to the root's (the driver's log)."""
    for name in names:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler).__name__ == "PlainRayHandler" or (
                type(handler) is logging.StreamHandler
            ):
                logger.removeHandler(handler)
        logger.propagate = True


# Ray Data's logging config (RAY_DATA_LOGGING_CONFIG) less its console handler: its notes
# ("Starting execution of Dataset ...", operator status) go to ray-data.log only.
RAY_DATA_LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "ray": {"format": "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"}
    },
    "handlers": {
        "file": {
            "class": "ray.data._internal.logging.SessionFileHandler",
            "formatter": "ray",
            "filename": "ray-data.log",
        }
    },
    "loggers": {"ray.data": {"level": "DEBUG", "handlers": ["file"], "propagate": False}},
}


def _quiet_hugging_face() -> None:
    """No Hugging Face progress bars (transformers' "Writing model shards" as a stage saves a
    model in the driver): the environment switch both libraries read when imported, and
    transformers' own switch when it already is."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _quiet_ray_data() -> None:
    """Ray Data in this driver: no progress bars (the console shows the stages' own) and no
    log lines on the terminal. Set before ``ray.data`` is imported (importing it here would
    cost seconds a stage without Ray Data does not need); adjusted in place if it is."""
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if "ray.data" in sys.modules:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        _to_root("ray.data")
        return
    path = os.path.join(tempfile.gettempdir(), "mmflow-ray-data-logging.json")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(RAY_DATA_LOGGING, f)
        os.replace(tmp, path)
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", path)


def gcs_actor_liveness() -> None:
    """In each worker of the local, dashboard-less Ray. Ray Train's placement-group cleaner asks
    the state API (served by the dashboard) once a second whether the training controller is
    alive; without a dashboard every ask fails, with a warning or a traceback, and the cleaner
    never cleans. Here it asks the GCS directly, which every Ray has. Should Ray's internals
    move, the cleaner is left as it was, with its logger muted."""
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
