"""The rows a teacher cache stores per counted token: the teacher's top-k log-probabilities, the exact log of the
remaining mass (the tail) and its entropy (T = 1), computed from logits; and the check every stored row must pass.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from torchtune_kd.core.teacher_cache.section import DTYPES

# Rows per output-projection chunk in the pre-pass (one fp32 chunk of logits at a time).
CHUNK_ROWS = 1024


def topk_rows(logits: torch.Tensor, k: int, temperature: float) -> dict[str, torch.Tensor]:
    """Top-k log-probabilities, exact tail log-mass and entropy (T = 1) of rows of teacher logits.

    Args:
        logits (torch.Tensor): ``(rows, vocab)`` teacher logits (any float dtype; computed in fp32).
        k (int): ids to keep per row.
        temperature (float): the distillation temperature (log-probabilities of ``logits / T``).

    Returns:
        dict: ``ids`` ``(rows, k)`` int32 (most probable first), ``logprobs`` ``(rows, k)`` fp32, ``log_tail``
        ``(rows,)`` fp32 (``-inf`` when nothing is left) and ``entropy`` ``(rows,)`` fp32 (nats, T = 1).
    """
    z = logits.float()
    logp_1 = torch.log_softmax(z, dim=-1)
    entropy = torch.special.entr(logp_1.exp()).sum(-1)
    logp = logp_1 if temperature == 1.0 else torch.log_softmax(z / temperature, dim=-1)
    values, ids = logp.topk(k, dim=-1)
    log_tail = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1)
    return {"ids": ids.to(torch.int32), "logprobs": values, "log_tail": log_tail, "entropy": entropy}


# Slack on "log-probability <= 0": log_softmax never exceeds 0 and rounding to a storage dtype keeps the sign.
LOGPROB_SLACK = 1e-6
# Slack on the entropy's range [0, log V] (an fp32 sum over the vocabulary).
ENTROPY_SLACK = 1e-3


def sum_tolerance(dtype: str, k: int) -> float:
    """How far a stored row's total probability (top k plus tail) may stray from 1.

    Each log-probability is rounded to ``dtype`` (absolute error <= |log p| * eps / 2, so p moves by at most
    p * |log p| * eps / 2), and the sum of p * |log p| over the top k is at most the entropy of k + 1 outcomes,
    log(k + 1); twice that bound plus fp32 slack: 4.3e-3 for fp16 at k = 64, 3.3e-2 for bf16, 1e-4 for fp32.
    """
    return torch.finfo(DTYPES[dtype]).eps * math.log(k + 1) + 1e-4


def row_defect(
    ids: torch.Tensor, logprobs: torch.Tensor, log_tail: torch.Tensor, entropy: torch.Tensor, *,
    vocab_size: Optional[int], dtype: str,
) -> Optional[tuple[int, str]]:
    """The first stored row that cannot be a teacher distribution, and why (``None``: all can).

    A few vectorised passes over ``(rows, k)``: every log-probability and the tail's are <= 0 and not NaN (-inf is a
    zero probability, allowed), the top-k probabilities plus the tail sum to 1 within :func:`sum_tolerance`, ids lie
    in ``[0, vocab_size)`` and the entropy in ``[0, log vocab_size]``. A flipped sign, a NaN, an exponent bit or
    random bytes in a row break at least one of them.
    """
    if ids.shape[0] == 0:
        return None
    lp, tail, ent = logprobs.float(), log_tail.float(), entropy.float()
    k = ids.shape[-1]
    tolerance = sum_tolerance(dtype, k)
    upper = math.log(vocab_size) + ENTROPY_SLACK if vocab_size else math.inf
    # Row reductions, not element masks: max and sum propagate a NaN, and "not <=" is true for one.
    total = lp.exp().sum(-1) + tail.exp()
    bad = ~(lp.amax(-1) <= LOGPROB_SLACK) | ~(tail <= LOGPROB_SLACK) | (ids.amin(-1) < 0)
    if vocab_size:
        bad |= ids.amax(-1) >= vocab_size
    bad |= ~((total - 1).abs() <= tolerance) | ~((ent >= -ENTROPY_SLACK) & (ent <= upper))
    if not bool(bad.any()):
        return None
    row = int(bad.nonzero()[0, 0])
    row_lp, row_ids = lp[row], ids[row]
    if row_lp.isnan().any() or tail[row].isnan():
        return row, "it holds a NaN log-probability"
    if (row_lp > LOGPROB_SLACK).any():
        j = int((row_lp > LOGPROB_SLACK).nonzero()[0, 0])
        return row, f"the log-probability of token {int(row_ids[j])} is {float(row_lp[j]):+.4g} > 0 (a probability above 1)"
    if tail[row] > LOGPROB_SLACK:
        return row, f"its tail log-mass is {float(tail[row]):+.4g} > 0 (a probability above 1)"
    out = (row_ids < 0) | (row_ids >= vocab_size) if vocab_size else row_ids < 0
    if out.any():
        return row, f"token id {int(row_ids[out][0])} is outside the vocabulary [0, {vocab_size or 'V'})"
    if not abs(float(total[row]) - 1) <= tolerance:
        return row, (
            f"its probabilities (top {k} plus the tail) sum to {float(total[row]):.6g}, not 1 (tolerance {tolerance:.2g} "
            f"for {dtype})"
        )
    return row, f"its entropy {float(ent[row]):.4g} is outside [0, log V = {upper - ENTROPY_SLACK:.4g}]"
