#!/usr/bin/env python
"""Prepare the real-model demo offline: SmolLM2-135M-Instruct teacher, a student cut from it, and real text.

The command is :mod:`torchtune_kd.cli.prepare_smollm2`:
``python scripts/prepare_smollm2.py --help`` describes it and its options.
"""

import sys

from torchtune_kd.cli.prepare_smollm2 import main

if __name__ == "__main__":
    sys.exit(main())
