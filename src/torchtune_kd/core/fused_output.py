"""The output layer, CE and KD in one chunked pass: neither model's full logits nor a full-size logit gradient exist.

Unfused, both models return ``[tokens, vocab]`` logits and autograd keeps a logits-sized gradient; at Llama 3's
128,256-token vocabulary those tensors, not the transformer layers, set the memory of a distillation step. Here the
loss takes both models' final (normed) hidden states and output weights and, for each chunk of tokens:

1. computes the chunk's logits ``z_s = h_s W_sᵀ`` and (without gradient) ``z_t = h_t W_tᵀ``;
2. computes CE and the divergence (``kd_losses``' hand-derived ``value_and_grad``, temperature included) and the
   diagnostics (top-1 agreement, teacher entropy) from those same chunk logits;
3. combines the logit gradients of the weighted objective, ``g = c_ce · g_ce + c_kd · g_kd`` (``c`` = the
   component's weight divided by the step's counted tokens), and sends ``g`` through the matmuls once:
   ``∂/∂h_s = g W_s`` for the chunk's rows, ``∂/∂W_s += gᵀ h_s`` (only when ``W_s`` trains).

The coefficients must therefore be known before the forward pass (the training core computes every weight, dynamic
ones included, before a step's first micro-batch). The gradients wait, ``(tokens, dim)`` and ``(vocab, dim)``, until
backward scales them by the incoming gradient (1 when the objective is back-propagated as it is).

Numerics follow the unfused path: chunk logits in the models' dtype (a bf16 matmul accumulates in fp32), then fp32
for every softmax, value and gradient; ``W_s``'s gradient is accumulated in fp32 over chunks.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F

import kd_losses

# Tokens per chunk: at Llama 3's vocabulary one fp32 chunk of logits is 0.5 GB.
DEFAULT_CHUNK_SIZE = 1024


def chunk_sums_and_grad(
    z_s: torch.Tensor, z_t: torch.Tensor, labels: torch.Tensor, kd_loss: Any, ce_coef: Any, kd_coef: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk: CE, KD (× T²), agreements and teacher entropy over counted rows, and the objective's logit gradient.

    Each log-softmax is computed once and shared: CE, the diagnostics and (at T = 1) the divergence read the same
    ``log p``; the divergence's ``value_and_grad`` then uses them as scratch space.

    Args:
        z_s (torch.Tensor), z_t (torch.Tensor): fp32 chunk logits ``(rows, vocab)``; overwritten.
        labels (torch.Tensor): ``(rows,)``.
        kd_loss: the ``kd_losses`` divergence.
        ce_coef, kd_coef: the objective's coefficients (floats or 0-d tensors).

    Returns:
        tuple: ``ce``, ``kd``, ``agree``, ``teacher_entropy`` (fp32 scalars) and ``∂objective/∂z_s`` ``(rows, vocab)``.
    """
    keep = labels != kd_loss.ignore_index
    zero = torch.zeros((), dtype=torch.float32, device=z_s.device)
    s_logp = torch.log_softmax(z_s, dim=-1)
    t_logp = torch.log_softmax(z_t, dim=-1)
    agree = ((s_logp.argmax(-1) == t_logp.argmax(-1)) & keep).sum().float()
    # entr(p) = -p log p, with entr(0) = 0 for masked (-inf) vocabulary entries.
    row_entropy = torch.special.entr(t_logp.exp()).sum(-1)
    entropy = torch.where(keep, row_entropy, zero).sum()
    ce, grad = _ce_sum_and_grad(s_logp, labels, keep)
    temperature = kd_loss.temperature
    if temperature != 1.0:
        s_logp = torch.log_softmax(z_s.div_(temperature), dim=-1)
        t_logp = torch.log_softmax(z_t.div_(temperature), dim=-1)
    values, kd_grad = kd_loss.value_and_grad(s_logp, t_logp)
    kd = torch.where(keep, values, zero).sum() * temperature**2
    return ce, kd, agree, entropy, _objective_grad(grad, kd_grad, keep, ce_coef, kd_coef, temperature)


def _ce_sum_and_grad(s_logp: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CE summed over counted rows (value ``-log p[label]``) and its logit gradient ``softmax - onehot`` (a new
    tensor; ignored rows are zeroed later, by :func:`_objective_grad`)."""
    safe = torch.where(keep, labels, torch.zeros_like(labels)).unsqueeze(1)
    picked = s_logp.gather(1, safe).squeeze(1)
    ce = torch.where(keep, -picked, torch.zeros((), dtype=picked.dtype, device=picked.device)).sum()
    grad = s_logp.exp()
    grad.scatter_add_(1, safe, torch.full_like(picked, -1.0).unsqueeze(1))
    return ce, grad


def _objective_grad(
    ce_grad: torch.Tensor, kd_grad: torch.Tensor, keep: torch.Tensor, ce_coef: Any, kd_coef: Any, temperature: float
) -> torch.Tensor:
    """``c_ce · ∂CE/∂z + c_kd · ∂(T²·KD)/∂z`` (in place), ignored rows zeroed."""
    # ∂(T²·L(z/T))/∂z = T·∂L/∂(z/T).
    grad = ce_grad.mul_(ce_coef).add_(kd_grad.mul_(kd_coef * temperature if temperature != 1.0 else kd_coef))
    # Fills, not multiplication: an ignored row may be inf/nan (the unfused losses' own helper).
    return kd_losses._zero_ignored_rows(grad, keep, by_index=grad.device.type == "cpu" and not torch.compiler.is_compiling())


def cached_chunk_sums_and_grad(
    z_s: torch.Tensor, teacher: kd_losses.TeacherTopK, t_entropy: torch.Tensor, labels: torch.Tensor, kd_loss: Any,
    ce_coef: Any, kd_coef: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`chunk_sums_and_grad` against a cached teacher (``kd_losses.TeacherTopK`` rows ``(rows, k)``): the
    divergence's sparse form, agreement with the cached top-1 id, the cached entropy."""
    keep = labels != kd_loss.ignore_index
    zero = torch.zeros((), dtype=torch.float32, device=z_s.device)
    s_logp = torch.log_softmax(z_s, dim=-1)
    agree = ((s_logp.argmax(-1) == teacher.ids[:, 0].long()) & keep).sum().float()
    entropy = torch.where(keep, t_entropy.float(), zero).sum()
    ce, grad = _ce_sum_and_grad(s_logp, labels, keep)
    temperature = kd_loss.temperature
    if temperature != 1.0:
        s_logp = torch.log_softmax(z_s.div_(temperature), dim=-1)
    values, kd_grad = kd_losses._sparse_value_and_grad(
        kd_loss, s_logp, teacher.ids.long(), kd_losses.coarsen_teacher(teacher)
    )
    kd = torch.where(keep, values, zero).sum() * temperature**2
    return ce, kd, agree, entropy, _objective_grad(grad, kd_grad, keep, ce_coef, kd_coef, temperature)


def fused_sums_and_grads(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: Union[torch.Tensor, kd_losses.TeacherTopK],
    teacher_weight: Optional[torch.Tensor],
    labels: torch.Tensor,
    kd_loss: Any,
    *,
    ce_coef: Union[float, torch.Tensor],
    kd_coef: Union[float, torch.Tensor],
    chunk_size: int,
    weight_grad: bool,
    chunk_fn: Optional[Callable] = None,
    teacher_entropy: Optional[torch.Tensor] = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """The fused pass itself, without autograd: token sums and the objective's gradients.

    Args:
        student_hidden (torch.Tensor): ``(rows, dim_s)`` final hidden states.
        student_weight (torch.Tensor): ``(vocab, dim_s)`` output weight (the embedding when tied).
        teacher_hidden (torch.Tensor): ``(rows, dim_t)``; or a cached teacher, ``kd_losses.TeacherTopK`` rows
            ``(rows, k)`` (then ``teacher_weight`` is ``None`` and ``teacher_entropy`` ``(rows,)`` is given).
        teacher_weight (Optional[torch.Tensor]): ``(vocab, dim_t)``.
        labels (torch.Tensor): ``(rows,)`` shifted labels, ``kd_loss.ignore_index`` where nothing counts.
        kd_loss: a ``kd_losses`` divergence (temperature and ``ignore_index`` are read from it).
        ce_coef, kd_coef (float or 0-d tensor): the objective is ``ce_coef * ce_sum + kd_coef * kd_sum``.
        chunk_size (int): rows per chunk.
        weight_grad (bool): also compute ``∂/∂W_s``.
        chunk_fn (Optional[Callable]): :func:`chunk_sums_and_grad` or a compiled version of it (live teacher only).
        teacher_entropy (Optional[torch.Tensor]): the cached teacher's entropy per row.

    Returns:
        tuple: sums ``objective``, ``ce``, ``kd`` (× T²), ``agree``, ``teacher_entropy`` (fp32 scalars), the gradient
        for ``student_hidden`` (its dtype) and for ``student_weight`` (fp32) or ``None``.
    """
    cached = isinstance(teacher_hidden, kd_losses.TeacherTopK)
    chunk_fn = chunk_fn or chunk_sums_and_grad
    device = student_hidden.device
    zero = torch.zeros((), dtype=torch.float32, device=device)
    sums = {key: zero.clone() for key in ("ce", "kd", "agree", "teacher_entropy")}
    grad_hidden = torch.empty_like(student_hidden)
    grad_weight = torch.zeros(student_weight.shape, dtype=torch.float32, device=device) if weight_grad else None
    weight_f32 = student_weight.float() if student_weight.dtype != torch.float32 else student_weight
    for start in range(0, student_hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        h_s = student_hidden[rows].to(student_weight.dtype)
        z_s = F.linear(h_s, student_weight).float()
        if cached:
            part = kd_losses.TeacherTopK(
                teacher_hidden.ids[rows], teacher_hidden.logprobs[rows], teacher_hidden.log_tail[rows],
                teacher_hidden.temperature,
            )
            ce, kd, agree, entropy, grad = cached_chunk_sums_and_grad(
                z_s, part, teacher_entropy[rows], labels[rows], kd_loss, ce_coef, kd_coef
            )
        else:
            z_t = F.linear(teacher_hidden[rows].to(teacher_weight.dtype), teacher_weight).float()
            ce, kd, agree, entropy, grad = chunk_fn(z_s, z_t, labels[rows], kd_loss, ce_coef, kd_coef)
            del z_t
        del z_s
        for key, value in (("ce", ce), ("kd", kd), ("agree", agree), ("teacher_entropy", entropy)):
            sums[key] += value
        grad_hidden[rows] = (grad @ weight_f32).to(student_hidden.dtype)
        if grad_weight is not None:
            grad_weight.addmm_(grad.t(), h_s.float())
    sums["objective"] = sums["ce"] * ce_coef + sums["kd"] * kd_coef
    return sums, grad_hidden, grad_weight


class _FusedOutputLoss(torch.autograd.Function):
    """The objective with its gradients computed in forward; backward scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, labels, kd_loss, ce_coef, kd_coef,
                chunk_size, chunk_fn, teacher_entropy):
        weight_grad = student_weight.requires_grad
        if isinstance(teacher_hidden, torch.Tensor):
            teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
        sums, grad_hidden, grad_weight = fused_sums_and_grads(
            student_hidden.detach(), student_weight.detach(), teacher_hidden, teacher_weight,
            labels, kd_loss, ce_coef=ce_coef, kd_coef=kd_coef, chunk_size=chunk_size, weight_grad=weight_grad,
            chunk_fn=chunk_fn, teacher_entropy=teacher_entropy,
        )
        ctx.weight_dtype = student_weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else torch.empty(0))
        ctx.has_weight_grad = grad_weight is not None
        extras = tuple(sums[key] for key in ("ce", "kd", "agree", "teacher_entropy"))
        ctx.mark_non_differentiable(*extras)
        return (sums["objective"], *extras)

    @staticmethod
    def backward(ctx, grad_objective, *unused):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_objective.float()
        d_hidden = (grad_hidden.float() * scale).to(grad_hidden.dtype)
        d_weight = (grad_weight * scale).to(ctx.weight_dtype) if ctx.has_weight_grad else None
        return d_hidden, d_weight, None, None, None, None, None, None, None, None, None


def fused_output_token_sums(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: Union[torch.Tensor, kd_losses.TeacherTopK],
    teacher_weight: Optional[torch.Tensor],
    labels: torch.Tensor,
    kd_loss: Any,
    *,
    ce_coef: Union[float, torch.Tensor],
    kd_coef: Union[float, torch.Tensor],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    chunk_fn: Optional[Callable] = None,
    teacher_entropy: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """CE, KD and diagnostics of one micro-batch from final hidden states, with the weighted objective's gradient.

    Args:
        student_hidden (torch.Tensor): ``(bsz, seq_len, dim_s)`` or ``(rows, dim_s)``: the student's final, normed
            hidden states (what its output projection would read).
        student_weight (torch.Tensor): ``(vocab, dim_s)``; gradients reach it (and so a tied embedding) when it
            trains.
        teacher_hidden (torch.Tensor): ``(bsz, seq_len, dim_t)`` or ``(rows, dim_t)``; no gradient. Or the cached
            teacher, a ``kd_losses.TeacherTopK`` ``(bsz, seq_len, k)``, with ``teacher_weight=None`` and
            ``teacher_entropy`` ``(bsz, seq_len)`` (the divergence's sparse form; see ``core.teacher_cache``).
        teacher_weight (Optional[torch.Tensor]): ``(vocab, dim_t)``; no gradient.
        labels (torch.Tensor): shifted labels with the hidden states' leading shape.
        kd_loss: any ``kd_losses`` divergence (its ``temperature`` and ``ignore_index`` apply).
        ce_coef, kd_coef (float or 0-d tensor): the differentiable ``objective`` is ``ce_coef * ce + kd_coef * kd``;
            pass each component's weight divided by the step's counted tokens.
        chunk_size (int): tokens per chunk (memory ~ ``chunk_size × vocab`` fp32 a few times over).
        chunk_fn (Optional[Callable]): the per-chunk computation, e.g. ``compiled_chunk_fn("inductor")`` (default:
            :func:`chunk_sums_and_grad`, eager).
        teacher_entropy (Optional[torch.Tensor]): the cached teacher's entropy per token (with a ``TeacherTopK``).

    Returns:
        dict[str, torch.Tensor]: ``objective`` (differentiable), and the detached fp32 sums ``ce``, ``kd`` (× T²),
        ``agree`` and ``teacher_entropy`` over counted tokens — the unfused path's values.
    """
    cached = isinstance(teacher_hidden, kd_losses.TeacherTopK)
    if not cached and student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"student vocab size {student_weight.shape[0]} != teacher vocab size {teacher_weight.shape[0]}: logit "
            "distillation needs a shared vocabulary"
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer")
    rows_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    if cached:
        if teacher_entropy is None:
            raise ValueError("a cached teacher (TeacherTopK) needs teacher_entropy")
        kd_loss._check_sparse(student_hidden.new_empty((*teacher_hidden.shape, student_weight.shape[0]), device="meta"), teacher_hidden)
        rows_t = teacher_hidden.reshape_rows()
        teacher_entropy = teacher_entropy.reshape(-1)
        n_teacher = rows_t.ids.shape[0]
    else:
        rows_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        n_teacher = rows_t.shape[0]
    flat_labels = labels.reshape(-1)
    if not rows_s.shape[0] == n_teacher == flat_labels.shape[0]:
        raise ValueError(
            f"student hidden {tuple(student_hidden.shape)}, teacher hidden {tuple(teacher_hidden.shape)} and labels "
            f"{tuple(labels.shape)} must have the same tokens"
        )
    objective, ce, kd, agree, entropy = _FusedOutputLoss.apply(
        rows_s, student_weight, rows_t, teacher_weight, flat_labels, kd_loss, ce_coef, kd_coef, chunk_size, chunk_fn,
        teacher_entropy,
    )
    return {"objective": objective, "ce": ce, "kd": kd, "agree": agree, "teacher_entropy": entropy}


def compiled_chunk_fn(backend: str = "inductor") -> Callable:
    """:func:`chunk_sums_and_grad` under ``torch.compile``: where a fused step spends its loss time (softmaxes,
    divergence, gradient over ``chunk × vocab``); the matmuls around it are already single kernels."""
    return torch.compile(chunk_sums_and_grad, backend=backend)


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


class _Identity(torch.nn.Module):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """The weight a torchtune decoder's output projection applies: ``output.weight``, or the token embedding's when
    the output is tied to it (``TiedLinear``, Llama 3.2 1B/3B)."""
    output = model.output
    tied = getattr(output, "tied_module", None)
    if tied is not None:
        return tied.weight
    weight = getattr(output, "weight", None)
    if not isinstance(weight, torch.Tensor) or getattr(output, "lora_a", None) is not None:
        raise ValueError(
            f"{type(model).__name__}.output is a {type(output).__name__}: the fused output pass needs a plain linear "
            "(or tied) output projection"
        )
    return weight


@contextmanager
def hidden_states_out(*models: torch.nn.Module) -> Iterator[None]:
    """Within the block, each torchtune decoder returns its final normed hidden states instead of logits.

    The output projection is swapped for an identity (torchtune 0.6.1 has no switch to skip it) and put back on
    exit, so state dicts, exports and later forwards see the model unchanged. The models must not emit chunked
    output (``num_output_chunks == 0``): ``unembed`` then returns ``output(h).float()``, i.e. the hidden states in
    fp32.
    """
    saved = []
    for model in models:
        if getattr(model, "num_output_chunks", 0):
            raise ValueError("hidden_states_out needs num_output_chunks == 0 (set_num_output_chunks(0))")
        if "output" in model._modules:
            saved.append((model, "module", model._modules["output"]))
            model._modules["output"] = _Identity()
        else:
            saved.append((model, "attribute", model.__dict__["output"]))
            model.__dict__["output"] = _identity
    try:
        yield
    finally:
        for model, kind, original in saved:
            if kind == "module":
                model._modules["output"] = original
            else:
                model.__dict__["output"] = original
