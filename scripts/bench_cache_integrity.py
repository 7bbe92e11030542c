#!/usr/bin/env python
"""What the teacher cache's integrity checks cost: SHA-256 of a shard, its size + header check, the per-row checks.

The command is :mod:`torchtune_kd.cli.bench_cache_integrity`:
``python scripts/bench_cache_integrity.py --help`` describes it and its options.
"""

import sys

from torchtune_kd.cli.bench_cache_integrity import main

if __name__ == "__main__":
    sys.exit(main())
