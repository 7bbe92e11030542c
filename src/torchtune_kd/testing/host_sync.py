"""Counting host reads of tensor values: each is a device synchronisation, which a training step must not make."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

# The Tensor methods that copy a value to the host (a sync on an accelerator).
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


@contextlib.contextmanager
def host_reads() -> Iterator[list[str]]:
    """Within the block, every host read of a tensor's value is recorded (by method name) in the yielded list."""
    reads: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name: str):
        def read(self, *args, **kwargs):
            reads.append(name)
            return originals[name](self, *args, **kwargs)

        return read

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, counting(name))
        yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
