#!/usr/bin/env python
"""Build the deterministic local stand-in assets (tokenizer, tiny teacher / student, alpaca data) into a folder.

The command is :mod:`torchtune_kd.cli.build_tiny_assets`:
``python scripts/build_tiny_assets.py --help`` describes it and its options.
"""

import sys

from torchtune_kd.cli.build_tiny_assets import main

if __name__ == "__main__":
    sys.exit(main())
