#!/usr/bin/env python
"""The main job: prune a real model, recover the pruned student by distillation and by CE alone, compare on held-out text.

The command is :mod:`torchtune_kd.cli.demo`:
``python scripts/demo.py --help`` describes it and its options.
"""

import sys

from torchtune_kd.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
