#!/usr/bin/env python
"""On-policy distillation benchmark: KV-cache generation against a no-cache loop, and an on-policy step's time split.

The command is :mod:`torchtune_kd.cli.bench_on_policy`:
``python scripts/bench_on_policy.py --help`` describes it and its options.
"""

import sys

from torchtune_kd.cli.bench_on_policy import main

if __name__ == "__main__":
    sys.exit(main())
