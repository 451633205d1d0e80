"""Ray job entry point: run a pipeline on the cluster this job was submitted to.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/run_pipeline.py pipelines/quickstart.yaml [mmflow run options]

Ray sets RAY_ADDRESS for the job, so the runner joins the cluster instead of
starting a local one; every stage's tasks, actors and training workers are
scheduled across the cluster. Arguments are those of ``mmflow run``.
"""

import os
import sys

# The job's working directory (uploaded with --working-dir) holds the mmflow package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmflow.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
