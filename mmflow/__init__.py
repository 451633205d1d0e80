"""mmflow: multimodal data-and-training pipelines on Ray."""

import os

# Under `uv run`, Ray would start every worker through `uv run` again (its uv hook), re-resolving
# the environment per worker; workers already share the driver's interpreter and .venv.
# Must be set before `ray` is imported.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

__version__ = "0.1.0"
