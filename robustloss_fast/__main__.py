"""``python -m robustloss_fast`` and the ``robustloss-fast`` console script (see robustloss_fast.cli)."""

import sys

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
