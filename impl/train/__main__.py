"""`python -m impl.train ...`: the training command (impl.train.cli)."""

import sys

from impl.train.cli import main

sys.exit(main())
