"""``python -m training ...`` is ``python -m training.train ...``."""

import sys

from training.train import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
