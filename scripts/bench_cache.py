#!/usr/bin/env python
"""Teacher-cache benchmark: pre-pass cost, cache size, cached vs live epoch time and memory, and k = 64 quality.

The command is :mod:`torchtune_kd.cli.bench_cache`:
``python scripts/bench_cache.py --help`` describes it and its options.
"""

import sys

from torchtune_kd.cli.bench_cache import main

if __name__ == "__main__":
    sys.exit(main())
