"""`python -m impl.train ...`: the training command (impl.train.cli)."""

import sys

from impl.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
