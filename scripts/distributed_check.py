#!/usr/bin/env python
"""Check the distributed recipe against the single-device one, and try a real config on dummy weights.

The command is :mod:`torchtune_kd.cli.distributed_check`:
``python scripts/distributed_check.py --help`` describes it and its options.
"""

import sys

from torchtune_kd.cli.distributed_check import main

if __name__ == "__main__":
    sys.exit(main())
