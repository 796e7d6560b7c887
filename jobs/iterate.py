"""On-policy rounds: `ray job submit --working-dir . -- python jobs/iterate.py --config X [--from-round N]`.

Under `ray job submit`, RAY_ADDRESS points at the cluster and the rounds run there; run directly, it starts an
embedded local Ray. A submitted job is refused a second time by its id (`dpo submission-id --stage iterate`).
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["iterate", *sys.argv[1:]]))
