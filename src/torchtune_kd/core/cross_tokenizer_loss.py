"""KD between two vocabularies at aligned positions (``core.cross_tokenizer``): an exact divergence over the tokens
both vocabularies share, plus Universal Logit Distillation on the sorted probabilities.

Per aligned position (student row ``z_s``, teacher row ``z_t``, both divided by the temperature ``T``):

- **exact part**: the configured divergence ``D`` (any ``kd_losses`` divergence) between the two distributions
  restricted to the shared tokens and renormalised over them: ``D(softmax(z_t[shared_t]) ‖ softmax(z_s[shared_s]))``
  × T², the same ``D`` a same-tokenizer run uses. It compares token for token wherever the vocabularies agree, but
  sees nothing of the mass on tokens only one model has;
- **ULD part** (Boizard et al., 2024): ``Σ_r |p_s,(r) − p_t,(r)|`` over the ``k`` largest probabilities of each
  model, each sorted in decreasing order: the Wasserstein-1 distance between the two distributions with their
  outcomes ranked (no vocabulary mapping). It sees all the mass but not which token holds it.

``loss = exact_weight · exact + uld_weight · uld`` per aligned counted position, summed (Liger's shape: a token sum;
the recipe divides by the step's counted *student* tokens, so every student token weighs the same and the positions
inside a span add 0). With one tokenizer twice, ``uld_weight = 0`` and every id shared, the exact part is the plain
divergence (``tests/unit`` checks it).
"""

from __future__ import annotations

from typing import Dict, Sequence, Union

import torch
from torch import nn

import kd_losses

Logits = Union[torch.Tensor, Sequence[torch.Tensor]]


def uld_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor, top_k: int, temperature: float = 1.0
                 ) -> torch.Tensor:
    """ULD per row: the L1 distance between the ``top_k`` largest probabilities of each model, sorted.

    Args:
        student_logits (torch.Tensor): ``(rows, vocab_s)``.
        teacher_logits (torch.Tensor): ``(rows, vocab_t)`` (no gradient needed).
        top_k (int): probabilities kept per side (at most the smaller vocabulary; ``-inf`` logits give 0).
        temperature (float): both sides' logits are divided by it.

    Returns:
        torch.Tensor: ``(rows,)`` fp32, differentiable with respect to ``student_logits``.
    """
    k = min(top_k, student_logits.shape[-1], teacher_logits.shape[-1])
    p_s = torch.softmax(student_logits.float() / temperature, dim=-1).topk(k, dim=-1).values
    p_t = torch.softmax(teacher_logits.float() / temperature, dim=-1).topk(k, dim=-1).values
    return (p_s - p_t).abs().sum(-1)


class CrossTokenizerKD(nn.Module):
    """The exact + ULD loss of aligned positions (see the module docstring).

    Args:
        divergence (nn.Module): a ``kd_losses`` divergence (its temperature and ``ignore_index`` are used).
        student_ids (torch.Tensor), teacher_ids (torch.Tensor): ``(shared,)`` the shared tokens, pairwise
            (``cross_tokenizer.shared_vocabulary``).
        exact_weight (float), uld_weight (float): the parts' weights (>= 0, not both 0).
        uld_top_k (int): probabilities ULD compares per side.
    """

    def __init__(self, divergence: nn.Module, student_ids: torch.Tensor, teacher_ids: torch.Tensor, *,
                 exact_weight: float = 1.0, uld_weight: float = 0.0, uld_top_k: int = 64) -> None:
        super().__init__()
        if not kd_losses.is_divergence(divergence):
            raise ValueError(f"cross-tokenizer KD needs a kd_losses divergence, got {type(divergence).__name__}")
        self.divergence = divergence
        self.exact_weight, self.uld_weight, self.uld_top_k = float(exact_weight), float(uld_weight), int(uld_top_k)
        self.register_buffer("student_ids", student_ids.long(), persistent=False)
        self.register_buffer("teacher_ids", teacher_ids.long(), persistent=False)

    @property
    def ignore_index(self) -> int:
        return self.divergence.ignore_index

    def token_sums(self, student_logits: Logits, teacher_rows: torch.Tensor, aligned: torch.Tensor,
                   labels: torch.Tensor, *, diagnostics: bool = True) -> Dict[str, torch.Tensor]:
        """Token sums over the aligned counted positions.

        Args:
            student_logits (Logits): ``(bsz, seq_len, vocab_s)`` or torchtune's list of chunks along ``seq_len``.
            teacher_rows (torch.Tensor): ``(bsz, seq_len, vocab_t)``: at each aligned student position, the teacher
                logits of its aligned teacher position (anything elsewhere).
            aligned (torch.Tensor): ``(bsz, seq_len)`` bool.
            labels (torch.Tensor): ``(bsz, seq_len)`` shifted student labels.
            diagnostics (bool): also ``agree`` (the two top-1 tokens are the same shared token) and
                ``teacher_entropy`` (of the teacher's full distribution, T = 1).

        Returns:
            Dict[str, torch.Tensor]: ``kd`` (differentiable fp32 sum), ``aligned`` (the count of aligned counted
            positions) and, with ``diagnostics``, the detached ``agree`` and ``teacher_entropy``.
        """
        student = student_logits if isinstance(student_logits, torch.Tensor) else torch.cat(list(student_logits), 1)
        keep = aligned & (labels != self.ignore_index)
        rows_s, rows_t = student[keep], teacher_rows[keep].float()
        kd = torch.zeros((), dtype=torch.float32, device=labels.device)
        if self.exact_weight:
            counted = torch.zeros(rows_s.shape[0], dtype=torch.long, device=labels.device)
            exact, _ = self.divergence.token_sum(rows_s[:, self.student_ids], rows_t[:, self.teacher_ids], counted)
            kd = kd + self.exact_weight * exact
        if self.uld_weight:
            temperature = float(getattr(self.divergence, "temperature", 1.0))
            kd = kd + self.uld_weight * uld_distance(rows_s, rows_t, self.uld_top_k, temperature).sum()
        sums = {"kd": kd, "aligned": keep.sum().float()}
        if diagnostics:
            with torch.no_grad():
                student_of_teacher = torch.full((rows_t.shape[-1],), -1, dtype=torch.long, device=rows_t.device)
                student_of_teacher[self.teacher_ids] = self.student_ids
                teacher_top = student_of_teacher[rows_t.argmax(-1)]
                sums["agree"] = (teacher_top == rows_s.argmax(-1)).sum().float()
                sums["teacher_entropy"] = kd_losses.entropy(torch.log_softmax(rows_t, dim=-1)).sum()
        return sums
