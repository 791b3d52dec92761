"""``python -m bma_gp``: the same as the ``bma-gp`` command (see :mod:`bma_gp.cli`)."""

import sys

from bma_gp.cli import main

if __name__ == "__main__":
    sys.exit(main())
