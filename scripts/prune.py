#!/usr/bin/env python
"""Prune a teacher by depth: score its layers on calibration text, keep the most influential, write the student.

The command is :mod:`torchtune_kd.cli.prune`:
``python scripts/prune.py --help`` describes it and its options.
"""

import sys

from torchtune_kd.cli.prune import main

if __name__ == "__main__":
    sys.exit(main())
