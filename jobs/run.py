"""Run every stage (only what is not finished): `ray job submit --working-dir . -- python jobs/run.py --config X`.

Under `ray job submit`, RAY_ADDRESS points at the cluster and the stage runs there; run directly,
it starts an embedded local Ray.
"""

import os
import sys

# Replace (not prepend) the script's own folder: jobs/tokenize.py would otherwise hide the standard
# library's tokenize module from everything this process imports.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
