#!/usr/bin/env python
"""Benchmark every chunked divergence against torchtune 0.6.1's chunked forward KL and against full logits.

The command is :mod:`torchtune_kd.cli.bench_losses`:
``python scripts/bench_losses.py --help`` describes it and its options.
"""

import sys

from torchtune_kd.cli.bench_losses import main

if __name__ == "__main__":
    sys.exit(main())
