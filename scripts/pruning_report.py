#!/usr/bin/env python
"""Which layers to drop: students pruned from a teacher by block influence and evenly, before any training.

The command is :mod:`torchtune_kd.cli.pruning_report`:
``python scripts/pruning_report.py --help`` describes it and its options.
"""

import sys

from torchtune_kd.cli.pruning_report import main

if __name__ == "__main__":
    sys.exit(main())
