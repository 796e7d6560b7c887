"""Run the evaluate stage: `ray job submit --working-dir . -- python jobs/evaluate_stage.py --config X`.

Under `ray job submit`, RAY_ADDRESS points at the cluster and the stage runs there; run directly,
it starts an embedded local Ray. The package must be installed where it runs (`pip install -e .`, as
cluster.yaml's setup commands do).
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
