#!/usr/bin/env python
"""Pad a Hugging Face checkpoint's vocabulary rows (a same-tokenizer teacher with a larger padded vocabulary).

The command is :mod:`torchtune_kd.cli.pad_vocab`:
``python scripts/pad_vocab.py --help`` describes it and its options.
"""

import sys

from torchtune_kd.cli.pad_vocab import main

if __name__ == "__main__":
    sys.exit(main())
