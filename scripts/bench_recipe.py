#!/usr/bin/env python
"""Whole-recipe benchmark: this project's recipe against torchtune 0.6.1's installed ``knowledge_distillation_single_device``.

The command is :mod:`torchtune_kd.cli.bench_recipe`:
``python scripts/bench_recipe.py --help`` describes it and its options.
"""

import sys

from torchtune_kd.cli.bench_recipe import main

if __name__ == "__main__":
    sys.exit(main())
