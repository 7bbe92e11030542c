"""Per-micro-batch pieces of a distillation step, shared by single-device and (future) distributed recipes.

Everything here returns *token sums* (fp32 scalars) plus counts; the recipe divides once by the token count of the
whole optimiser step, so gradient accumulation weights every token equally (torchtune 0.6.1's KD recipe instead
backpropagates each micro-batch's mean and then also divides by the step's token count).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F

Logits = Union[torch.Tensor, Sequence[torch.Tensor]]


def shift_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Align labels with logits for next-token prediction.

    Equivalent to comparing ``logits[:, :-1]`` with ``labels[:, 1:]``, but keeps the sequence length so chunked
    logits need no slicing (as torchtune's recipes do).

    Args:
        labels (torch.Tensor): ``(bsz, seq_len)`` target ids, ``ignore_index`` where no loss is taken.
        ignore_index (int): label value that does not count.

    Returns:
        torch.Tensor: ``(bsz, seq_len)`` labels shifted left by one, last column ``ignore_index``.
    """
    pad = labels.new_full((labels.shape[0], 1), ignore_index)
    return torch.cat((labels[:, 1:], pad), dim=1)


def _as_chunks(logits: Logits, labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pair each logit chunk ``(bsz, chunk_len, vocab)`` with its labels, flattened to 2-D / 1-D."""
    if isinstance(logits, torch.Tensor):
        return [(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))]
    label_chunks = labels.chunk(len(logits), dim=1)
    return [(lg.reshape(-1, lg.size(-1)), lb.reshape(-1)) for lg, lb in zip(logits, label_chunks)]


def ce_token_sum(logits: Logits, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Summed next-token cross-entropy over counted tokens, upcasting one chunk at a time.

    Args:
        logits (Logits): ``(bsz, seq_len, vocab)`` or a list of ``(bsz, seq_len / n, vocab)`` chunks.
        labels (torch.Tensor): shifted labels ``(bsz, seq_len)``.
        ignore_index (int): label value that does not count.

    Returns:
        torch.Tensor: fp32 scalar sum.
    """
    total = torch.zeros((), dtype=torch.float32, device=labels.device)
    for chunk, chunk_labels in _as_chunks(logits, labels):
        total = total + F.cross_entropy(chunk.float(), chunk_labels, ignore_index=ignore_index, reduction="sum")
    return total


@torch.no_grad()
def kd_health_sums(
    student_logits: Logits, teacher_logits: Logits, labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagnostics on counted tokens: top-1 agreement count and summed teacher entropy (nats, T = 1).

    The teacher entropy also links our KL to torchtune 0.6.1's ``ForwardKLLoss``, which reports the soft
    cross-entropy H(p_t, p_s) = KL(p_t || p_s) + H(p_t).

    Returns:
        tuple[torch.Tensor, torch.Tensor]: ``(agreements, entropy_sum)`` as fp32 scalars.
    """
    agree = torch.zeros((), dtype=torch.float32, device=labels.device)
    entropy = torch.zeros((), dtype=torch.float32, device=labels.device)
    student_chunks = _as_chunks(student_logits, labels)
    teacher_chunks = _as_chunks(teacher_logits, labels)
    for (s_chunk, chunk_labels), (t_chunk, _) in zip(student_chunks, teacher_chunks):
        # Masking instead of boolean indexing or an `if keep.any()` shortcut: both would force a device sync per
        # chunk inside the training step.
        keep = chunk_labels != ignore_index
        agree += ((s_chunk.argmax(-1) == t_chunk.argmax(-1)) & keep).sum()
        t_logp = torch.log_softmax(t_chunk.float(), dim=-1)
        # 0 * log 0 = 0 for masked (-inf) vocabulary entries.
        row_entropy = -(t_logp.exp() * t_logp.masked_fill(torch.isinf(t_logp), 0.0)).sum(-1)
        entropy += torch.where(keep, row_entropy, torch.zeros_like(row_entropy)).sum()
    return agree, entropy
