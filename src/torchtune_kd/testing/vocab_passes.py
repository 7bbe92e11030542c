"""Counting a step's passes over ``[tokens, vocab]`` tensors (the README's list of passes per output path).

:class:`VocabPasses` is a ``TorchDispatchMode``: every ATen operation that reads or writes a tensor whose last
dimension is the vocabulary is counted, in units of one full ``[tokens, vocab]`` tensor (an operation on a chunk of
``rows`` tokens counts ``rows / tokens``), forward and backward alike. A matmul that produces logits counts once; an
elementwise op reading two such tensors and writing a third counts once (it is one pass of the kernel, whatever its
operands). The minimum a distillation step needs is three: the student's logits, the teacher's logits and the
gradient through the student's output layer.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# Views and metadata: no data is read or written.
_FREE = {"view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "split", "split_with_sizes",
         "slice", "select", "unsqueeze", "squeeze", "as_strided", "detach", "alias", "unbind", "chunk", "narrow",
         "empty_like", "empty", "new_empty", "empty_strided", "lift_fresh"}
# Indexed reads and writes: a few elements per row (the label's logit, an ignored row), not a pass.
_SPARSE = {"gather", "scatter", "scatter_", "scatter_add", "scatter_add_", "index_fill", "index_fill_", "index_put",
           "index_put_", "index_select"}


class VocabPasses(TorchDispatchMode):
    """Within the block, count the operations over ``[..., vocab]`` tensors, in units of ``tokens × vocab``.

    Args:
        vocab (int): the vocabulary size (the last dimension that marks a logits-sized tensor).
        tokens (int): the step's tokens (rows of the full logits).
        weights (Sequence[torch.Tensor]): the output projections (``(vocab, dim)``, whose transposes end in
            ``vocab``): tensors sharing their storage are not logits and are left out of the count.

    Attributes:
        passes (Counter[str, float]): per ATen operation name, the passes it made.
    """

    def __init__(self, vocab: int, tokens: int, weights: Sequence[torch.Tensor] = ()) -> None:
        super().__init__()
        self.vocab, self.tokens = vocab, tokens
        self._weights = {w.untyped_storage().data_ptr() for w in weights}
        self.passes: Counter[str, float] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in _FREE or name in _SPARSE:
            return out
        sizes = [t.numel() for t in tree_flatten((args, kwargs, out))[0]
                 if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab and t.numel() > self.vocab
                 and t.untyped_storage().data_ptr() not in self._weights]
        if sizes:
            self.passes[name] += max(sizes) / (self.tokens * self.vocab)
        return out

    @property
    def total(self) -> float:
        """All passes of the block."""
        return sum(self.passes.values())
