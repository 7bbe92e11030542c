#!/usr/bin/env python
"""Plot the loss components of one or more distillation runs from torchtune's DiskLogger files.

The command is :mod:`torchtune_kd.cli.plot_run`:
``python scripts/plot_run.py --help`` describes it and its options.
"""

import sys

from torchtune_kd.cli.plot_run import main

if __name__ == "__main__":
    sys.exit(main())
