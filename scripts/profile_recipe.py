#!/usr/bin/env python
"""Where the single-device recipe spends a run's training time, by function (cProfile, cumulative).

The command is :mod:`torchtune_kd.cli.profile_recipe`:
``python scripts/profile_recipe.py --help`` describes it and its options.
"""

import sys

from torchtune_kd.cli.profile_recipe import main

if __name__ == "__main__":
    sys.exit(main())
