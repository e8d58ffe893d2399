"""``python -m lightning_nan.cli``: the same as the ``lightning-nan`` command."""

import sys

from lightning_nan.cli import main

if __name__ == "__main__":
    sys.exit(main())
