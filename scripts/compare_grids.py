#!/usr/bin/env python
"""Compare two finished experiment grids setting by setting, paired by seed (e.g. a live teacher against a cache).

The command is :mod:`torchtune_kd.cli.compare_grids`:
``python scripts/compare_grids.py --help`` describes it and its options.
"""

import sys

from torchtune_kd.cli.compare_grids import main

if __name__ == "__main__":
    sys.exit(main())
