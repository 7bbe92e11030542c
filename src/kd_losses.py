"""Exact, numerically stable distillation losses that torchtune YAML can name: ``_component_: kd_losses.<Name>``.

Divergences between the teacher's next-token distribution ``p_t`` and the student's ``p_s`` (both from logits):

=========================  ====================================================================================
``ForwardKLLoss``          KL(p_t ‖ p_s) — mean-seeking; the classic (Hinton) KD objective
``ReverseKLLoss``          KL(p_s ‖ p_t) — mode-seeking (MiniLLM)
``SymmetricKLLoss``        (1−λ)·KL(p_t‖p_s) + λ·KL(p_s‖p_t)
``JSDistanceLoss``         λ·KL(p_s‖m) + (1−λ)·KL(p_t‖m), m = (1−λ)·p_t + λ·p_s (generalised JSD, ≤ H(λ) ≤ ln 2)
``TVDistanceLoss``         ½·Σ|p_t − p_s| (≤ 1)
``GeneralizedJSDLoss``     GKD's JSD(β): β·KL(p_t‖m) + (1−β)·KL(p_s‖m), m = β·p_t + (1−β)·p_s; β = 0 forward KL,
                           β = 1 reverse KL (on-policy distillation, Agarwal et al. 2024)
``SkewForwardKLLoss``      KL(p_t ‖ α·p_t + (1−α)·p_s) (DistiLLM's skew KL)
``SkewReverseKLLoss``      KL(p_s ‖ α·p_s + (1−α)·p_t) (DistiLLM's skew reverse KL)
=========================  ====================================================================================

Every divergence takes ``temperature`` (both logits divided by T, the loss multiplied by T², Hinton et al. 2015)
and ``ignore_index``. Each has a chunked twin ``<Name>WithChunkedOutputLoss(num_output_chunks=8, ...)`` that takes
the lists of logit chunks torchtune's ``model.set_num_output_chunks(n)`` produces; all of them share one chunking
mechanism (:class:`ChunkedOutputMixin`).

Shape of the computation (Liger-Kernel style): every divergence is a :class:`Divergence` (``is_divergence`` tells
one apart from any other loss). Its ``per_token`` is the definition on fp32 log-probabilities, its
``value_and_grad`` the same value with a hand-derived gradient; ``block_value_and_grad`` applies it to one block of
logits (upcast, temperature, log-softmax, value, gradient, ignored rows dropped) without autograd, and ``token_sum``
adds the values over counted tokens, computing each block's gradient at once and keeping only that for backward.
The mean (``forward``) divides once by the count, so a batch with no counted token gives exactly 0 with zero
gradients, and chunked equals unchunked. Recipes sum ``token_sum`` over micro-batches and divide by the step's
token count so that every token weighs the same; ``token_sum_and_diagnostics`` adds the top-1 agreement and the
teacher's entropy (:func:`diagnostics`), read from the log-probabilities the blocks compute anyway.

Passes that compute the logits themselves (``torchtune_kd.core.fused_output``) use the same pieces per chunk:
``value_and_grad``, :func:`sparse_value_and_grad`, :func:`zero_ignored_rows`, :func:`diagnostics` and
``Divergence.check_sparse``.

Numerics: everything happens in log space on fp32 upcasts (one chunk at a time); the JSD mixture is a
``logsumexp``; the ``0·log 0 = 0`` convention is applied with masks that keep gradients finite, so ``-inf`` logits
(masked vocabulary), logit gaps of 1e4 and bf16 inputs give finite values and gradients wherever the divergence
itself is finite. (KL(p‖q) is +inf when q is 0 where p is not — e.g. forward KL with a student that masks a token
the teacher allows; JSD and TVD are always finite.) The masks select entries whose probability is exactly 0, never
"whatever came out nan": a token whose student or teacher logits hold a nan gets a nan value on every path (a
diverged model must not look like a perfect match); ignored tokens are dropped whatever they hold.

Sparse teacher (a cache of top-k log-probabilities, ``recipes/cache_teacher.py``): every divergence also takes a
:class:`TeacherTopK` in place of the teacher's logits. The teacher is then known only on its ``k`` most probable
tokens plus one *tail bucket* holding the rest of its mass (exact: the cache stores the full log-normaliser's tail),
and the student's distribution is coarsened the same way, its tail being the exact mass of its full softmax outside
those ids. The loss is the divergence between the two distributions over these ``k + 1`` outcomes
(:func:`coarsen_teacher`, :func:`coarsen_student`): equal to the dense divergence at ``k = vocab``; below it, a
lower bound of it (every divergence here is an f-divergence, and merging outcomes never increases one). Same
``token_sum`` contract, chunking, temperature and numerics as the dense form.

Hidden-state (intermediate representation) losses :class:`CosineIRLoss` and :class:`MSEIRLoss` compare aligned
layer outputs over real tokens; :func:`make_projection` builds the learned student-dim → teacher-dim map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

Logits = Union[torch.Tensor, Sequence[torch.Tensor]]

__all__ = [
    "ForwardKLLoss", "ReverseKLLoss", "SymmetricKLLoss", "JSDistanceLoss", "TVDistanceLoss", "GeneralizedJSDLoss",
    "SkewForwardKLLoss", "GeneralizedJSDWithChunkedOutputLoss",
    "SkewReverseKLLoss", "ForwardKLWithChunkedOutputLoss", "ReverseKLWithChunkedOutputLoss",
    "SymmetricKLWithChunkedOutputLoss", "JSDistanceWithChunkedOutputLoss", "TVDistanceWithChunkedOutputLoss",
    "SkewForwardKLWithChunkedOutputLoss", "SkewReverseKLWithChunkedOutputLoss", "CosineIRLoss", "MSEIRLoss",
    "make_projection", "DIVERGENCES", "kl_per_token", "jsd_per_token", "tvd_per_token", "TeacherTopK",
    "coarsen_student", "coarsen_teacher", "Divergence", "is_divergence", "ChunkedOutputMixin", "Block",
    "zero_ignored_rows", "sparse_value_and_grad", "entropy", "diagnostics",
]


# ----------------------------------------------------------------------------------------------- pure functions


def kl_per_token(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row from log-probabilities ``(num_tokens, vocab)``; ``0·log(0/q) = 0``.

    Where p > 0 and q = 0 the result is +inf, as the definition says.
    """
    p = logp.exp()
    support = p > 0
    # Outside p's support the term is 0; masking *before* the subtraction keeps inf - inf (-> nan) out of both the
    # value and the gradient. A nan row (from a nan logit) fails the test too, but then p itself is nan and so is p·0.
    diff = torch.where(support, logp - logq, torch.zeros_like(logp))
    return (p * diff).sum(-1)


def _log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·a + (1−w)·b) from log a and log b, stably (no underflow of the mixture to log 0).

    Where both are -inf (a vocabulary entry masked in both models) the mixture is -inf too; logaddexp's gradient
    there is nan (exp(-inf - -inf)), so those entries go through a finite stand-in and are put back afterwards.
    """
    if weight_a >= 1.0:
        return log_a
    if weight_a <= 0.0:
        return log_b
    both_masked = torch.isneginf(log_a) & torch.isneginf(log_b)
    safe_a = torch.where(both_masked, torch.zeros_like(log_a), log_a)
    safe_b = torch.where(both_masked, torch.zeros_like(log_b), log_b)
    mixed = torch.logaddexp(safe_a + math.log(weight_a), safe_b + math.log1p(-weight_a))
    return torch.where(both_masked, torch.full_like(mixed, float("-inf")), mixed)


def jsd_per_token(s_logp: torch.Tensor, t_logp: torch.Tensor, lambda_weight: float) -> torch.Tensor:
    """Generalised JSD: λ·KL(p_s‖m) + (1−λ)·KL(p_t‖m), m = (1−λ)·p_t + λ·p_s."""
    log_m = _log_mixture(t_logp, s_logp, 1.0 - lambda_weight)
    value = torch.zeros(s_logp.shape[:-1], dtype=s_logp.dtype, device=s_logp.device)
    if lambda_weight > 0:
        value = value + lambda_weight * kl_per_token(s_logp, log_m)
    if lambda_weight < 1:
        value = value + (1.0 - lambda_weight) * kl_per_token(t_logp, log_m)
    return value


def tvd_per_token(s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """½·Σ|p_t − p_s| per row."""
    return 0.5 * (t_logp.exp() - s_logp.exp()).abs().sum(-1)


def _weighted_log_ratio(p: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """``p · log_ratio`` elementwise, in place on ``log_ratio``, with the ``0·log 0 = 0`` convention.

    Terms where ``p`` is exactly 0 are 0 by definition, whatever ``log_ratio`` holds there (``±inf`` or nan when a
    log-probability is -inf). The mask is ``p == 0`` rather than "wherever the product is nan": a nan logit makes
    its whole row of log-probabilities nan, and that nan must reach the value (a diverged model must not look like
    a perfect match). Where ``p > 0`` a genuine +inf (an infinite divergence) is kept too.
    """
    return _zero_where_p_is_zero(p, log_ratio.mul_(p))


def _zero_where_p_is_zero(p: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
    """``terms`` with every entry where ``p`` is exactly 0 set to 0, in place; nan anywhere else is kept.

    ``logical_not(p)`` is True exactly where ``p == 0`` (nan is truthy). Its bool mask, a quarter of a float
    tensor, is the only allocation; on CPU this pair measured about twice as fast as ``masked_fill_(p == 0, 0)``.
    """
    return torch.where(torch.logical_not(p), terms.new_zeros(()), terms, out=terms)


def _through_softmax(probs: torch.Tensor, probs_times_grad: torch.Tensor) -> torch.Tensor:
    """Gradient with respect to logits from ``p ⊙ ∂L/∂p`` (in place): ``p⊙h − p·Σ(p⊙h)``, the softmax Jacobian.

    Taking ``p ⊙ h`` rather than ``h`` keeps entries with ``p = 0`` (where ``h`` may be infinite) exactly 0.
    """
    return probs_times_grad.addcmul_(probs, probs_times_grad.sum(-1, keepdim=True), value=-1.0)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·a + (1−w)·b) for 0 < w < 1 as a logsumexp, gradient-free, in one new tensor.

    -inf where both are -inf; no underflow of the mixture. Written as ``log(1−w) + logaddexp(log a + log(w/(1−w)),
    log b)`` so that only one temporary is allocated.
    """
    shifted_a = log_a + (math.log(weight_a) - math.log1p(-weight_a))
    return torch.logaddexp(shifted_a, log_b, out=shifted_a).add_(math.log1p(-weight_a))


def zero_ignored_rows(grad: torch.Tensor, keep: torch.Tensor, *, by_index: bool) -> torch.Tensor:
    """Zero, in place, the rows of ``grad`` ``(num_tokens, vocab)`` whose ``keep`` ``(num_tokens,)`` is False.

    ``by_index`` touches only those rows (cheapest on CPU, but its ``nonzero`` is a device sync elsewhere and has a
    data-dependent shape that breaks a ``torch.compile`` graph); otherwise one masked pass, which needs no sync.
    A fill rather than a multiplication: an ignored row may hold inf or nan.
    """
    if by_index:
        return grad.index_fill_(0, (~keep).nonzero().squeeze(1), 0.0)
    return grad.masked_fill_(~keep[:, None], 0.0)


def _nan_where_input_is_nan(values: torch.Tensor, s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """``values`` with nan in every row where the student's or the teacher's log-probabilities hold a nan.

    For the divergences that are identically 0 (JSD at λ ∈ {0, 1}, skew KLs at α = 1): they never read one of
    their inputs, yet a nan logit there must still show. A row of log-probabilities sums to nan exactly when it
    holds one (its entries are ≤ 0 or -inf, never +inf), so two row sums do, without a vocabulary-sized temporary.
    """
    return values.masked_fill(torch.isnan(s_logp.sum(-1) + t_logp.sum(-1)), math.nan)


def _zero_value_and_grad(s_logp: torch.Tensor, t_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Value and gradient of a divergence that is identically 0 (a mixture equal to the compared distribution).

    The value is nan, not 0, in rows with a nan input (see :func:`_nan_where_input_is_nan`).
    """
    values = torch.zeros(s_logp.shape[:-1], dtype=s_logp.dtype, device=s_logp.device)
    return _nan_where_input_is_nan(values, s_logp, t_logp), torch.zeros_like(s_logp)


def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value} must be in [0, 1]")
    return value


# ------------------------------------------------------------------------------------ sparse (top-k) teacher


@dataclass(frozen=True)
class TeacherTopK:
    """The teacher's next-token distribution as its ``k`` most probable tokens plus a tail bucket.

    Attributes:
        ids (torch.Tensor): ``(..., k)`` integer token ids (distinct within a row, most probable first: the
            diagnostics read the first as the teacher's top-1), any integer dtype.
        logprobs (torch.Tensor): ``(..., k)`` log p_t of those ids at ``temperature`` (any float dtype: caches
            store fp16).
        log_tail (torch.Tensor): ``(...,)`` log(1 − Σ top-k p_t), exact (``-inf`` when ``k = vocab``).
        temperature (float): the temperature the log-probabilities were computed at; a loss with another
            temperature refuses them.
        entropy (Optional[torch.Tensor]): ``(...,)`` the full distribution's entropy (nats, T = 1), which the top-k
            form cannot give; read only by the diagnostics (:func:`diagnostics`), ``None`` when unknown.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    log_tail: torch.Tensor
    temperature: float = 1.0
    entropy: Optional[torch.Tensor] = None

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """The leading (token) shape, e.g. ``(bsz, seq_len)``."""
        return self.log_tail.shape

    def _map(self, per_token: Callable[[torch.Tensor, bool], torch.Tensor]) -> "TeacherTopK":
        """The same fields through ``per_token(tensor, has_k_dim)``."""
        entropy = None if self.entropy is None else per_token(self.entropy, False)
        return TeacherTopK(per_token(self.ids, True), per_token(self.logprobs, True), per_token(self.log_tail, False),
                           self.temperature, entropy)

    def reshape_rows(self) -> "TeacherTopK":
        """The same distributions as ``(num_tokens, k)`` rows."""
        return self._map(lambda t, has_k: t.reshape(-1, self.k) if has_k else t.reshape(-1))

    def chunk(self, chunks: int, dim: int = 1) -> list["TeacherTopK"]:
        """Split along a token dimension like ``Tensor.chunk`` (as labels are split for chunked logits)."""
        return self._split(lambda t: t.chunk(chunks, dim))

    def split(self, size: int, dim: int = 0) -> list["TeacherTopK"]:
        """Split along a token dimension like ``Tensor.split`` (``size`` tokens per part, the last may be shorter)."""
        return self._split(lambda t: t.split(size, dim))

    def _split(self, parts_of: Callable[[torch.Tensor], Sequence[torch.Tensor]]) -> list["TeacherTopK"]:
        fields = [parts_of(t) for t in (self.ids, self.logprobs, self.log_tail)]
        entropies = parts_of(self.entropy) if self.entropy is not None else [None] * len(fields[0])
        return [TeacherTopK(i, lp, lt, self.temperature, e) for i, lp, lt, e in zip(*fields, entropies)]

    def to(self, device: Union[str, torch.device]) -> "TeacherTopK":
        return self._map(lambda t, has_k: t.to(device))


def coarsen_teacher(teacher: TeacherTopK) -> torch.Tensor:
    """The teacher's ``k + 1``-outcome log-probabilities ``(..., k + 1)`` in fp32: top-k, then the tail.

    Renormalised (a log-softmax over the stored values): compact stored dtypes round each value, and a divergence
    must compare two proper distributions (so that it is 0 at equality). At fp32 precision this changes nothing.
    """
    values = torch.cat((teacher.logprobs.float(), teacher.log_tail.float().unsqueeze(-1)), dim=-1)
    return torch.log_softmax(values, dim=-1)


def coarsen_student(s_logp: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's log-probabilities coarsened to the teacher's top-k ids plus the tail.

    Args:
        s_logp (torch.Tensor): full log-probabilities ``(rows, vocab)``, fp32.
        ids (torch.Tensor): ``(rows, k)`` int64.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: ``(rows, k + 1)`` coarsened log-probabilities (the tail as a
        ``logsumexp`` of the student's own log-probabilities outside ``ids``, exact and stable, ``-inf`` when
        empty) and the ``(rows, vocab)`` tail-only log-probabilities (``-inf`` at ``ids``) for the gradient.
    """
    top = s_logp.gather(-1, ids)
    tail_only = s_logp.scatter(-1, ids, float("-inf"))
    return torch.cat((top, torch.logsumexp(tail_only, dim=-1, keepdim=True)), dim=-1), tail_only


def sparse_value_and_grad(
    divergence: "Divergence", s_logp: torch.Tensor, ids: torch.Tensor, t_coarse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A divergence over ``k + 1`` outcomes and its gradient with respect to the student's full logits.

    With ``c`` the coarsened student log-probabilities and ``g = ∂L/∂c`` (the divergence's own ``value_and_grad``
    over ``k + 1`` outcomes, which sums to 0 over a row), the chain rule through ``c_j = z_{id_j} − log Z`` and
    ``c_tail = log Σ_{v ∉ ids} e^{z_v} − log Z`` gives ``∂L/∂z_v = g_j`` at ``v = id_j`` and
    ``g_tail · p_v / p_tail`` elsewhere: the tail's gradient shared in proportion to the student's own tail
    probabilities.

    Args:
        divergence (Divergence): the divergence whose ``value_and_grad`` is applied to the ``k + 1`` outcomes.
        s_logp (torch.Tensor): ``(rows, vocab)`` fp32 student log-probabilities (temperature applied).
        ids (torch.Tensor): ``(rows, k)`` int64.
        t_coarse (torch.Tensor): ``(rows, k + 1)`` fp32 teacher log-probabilities (:func:`coarsen_teacher`).

    Returns:
        tuple[torch.Tensor, torch.Tensor]: values ``(rows,)`` and the gradient ``(rows, vocab)``.
    """
    k = ids.shape[-1]
    s_coarse, tail_only = coarsen_student(s_logp, ids)
    log_tail = s_coarse[:, k:].clone()  # value_and_grad overwrites its inputs
    values, g = divergence.value_and_grad(s_coarse, t_coarse.clone())
    # p_v / p_tail = exp(log p_v − log p_tail); an empty tail (-inf) has no entries to share among.
    safe_log_tail = torch.where(torch.isneginf(log_tail), torch.zeros_like(log_tail), log_tail)
    grad = tail_only.sub_(safe_log_tail).exp_().mul_(g[:, k:])
    return values, grad.scatter_(-1, ids, g[:, :k])



# ---------------------------------------------------------------------------------------------------- diagnostics


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """H(p) = −Σ p·log p per row of log-probabilities ``(rows, vocab)`` -> ``(rows,)``, with ``0·log 0 = 0``.

    ``log p`` is the given one, clamped to the dtype's lowest finite value so that a masked (``-inf``) entry
    contributes ``0 · finite = 0``; a nan passes the clamp, so a row with a nan logit has a nan entropy. (Reading
    ``log p`` rather than recomputing it, as ``torch.special.entr`` does, costs about half as much on CPU.)
    """
    return -logp.exp().mul_(logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)


def diagnostics(
    student: torch.Tensor, teacher: Union[torch.Tensor, TeacherTopK], keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The distillation health diagnostics over kept rows: top-1 agreement count and summed teacher entropy.

    The one implementation every path uses (the divergences' blocks, the fused output pass, logits from any KD
    loss). The teacher entropy at T = 1 also links a KL to torchtune's ``ForwardKLLoss``, which reports the soft
    cross-entropy H(p_t, p_s) = KL(p_t ‖ p_s) + H(p_t).

    Args:
        student (torch.Tensor): ``(rows, vocab)`` the student's logits or log-probabilities at any temperature (only
            its argmax is read).
        teacher (Union[torch.Tensor, TeacherTopK]): ``(rows, vocab)`` the teacher's fp32 log-probabilities at
            T = 1; or :class:`TeacherTopK` rows ``(rows, k)`` with ``entropy`` (its first id is its top-1).
        keep (torch.Tensor): ``(rows,)`` bool, True where the token counts.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: ``(agreements, entropy_sum)`` as fp32 scalars. Masked sums, never
        boolean indexing: no device sync.
    """
    if isinstance(teacher, TeacherTopK):
        if teacher.entropy is None:
            raise ValueError("the diagnostics need the cached teacher's entropy (TeacherTopK.entropy is None)")
        teacher_top1, row_entropy = teacher.ids[:, 0].long(), teacher.entropy.float()
    else:
        teacher_top1, row_entropy = teacher.argmax(-1), entropy(teacher)
    zero = torch.zeros((), dtype=torch.float32, device=keep.device)
    agree = ((student.argmax(-1) == teacher_top1) & keep).sum().float()
    return agree, torch.where(keep, row_entropy, zero).sum()


class Block(NamedTuple):
    """What :meth:`Divergence.block_value_and_grad` returns for one block of tokens.

    Attributes:
        value (torch.Tensor): fp32 scalar, the divergence summed over counted tokens, × T².
        grad (torch.Tensor): its gradient with respect to the student's logits (their shape and dtype).
        agree (Optional[torch.Tensor]): with ``diagnostics=True``, the top-1 agreement count (fp32 scalar).
        teacher_entropy (Optional[torch.Tensor]): with ``diagnostics=True``, the summed teacher entropy (T = 1).
    """

    value: torch.Tensor
    grad: torch.Tensor
    agree: Optional[torch.Tensor] = None
    teacher_entropy: Optional[torch.Tensor] = None


# -------------------------------------------------------------------------------------------------- divergences


class Divergence(nn.Module):
    """Base of every divergence: validation, temperature, fp32 upcast, masking and reduction in one place.

    Args:
        temperature (float): both logits are divided by it and the loss is multiplied by its square. Default 1.0.
        ignore_index (int): label value of tokens that do not count. Default -100.
    """

    def __init__(self, temperature: float = 1.0, ignore_index: int = -100) -> None:
        super().__init__()
        temperature = float(temperature)
        if not temperature > 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature={temperature} must be a finite number > 0")
        self.temperature = temperature
        self.ignore_index = ignore_index

    _compiled = False

    def compile_blocks(self, backend: str = "inductor") -> None:
        """``torch.compile`` the per-block computation that runs in training (upcast, log-softmax, value, gradient).

        That is where a distillation step spends its loss time at large vocabularies (torchtune's
        ``compile_loss`` compiles its chunked losses' per-chunk function the same way). Ignored rows are then
        zeroed by a masked pass: the by-index variant's ``nonzero`` has a data-dependent shape that would break
        the graph.
        """
        self._compiled = True
        self.block_value_and_grad = torch.compile(self.block_value_and_grad, backend=backend)

    def per_token(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
        """The divergence per row of fp32 log-probabilities ``(num_tokens, vocab)`` -> ``(num_tokens,)``.

        The definition, written with differentiable torch ops: used without gradients and as the reference that
        :meth:`value_and_grad` is tested against.
        """
        raise NotImplementedError

    def value_and_grad(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The divergence per row and its gradient with respect to the student's (temperature-scaled) logits.

        Hand-derived, so that a chunk costs a few vocabulary-sized passes instead of autograd's forward and backward
        through every intermediate. Each subclass writes ``∂L/∂p_s`` as ``p_s ⊙ h`` and maps it through the softmax
        Jacobian with :func:`_through_softmax`.

        Both arguments are scratch space: they are overwritten (the gradient is usually built in ``s_logp``'s
        memory). On CPU a fresh vocabulary-sized tensor costs about as much as three in-place passes over it (new
        pages are faulted in), so the implementations allocate at most two (plus bool masks, a quarter of that size,
        for the ``0·log 0 = 0`` convention).

        Args:
            s_logp (torch.Tensor): student log-probabilities ``(num_tokens, vocab)``, fp32; overwritten.
            t_logp (torch.Tensor): teacher log-probabilities ``(num_tokens, vocab)``, fp32; overwritten.

        Returns:
            tuple[torch.Tensor, torch.Tensor]: values ``(num_tokens,)`` and gradient ``(num_tokens, vocab)``.
        """
        raise NotImplementedError

    def _check(self, student: torch.Tensor, teacher: Union[torch.Tensor, TeacherTopK], labels: torch.Tensor) -> None:
        if isinstance(teacher, TeacherTopK):
            self.check_sparse(student, teacher)
        elif student.shape != teacher.shape:
            if student.shape[-1] != teacher.shape[-1]:
                raise ValueError(
                    f"student vocab size {student.shape[-1]} != teacher vocab size {teacher.shape[-1]}: logit "
                    "distillation needs a shared vocabulary (the same tokenizer for both models)"
                )
            raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ in shape")
        if tuple(labels.shape) != tuple(student.shape[:-1]):
            raise ValueError(
                f"labels have shape {tuple(labels.shape)} but the logits {tuple(student.shape)} need "
                f"{tuple(student.shape[:-1])}"
            )

    def check_sparse(self, student: torch.Tensor, teacher: TeacherTopK) -> None:
        """Refuse a :class:`TeacherTopK` that does not fit this loss and the student's logits ``(..., vocab)``.

        Raises:
            ValueError: another temperature, another token shape, mismatched fields, or ``k`` above the vocabulary.
        """
        if teacher.temperature != self.temperature:
            raise ValueError(
                f"the teacher's top-k log-probabilities were computed at temperature {teacher.temperature}, this loss "
                f"uses temperature={self.temperature}: rebuild the teacher cache at this temperature or set the "
                "loss's temperature to the cache's"
            )
        if tuple(teacher.shape) != tuple(student.shape[:-1]) or tuple(teacher.ids.shape[:-1]) != tuple(teacher.shape):
            raise ValueError(
                f"teacher top-k ids {tuple(teacher.ids.shape)} / tail {tuple(teacher.shape)} do not match the "
                f"student logits {tuple(student.shape)}: one teacher row per student token"
            )
        if teacher.logprobs.shape != teacher.ids.shape:
            raise ValueError(f"teacher top-k logprobs {tuple(teacher.logprobs.shape)} != ids {tuple(teacher.ids.shape)}")
        if teacher.entropy is not None and teacher.entropy.shape != teacher.shape:
            raise ValueError(f"teacher entropy {tuple(teacher.entropy.shape)} != its tail {tuple(teacher.shape)}")
        if teacher.k > student.shape[-1]:
            raise ValueError(f"teacher top-k has k={teacher.k} ids but the vocabulary has {student.shape[-1]} tokens")

    def _block_sums(
        self, student: torch.Tensor, teacher: Union[torch.Tensor, TeacherTopK], labels: torch.Tensor, diagnostics: bool
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Sum of the per-token divergence over counted tokens of one block (fp32 scalar, already × T²), and with
        ``diagnostics`` the block's agreement count and teacher-entropy sum (else ``None``), detached.

        When the student's logits need a gradient, the block's gradient is computed right away by the divergence's
        hand-derived :meth:`value_and_grad` and its intermediates (fp32 upcasts, softmaxes, mixtures: several
        vocab-sized tensors) are freed; only the gradient, one tensor the size of the block's logits, waits for the
        backward pass. With autograd every chunk's intermediates would stay alive until backward and chunking would
        save little memory.
        """
        self._check(student, teacher, labels)
        if student.requires_grad and torch.is_grad_enabled():
            if isinstance(teacher, torch.Tensor):
                teacher = teacher.detach()
            if not diagnostics:
                return _EagerGradBlock.apply(student, teacher, labels, self, False), None, None
            return _EagerGradBlock.apply(student, teacher, labels, self, True)
        return self._block_sums_graph(student, teacher, labels, diagnostics)

    def block_value_and_grad(
        self, student: torch.Tensor, teacher: Union[torch.Tensor, TeacherTopK], labels: torch.Tensor, *,
        diagnostics: bool = False,
    ) -> Block:
        """One block's divergence and its gradient, without autograd: the per-chunk computation of training.

        The student's and the teacher's logits are upcast to fp32 (one block at a time), divided by the temperature
        and log-softmaxed; the divergence's :meth:`value_and_grad` (or its sparse form against a
        :class:`TeacherTopK`) gives values and gradient; ignored rows are dropped. With ``diagnostics`` the
        agreement and the teacher's entropy are read from the same log-probabilities first (at T ≠ 1 the teacher's
        entropy needs its T = 1 log-softmax too).

        Args:
            student (torch.Tensor): ``(..., vocab)`` logits (any float dtype); not modified.
            teacher (Union[torch.Tensor, TeacherTopK]): logits of the same shape, or a :class:`TeacherTopK` with the
                same leading shape (with ``entropy`` when ``diagnostics``).
            labels (torch.Tensor): ``student.shape[:-1]``; ``ignore_index`` where a token does not count.
            diagnostics (bool): also return the top-1 agreement count and the teacher-entropy sum.

        Returns:
            Block: ``value`` (fp32 scalar × T²), ``grad`` (the student's shape and dtype), and with
            ``diagnostics`` ``agree`` and ``teacher_entropy`` (fp32 scalars).
        """
        vocab = student.shape[-1]
        keep = labels.reshape(-1) != self.ignore_index
        s = student.detach().reshape(-1, vocab).float()
        if self.temperature != 1.0:
            s = s / self.temperature
        agree = entropy_sum = None
        if isinstance(teacher, TeacherTopK):
            rows = teacher.reshape_rows()
            s_logp = F.log_softmax(s, dim=-1)
            if diagnostics:
                agree, entropy_sum = _diagnostics(s_logp, rows, keep)
            values, grad = sparse_value_and_grad(self, s_logp, rows.ids.long(), coarsen_teacher(rows))
        else:
            t = teacher.detach().reshape(-1, vocab).float()
            if self.temperature != 1.0:
                if diagnostics:
                    # The entropy is at T = 1; the agreement (an argmax) is the same at any temperature.
                    agree, entropy_sum = _diagnostics(s, F.log_softmax(t, dim=-1), keep)
                t = t / self.temperature
            s_logp, t_logp = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
            if diagnostics and self.temperature == 1.0:
                agree, entropy_sum = _diagnostics(s_logp, t_logp, keep)
            values, grad = self.value_and_grad(s_logp, t_logp)
        # Ignored rows are computed and then dropped; where() and fills, not multiplication, because such a row may
        # be inf/nan (e.g. all -inf padding logits). On CPU, filling just the ignored rows by index is ~10× cheaper
        # than a masked pass over the whole block; elsewhere the index would cost a device sync per chunk.
        values = torch.where(keep, values, torch.zeros_like(values))
        grad = zero_ignored_rows(grad, keep, by_index=grad.device.type == "cpu" and not self._compiled)
        if self.temperature != 1.0:
            grad = grad.mul_(self.temperature)  # ∂(T²·L(z/T))/∂z = T·∂L/∂s
        value = values.sum() * (self.temperature**2)
        return Block(value, grad.view(student.shape).to(student.dtype), agree, entropy_sum)

    def _block_sums_graph(
        self, student: torch.Tensor, teacher: Union[torch.Tensor, TeacherTopK], labels: torch.Tensor, diagnostics: bool
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        vocab = student.shape[-1]
        keep = labels.reshape(-1) != self.ignore_index
        s = student.reshape(-1, vocab).float()
        if self.temperature != 1.0:
            s = s / self.temperature
        agree = entropy_sum = None
        if isinstance(teacher, TeacherTopK):
            rows = teacher.reshape_rows()
            s_logp = F.log_softmax(s, dim=-1)
            if diagnostics:
                agree, entropy_sum = _diagnostics(s_logp.detach(), rows, keep)
            s_coarse, _ = coarsen_student(s_logp, rows.ids.long())
            values = self.per_token(s_coarse, coarsen_teacher(rows))
        else:
            t = teacher.reshape(-1, vocab).float()
            if diagnostics and self.temperature != 1.0:
                agree, entropy_sum = _diagnostics(s.detach(), F.log_softmax(t.detach(), dim=-1), keep)
            if self.temperature != 1.0:
                t = t / self.temperature
            s_logp, t_logp = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
            if diagnostics and self.temperature == 1.0:
                agree, entropy_sum = _diagnostics(s_logp.detach(), t_logp.detach(), keep)
            values = self.per_token(s_logp, t_logp)
        # where(), not multiplication: an ignored row's value may be inf/nan (e.g. all -inf padding logits).
        values = torch.where(keep, values, torch.zeros_like(values))
        return values.sum() * (self.temperature**2), agree, entropy_sum

    def _token_sums(
        self, student_logits: Logits, teacher_logits: Union[Logits, TeacherTopK], labels: torch.Tensor,
        diagnostics: bool,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The divergence's token sum (× T²) and, with ``diagnostics``, the agreement count and entropy sum."""
        return self._block_sums(student_logits, teacher_logits, labels, diagnostics)

    def token_sum(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of the per-token loss over counted tokens, and the number of counted tokens.

        Args:
            student_logits (torch.Tensor): ``(num_tokens, vocab)`` or ``(bsz, seq_len, vocab)``.
            teacher_logits (torch.Tensor): same shape as ``student_logits``; or a :class:`TeacherTopK` with the
                same leading shape (the sparse form over its top-k ids plus the tail).
            labels (torch.Tensor): ``(num_tokens,)`` or ``(bsz, seq_len)``, already aligned with the logits.

        Returns:
            tuple[torch.Tensor, torch.Tensor]: fp32 scalar sum (× T²) and the integer count.
        """
        return self._token_sums(student_logits, teacher_logits, labels, False)[0], (labels != self.ignore_index).sum()

    def token_sum_and_diagnostics(
        self, student_logits: Logits, teacher_logits: Union[Logits, TeacherTopK], labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`token_sum`'s sum with the top-1 agreement count and the teacher-entropy sum (T = 1) over counted
        tokens (:func:`diagnostics`), read from the log-probabilities each block computes for the divergence.

        Args:
            student_logits (Logits): as for :meth:`token_sum` (chunk lists for the chunked twins).
            teacher_logits (Union[Logits, TeacherTopK]): as for :meth:`token_sum`; a :class:`TeacherTopK` needs its
                ``entropy``.
            labels (torch.Tensor): as for :meth:`token_sum`.

        Returns:
            tuple[torch.Tensor, torch.Tensor, torch.Tensor]: the divergence's fp32 sum (× T², differentiable), the
            agreement count and the entropy sum (fp32, detached).
        """
        return self._token_sums(student_logits, teacher_logits, labels, True)

    def forward(self, student_logits: Logits, teacher_logits: Logits, labels: torch.Tensor) -> torch.Tensor:
        """Mean of the per-token loss over counted tokens (0 when none counts)."""
        total, count = self.token_sum(student_logits, teacher_logits, labels)
        return total / count.clamp(min=1)


_diagnostics = diagnostics  # for the methods above, whose ``diagnostics`` argument shadows the function


def is_divergence(obj_or_class: object) -> bool:
    """Whether a loss (instance or class) is a :class:`Divergence`: it has the per-block value-and-gradient the
    fused output pass and a teacher cache's sparse form need."""
    if isinstance(obj_or_class, type):
        return issubclass(obj_or_class, Divergence)
    return isinstance(obj_or_class, Divergence)


class _EagerGradBlock(torch.autograd.Function):
    """Value of one block with its gradient computed in the forward pass (see ``Divergence._block_sums``).

    One generic mechanism for every divergence: the divergence supplies ``value_and_grad``; this saves the gradient
    and scales it by the incoming gradient in backward. ``tests/unit/test_losses_reference.py`` checks every
    ``value_and_grad`` against autograd of the same divergence's ``per_token`` and against a float64 reference.
    With ``diagnostics`` the agreement and entropy sums come out too, as non-differentiable outputs.
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: Union[torch.Tensor, TeacherTopK], labels: torch.Tensor,
                loss: Divergence, diagnostics: bool):
        block = loss.block_value_and_grad(student, teacher, labels, diagnostics=diagnostics)
        ctx.save_for_backward(block.grad)
        if not diagnostics:
            return block.value
        ctx.mark_non_differentiable(block.agree, block.teacher_entropy)
        return block.value, block.agree, block.teacher_entropy

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor, *unused: torch.Tensor):
        # In place: the saved gradient is this block's alone and a fresh logits-sized tensor costs more than the
        # multiplication. So a second backward through the same graph (retain_graph=True) would see a scaled
        # gradient: refuse it rather than return a wrong one.
        if getattr(ctx, "consumed", False):
            raise RuntimeError("kd_losses computes each chunk's gradient once; backward twice through it (retain_graph=True) is not supported")
        ctx.consumed = True
        (grad,) = ctx.saved_tensors
        if grad.dtype in (torch.float32, torch.float64):
            return grad.mul_(grad_output.to(grad.dtype)), None, None, None, None
        # bf16/fp16: scale in fp32. Casting the scale (typically 1/tokens) to bf16 would bias the whole chunk's
        # gradient by up to 0.4%; an fp32 product costs one transient fp32 copy of this chunk only.
        return grad.copy_(grad.float().mul_(grad_output.float())), None, None, None, None


class ForwardKLLoss(Divergence):
    """KL(p_t ‖ p_s): the teacher's distribution is the target (mean-seeking)."""

    def per_token(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
        return kl_per_token(t_logp, s_logp)

    def value_and_grad(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p_t = t_logp.exp()
        values = _weighted_log_ratio(p_t, t_logp.sub_(s_logp)).sum(-1)
        return values, s_logp.exp_().sub_(p_t)  # ∂KL(p_t‖p_s)/∂z_s = p_s − p_t


class ReverseKLLoss(Divergence):
    """KL(p_s ‖ p_t): the student's own distribution weighs the errors (mode-seeking)."""

    def per_token(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
        return kl_per_token(s_logp, t_logp)

    def value_and_grad(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p_s = s_logp.exp()
        terms = _weighted_log_ratio(p_s, s_logp.sub_(t_logp))  # p_s·log(p_s/p_t) = p_s ⊙ ∂KL/∂p_s (+ a constant)
        values = terms.sum(-1)
        return values, _through_softmax(p_s, terms)


class SymmetricKLLoss(Divergence):
    """(1−λ)·KL(p_t‖p_s) + λ·KL(p_s‖p_t).

    Args:
        lambda_weight (float): weight λ ∈ [0, 1] of the reverse KL. Default 0.5.
    """

    def __init__(self, lambda_weight: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.lambda_weight = _check_fraction("lambda_weight", lambda_weight)

    def per_token(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
        lam = self.lambda_weight
        value = torch.zeros(s_logp.shape[:-1], dtype=s_logp.dtype, device=s_logp.device)
        if lam < 1:
            value = value + (1 - lam) * kl_per_token(t_logp, s_logp)
        if lam > 0:
            value = value + lam * kl_per_token(s_logp, t_logp)
        return value

    def value_and_grad(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam = self.lambda_weight
        if lam == 0.0:
            return ForwardKLLoss.value_and_grad(self, s_logp, t_logp)
        if lam == 1.0:
            return ReverseKLLoss.value_and_grad(self, s_logp, t_logp)
        p_s, p_t = s_logp.exp(), t_logp.exp()
        log_ratio = s_logp.sub_(t_logp)  # log(p_s/p_t)
        forward_terms = _weighted_log_ratio(p_t, torch.mul(log_ratio, -1.0, out=t_logp))
        values = (1 - lam) * forward_terms.sum(-1)
        reverse_terms = _weighted_log_ratio(p_s, log_ratio)
        values = values + lam * reverse_terms.sum(-1)
        grad = _through_softmax(p_s, reverse_terms).mul_(lam)
        return values, grad.add_(p_s.sub_(p_t), alpha=1 - lam)


class JSDistanceLoss(Divergence):
    """Generalised Jensen-Shannon divergence λ·KL(p_s‖m) + (1−λ)·KL(p_t‖m), m = (1−λ)·p_t + λ·p_s.

    The name is kept for compatibility with existing configs: the value is the divergence itself, not its square
    root (the Jensen-Shannon *distance*). At λ = 0.5 it is the symmetric JSD, bounded by ln 2; in general it is
    bounded by the binary entropy H(λ). λ = 0 or 1 gives 0 (the mixture equals the distribution being compared).

    Args:
        lambda_weight (float): λ ∈ [0, 1]. Default 0.5.
    """

    def __init__(self, lambda_weight: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.lambda_weight = _check_fraction("lambda_weight", lambda_weight)

    def per_token(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
        values = jsd_per_token(s_logp, t_logp, self.lambda_weight)
        if self.lambda_weight in (0.0, 1.0):  # identically 0, computed from one input only
            values = _nan_where_input_is_nan(values, s_logp, t_logp)
        return values

    def value_and_grad(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam = self.lambda_weight
        if lam in (0.0, 1.0):  # the mixture is the compared distribution itself
            return _zero_value_and_grad(s_logp, t_logp)
        log_m = _log_mix(t_logp, s_logp, 1.0 - lam)
        p_s = s_logp.exp()
        student_terms = _weighted_log_ratio(p_s, s_logp.sub_(log_m))
        values = lam * student_terms.sum(-1)
        teacher_log_ratio = torch.sub(t_logp, log_m, out=log_m)
        values = values + (1 - lam) * _weighted_log_ratio(t_logp.exp_(), teacher_log_ratio).sum(-1)
        # ∂JSD/∂p_s = λ·log(p_s/m): the mixture's own derivative terms cancel.
        return values, _through_softmax(p_s, student_terms).mul_(lam)


class GeneralizedJSDLoss(Divergence):
    """GKD's generalised Jensen-Shannon divergence JSD(β) (Agarwal et al., 2024; TRL's ``GKDTrainer``):

    β·KL(p_t‖m) + (1−β)·KL(p_s‖m), m = β·p_t + (1−β)·p_s, for 0 < β < 1;
    β = 0 is the forward KL(p_t‖p_s) and β = 1 the reverse KL(p_s‖p_t).

    The endpoints follow the paper's and TRL's convention rather than the limit: as β → 0 the mixture tends to p_s
    and JSD(β) ≈ β·KL(p_t‖p_s) (a forward KL scaled by β), as β → 1 it is ≈ (1−β)·KL(p_s‖p_t); at the endpoints
    the unscaled KLs are used. For 0 < β < 1 it is :class:`JSDistanceLoss` with λ = 1 − β.

    Args:
        beta (float): β ∈ [0, 1]. Default 0.5.
    """

    def __init__(self, beta: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.beta = _check_fraction("beta", beta)
        if self.beta == 0.0:
            self._impl: Divergence = ForwardKLLoss()
        elif self.beta == 1.0:
            self._impl = ReverseKLLoss()
        else:
            self._impl = JSDistanceLoss(lambda_weight=1.0 - self.beta)

    def per_token(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
        return self._impl.per_token(s_logp, t_logp)

    def value_and_grad(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._impl.value_and_grad(s_logp, t_logp)


class TVDistanceLoss(Divergence):
    """Total variation distance ½·Σ|p_t − p_s| ∈ [0, 1]."""

    def per_token(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
        return tvd_per_token(s_logp, t_logp)

    def value_and_grad(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p_s = s_logp.exp_()
        delta = torch.sub(p_s, t_logp.exp_(), out=t_logp)
        values = 0.5 * torch.linalg.vector_norm(delta, ord=1, dim=-1)
        # ∂TVD/∂p_s = ½·sign(p_s − p_t) (0 where they are equal, as autograd's abs)
        ps_h = delta.sign_().mul_(p_s).mul_(0.5)
        return values, _through_softmax(p_s, ps_h)


class _SkewKL(Divergence):
    """Shared by the skew KLs: ``alpha`` and its edge cases (α = 0 is the plain KL, α = 1 gives 0)."""

    _unskewed: type

    def __init__(self, alpha: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.alpha = _check_fraction("alpha", alpha)

    def value_and_grad(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.alpha == 0.0:
            return self._unskewed.value_and_grad(self, s_logp, t_logp)
        if self.alpha == 1.0:
            return _zero_value_and_grad(s_logp, t_logp)
        return self._skewed_value_and_grad(s_logp, t_logp)

    def _skewed_value_and_grad(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class SkewForwardKLLoss(_SkewKL):
    """DistiLLM's skew KL (Ko et al., 2024): KL(p_t ‖ α·p_t + (1−α)·p_s).

    Mixing a share α of the teacher into the student keeps the divergence finite where the student gives a token
    probability 0 and smooths its gradient. α = 0 is the forward KL; α = 1 gives 0.

    Args:
        alpha (float): α ∈ [0, 1]. Default 0.1 (the paper's choice).
    """

    _unskewed = ForwardKLLoss

    def per_token(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
        values = kl_per_token(t_logp, _log_mixture(t_logp, s_logp, self.alpha))
        # α = 1: identically 0, computed from the teacher only
        return _nan_where_input_is_nan(values, s_logp, t_logp) if self.alpha == 1.0 else values

    def _skewed_value_and_grad(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_m = _log_mix(t_logp, s_logp, self.alpha)
        p_s = s_logp.exp()
        # p_s ⊙ ∂/∂p_s = −(1−α)·p_s·p_t/m, in log space; 0 where p_s = 0 (where p_t = 0 too, -inf − -inf gives
        # nan): masked by p_s, not by nan, so that nan logits stay nan.
        ps_h = s_logp.add_(t_logp).sub_(log_m).exp_()
        ps_h = _zero_where_p_is_zero(p_s, ps_h).mul_(self.alpha - 1.0)
        teacher_log_ratio = torch.sub(t_logp, log_m, out=log_m)
        values = _weighted_log_ratio(t_logp.exp_(), teacher_log_ratio).sum(-1)
        return values, _through_softmax(p_s, ps_h)


class SkewReverseKLLoss(_SkewKL):
    """DistiLLM's skew reverse KL: KL(p_s ‖ α·p_s + (1−α)·p_t). α = 0 is the reverse KL; α = 1 gives 0.

    Args:
        alpha (float): α ∈ [0, 1]. Default 0.1.
    """

    _unskewed = ReverseKLLoss

    def per_token(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
        values = kl_per_token(s_logp, _log_mixture(s_logp, t_logp, self.alpha))
        # α = 1: identically 0, computed from the student only
        return _nan_where_input_is_nan(values, s_logp, t_logp) if self.alpha == 1.0 else values

    def _skewed_value_and_grad(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_m = _log_mix(s_logp, t_logp, self.alpha)
        p_s = s_logp.exp()
        # p_s ⊙ ∂/∂p_s = p_s·log(p_s/m) − α·p_s²/m (+ a constant that the softmax removes); t_logp is free now
        # p_s²/m is 0 where p_s = 0 (where m = 0 too, exp(-inf − -inf) is nan); masked by p_s so nan logits stay nan
        self_term = _zero_where_p_is_zero(p_s, torch.mul(s_logp, 2.0, out=t_logp).sub_(log_m).exp_())
        terms = _weighted_log_ratio(p_s, s_logp.sub_(log_m))
        values = terms.sum(-1)
        return values, _through_softmax(p_s, terms.sub_(self_term, alpha=self.alpha))


# ---------------------------------------------------------------------------------------------------- chunking


class ChunkedOutputMixin:
    """Turns any divergence into its chunked-output twin: one mechanism for all of them.

    ``token_sum`` and ``token_sum_and_diagnostics`` take lists of logit chunks ``(bsz, seq_len / n, vocab)``, the
    teacher's of the same shapes (or one :class:`TeacherTopK` ``(bsz, seq_len, k)``, split like the labels), and
    labels ``(bsz, seq_len)``. They walk the chunks (each upcast to fp32 on its own, so only one chunk's fp32 copy
    exists at a time) and add their sums; ``forward`` divides once by the count: the value is the token mean over
    the whole batch, never a mean of chunk means, and equals the unchunked loss.

    Args:
        num_output_chunks (int): number of chunks the model splits its output into. Default 8.
    """

    def __init__(self, num_output_chunks: int = 8, **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(num_output_chunks, bool) or not isinstance(num_output_chunks, int) or num_output_chunks < 1:
            raise ValueError(f"num_output_chunks={num_output_chunks!r} must be an integer >= 1")
        self.num_output_chunks = num_output_chunks

    def _token_sums(
        self, student_logits: Logits, teacher_logits: Union[Logits, TeacherTopK], labels: torch.Tensor,
        diagnostics: bool,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Sums over counted tokens of all chunks (see :meth:`Divergence.token_sum_and_diagnostics`).

        Args:
            student_logits (Logits): list of ``(bsz, seq_len / n, vocab)`` chunks (a single tensor also works).
            teacher_logits (Union[Logits, TeacherTopK]): the teacher's chunks, same shapes; or one
                :class:`TeacherTopK` ``(bsz, seq_len, k)``, split like the labels.
            labels (torch.Tensor): ``(bsz, seq_len)``.
            diagnostics (bool): also sum the agreement counts and teacher entropies (else they are ``None``).
        """
        if isinstance(student_logits, torch.Tensor) and isinstance(teacher_logits, (torch.Tensor, TeacherTopK)):
            return super()._token_sums(student_logits, teacher_logits, labels, diagnostics)
        student_logits = list(student_logits)
        if isinstance(teacher_logits, TeacherTopK):
            # One cached teacher for the whole sequence: split like the labels.
            teacher_logits = teacher_logits.chunk(len(student_logits), dim=1)
        teacher_logits = list(teacher_logits)
        if len(student_logits) != len(teacher_logits):
            raise ValueError(
                f"got {len(student_logits)} student chunks and {len(teacher_logits)} teacher chunks: both models "
                "need the same num_output_chunks"
            )
        if labels.dim() != 2:
            raise ValueError(f"chunked losses take labels of shape (bsz, seq_len), got {tuple(labels.shape)}")
        label_chunks = labels.chunk(len(student_logits), dim=1)
        if len(label_chunks) != len(student_logits):
            raise ValueError(
                f"labels of length {labels.shape[1]} split into {len(label_chunks)} chunks, not {len(student_logits)}"
            )
        total = torch.zeros((), dtype=torch.float32, device=labels.device)
        agree = entropy_sum = total.clone() if diagnostics else None
        for student, teacher, chunk_labels in zip(student_logits, teacher_logits, label_chunks):
            value, chunk_agree, chunk_entropy = self._block_sums(student, teacher, chunk_labels, diagnostics)
            total = total + value
            if diagnostics:
                agree, entropy_sum = agree + chunk_agree, entropy_sum + chunk_entropy
        return total, agree, entropy_sum


def _chunked(base: type, doc_name: str) -> type:
    name = f"{doc_name}WithChunkedOutputLoss"
    cls = type(name, (ChunkedOutputMixin, base), {"__module__": __name__})
    cls.__doc__ = f"{base.__name__} over chunked logits (see :class:`ChunkedOutputMixin`).\n\n{base.__doc__ or ''}"
    return cls


ForwardKLWithChunkedOutputLoss = _chunked(ForwardKLLoss, "ForwardKL")
ReverseKLWithChunkedOutputLoss = _chunked(ReverseKLLoss, "ReverseKL")
SymmetricKLWithChunkedOutputLoss = _chunked(SymmetricKLLoss, "SymmetricKL")
JSDistanceWithChunkedOutputLoss = _chunked(JSDistanceLoss, "JSDistance")
TVDistanceWithChunkedOutputLoss = _chunked(TVDistanceLoss, "TVDistance")
GeneralizedJSDWithChunkedOutputLoss = _chunked(GeneralizedJSDLoss, "GeneralizedJSD")
SkewForwardKLWithChunkedOutputLoss = _chunked(SkewForwardKLLoss, "SkewForwardKL")
SkewReverseKLWithChunkedOutputLoss = _chunked(SkewReverseKLLoss, "SkewReverseKL")

#: name -> (unchunked class, chunked class), for grids and CLIs.
DIVERGENCES: dict[str, tuple[type, type]] = {
    "forward_kl": (ForwardKLLoss, ForwardKLWithChunkedOutputLoss),
    "reverse_kl": (ReverseKLLoss, ReverseKLWithChunkedOutputLoss),
    "symmetric_kl": (SymmetricKLLoss, SymmetricKLWithChunkedOutputLoss),
    "jsd": (JSDistanceLoss, JSDistanceWithChunkedOutputLoss),
    "tvd": (TVDistanceLoss, TVDistanceWithChunkedOutputLoss),
    "gkd_jsd": (GeneralizedJSDLoss, GeneralizedJSDWithChunkedOutputLoss),
    "skew_kl": (SkewForwardKLLoss, SkewForwardKLWithChunkedOutputLoss),
    "skew_reverse_kl": (SkewReverseKLLoss, SkewReverseKLWithChunkedOutputLoss),
}


# ------------------------------------------------------------------------------------ hidden-state (IR) losses


class _HiddenStateLoss(nn.Module):
    """Base of the IR losses: fp32, optional parameter-free layer norm, masking to real tokens, token sums.

    The mask argument is either a bool tensor ``(bsz, seq_len)``, True at real (non-padding) tokens, or labels
    ``(bsz, seq_len)`` whose ``ignore_index`` entries are excluded. Prefer the bool mask: with labels, prompt
    tokens masked from the CE loss would be excluded too although they are real tokens.

    Args:
        layer_norm (bool): normalise both states over the hidden dimension (no learned scale) first. Default True.
        ignore_index (int): label value excluded when labels are passed. Default -100.
    """

    def __init__(self, layer_norm: bool = True, ignore_index: int = -100) -> None:
        super().__init__()
        self.layer_norm = bool(layer_norm)
        self.ignore_index = ignore_index

    def per_token(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def token_sum(
        self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum over real tokens and their count.

        Args:
            student_hidden (torch.Tensor): ``(bsz, seq_len, dim)``, already projected to the teacher's dim.
            teacher_hidden (torch.Tensor): ``(bsz, seq_len, dim)``.
            mask (torch.Tensor): bool ``(bsz, seq_len)`` (True = real token) or labels.
        """
        if student_hidden.shape != teacher_hidden.shape:
            raise ValueError(
                f"student hidden {tuple(student_hidden.shape)} and teacher hidden {tuple(teacher_hidden.shape)} "
                "differ: project the student to the teacher's size first (make_projection)"
            )
        if tuple(mask.shape) != tuple(student_hidden.shape[:-1]):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(student_hidden.shape[:-1])}")
        keep = mask if mask.dtype == torch.bool else mask != self.ignore_index
        # Dropped tokens become 0 *before* the computation, not only after it: the backward of the final where()
        # passes 0·(their local gradient) on, and a nan/inf state there (say, at a padding position) would reach
        # the student as nan. where() rather than indexing the kept rows: no device sync.
        student = torch.where(keep[..., None], student_hidden.float(), 0.0)
        teacher = torch.where(keep[..., None], teacher_hidden.float(), 0.0)
        if self.layer_norm:
            student = F.layer_norm(student, student.shape[-1:])
            teacher = F.layer_norm(teacher, teacher.shape[-1:])
        values = self.per_token(student, teacher)
        return torch.where(keep, values, torch.zeros_like(values)).sum(), keep.sum()

    def forward(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over real tokens (0 when there is none)."""
        total, count = self.token_sum(student_hidden, teacher_hidden, mask)
        return total / count.clamp(min=1)


class CosineIRLoss(_HiddenStateLoss):
    """1 − cos(LN(h_s), LN(h_t)) per token, averaged over real tokens (∈ [0, 2])."""

    def per_token(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)


class MSEIRLoss(_HiddenStateLoss):
    """Mean squared error over the hidden dimension per token, averaged over real tokens."""

    def per_token(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return (student - teacher).square().mean(-1)


def make_projection(
    student_dim: int, teacher_dim: int, *, identity_when_equal: bool = True, bias: bool = False
) -> nn.Module:
    """The learned map from the student's hidden size to the teacher's.

    A bias-free ``nn.Linear(student_dim, teacher_dim)`` with PyTorch's default (Kaiming-uniform) init: the IR loss
    layer-normalises its output, so the projection's scale does not matter and a standard init trains fine. With
    equal sizes and ``identity_when_equal``, ``nn.Identity()`` (nothing to learn, so aligned layers must agree
    directly).

    Raises:
        ValueError: for non-positive sizes.
    """
    for name, value in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if student_dim == teacher_dim and identity_when_equal:
        return nn.Identity()
    return nn.Linear(student_dim, teacher_dim, bias=bias)
