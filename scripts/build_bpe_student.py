#!/usr/bin/env python
"""Build a student with the project's own BPE tokenizer (the cross-tokenizer evidence's student).

The command is :mod:`torchtune_kd.cli.build_bpe_student`:
``python scripts/build_bpe_student.py --help`` describes it and its options.
"""

import sys

from torchtune_kd.cli.build_bpe_student import main

if __name__ == "__main__":
    sys.exit(main())
