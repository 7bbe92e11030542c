#!/usr/bin/env python
"""Evaluate exported models with lm-eval and compare them (value ± lm-eval's stderr, Δ to a baseline).

The command is :mod:`torchtune_kd.cli.evaluate`:
``python scripts/evaluate.py --help`` describes it and its options.
"""

import sys

from torchtune_kd.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
