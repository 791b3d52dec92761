"""``python -m bma_gp.cli``: the same as the ``bma-gp`` command."""

import sys

from bma_gp.cli import main

if __name__ == "__main__":
    sys.exit(main())
