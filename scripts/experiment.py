#!/usr/bin/env python
"""Divergence x IR x seed grid through the real recipe; mean ± standard error and paired Δ vs a CE-only baseline.

The command is :mod:`torchtune_kd.cli.experiment`:
``python scripts/experiment.py --help`` describes it and its options.
"""

import sys

from torchtune_kd.cli.experiment import main

if __name__ == "__main__":
    sys.exit(main())
