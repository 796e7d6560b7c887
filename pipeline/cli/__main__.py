"""`python -m pipeline.cli ...`: the `dpo` command."""

import sys

from pipeline.cli.main import main

sys.exit(main())
