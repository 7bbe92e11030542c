"""The output layer, CE and KD in one chunked pass: neither model's full logits nor a full-size logit gradient exist.

Unfused, both models return ``[tokens, vocab]`` logits and autograd keeps a logits-sized gradient; at Llama 3's
128,256-token vocabulary those tensors, not the transformer layers, set the memory of a distillation step. Here the
loss takes both models' final (normed) hidden states and output weights and, for each chunk of tokens:

1. computes the chunk's logits ``z_s = h_s W_sᵀ`` and (without gradient) ``z_t = h_t W_tᵀ`` — or, against a
   teacher cache, takes the chunk's rows of its ``kd_losses.TeacherTopK`` instead of ``z_t``;
2. computes CE and the divergence (``kd_losses``' hand-derived ``value_and_grad``, or its sparse form, temperature
   included) and the diagnostics (``kd_losses.diagnostics``: top-1 agreement, teacher entropy) from the same
   chunk log-probabilities;
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

import dataclasses
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F

import kd_losses

# The fewest rows a chunk derived from the shapes gets: below this the output matmuls read the whole (vocab, dim)
# weight for a handful of rows; on 2 CPU cores 128-row chunks ran 4-15% slower than 256 at vocab 32k-128k.
MIN_AUTO_CHUNK_ROWS = 256


def auto_chunk_size(rows: int, vocab: int, hidden: int) -> int:
    """Rows per chunk derived from the shapes, as Liger-Kernel's fused linear cross-entropy does: about
    ``vocab / hidden`` chunks, so that one chunk's ``(rows, vocab)`` logits are about the size of the ``(rows, hidden)``
    hidden states, rounded up to a power of two and at least :data:`MIN_AUTO_CHUNK_ROWS`.

    A fixed token count would be one chunk (full-vocabulary logits and their temporaries at once) whenever a step has
    fewer tokens than it; this scales with the step instead.

    Args:
        rows (int): the micro-batch's tokens.
        vocab (int): vocabulary size.
        hidden (int): the student's hidden size.

    Returns:
        int: rows per chunk (may exceed ``rows``: then the pass is one chunk).
    """
    chunks = -(-vocab // max(hidden, 1))
    per_chunk = -(-max(rows, 1) // chunks)
    return max(1 << (per_chunk - 1).bit_length(), MIN_AUTO_CHUNK_ROWS)


def chunk_sums_and_grad(
    z_s: torch.Tensor, teacher: Union[torch.Tensor, kd_losses.TeacherTopK], labels: torch.Tensor, kd_loss: Any,
    ce_coef: Any, kd_coef: Any, diagnostics: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk: CE, KD (× T²), agreements and teacher entropy over counted rows, and the objective's logit gradient.

    Each log-softmax is computed once and shared: CE, the diagnostics and (at T = 1) the divergence read the same
    ``log p``; the divergence's ``value_and_grad`` then uses them as scratch space. Against a cached teacher the
    divergence takes its sparse form and the diagnostics the cache's top-1 id and entropy.

    Args:
        z_s (torch.Tensor): fp32 student chunk logits ``(rows, vocab)``; overwritten.
        teacher (Union[torch.Tensor, kd_losses.TeacherTopK]): fp32 teacher chunk logits ``(rows, vocab)``
            (overwritten), or the cached teacher's rows ``(rows, k)`` with their ``entropy``.
        labels (torch.Tensor): ``(rows,)``.
        kd_loss: the ``kd_losses`` divergence.
        ce_coef, kd_coef: the objective's coefficients (floats or 0-d tensors).
        diagnostics (bool): compute ``agree`` and ``teacher_entropy`` (else both are 0: two argmax passes and an
            entropy pass over ``(rows, vocab)`` saved).

    Returns:
        tuple: ``ce``, ``kd``, ``agree``, ``teacher_entropy`` (fp32 scalars) and ``∂objective/∂z_s`` ``(rows, vocab)``.
    """
    keep = labels != kd_loss.ignore_index
    zero = torch.zeros((), dtype=torch.float32, device=z_s.device)
    sparse = isinstance(teacher, kd_losses.TeacherTopK)
    s_logp = torch.log_softmax(z_s, dim=-1)
    t_logp = teacher if sparse else torch.log_softmax(teacher, dim=-1)
    agree, entropy = kd_losses.diagnostics(s_logp, t_logp, keep) if diagnostics else (zero, zero)
    ce, grad = _ce_sum_and_grad(s_logp, labels, keep)
    temperature = kd_loss.temperature
    if temperature != 1.0:
        s_logp = torch.log_softmax(z_s.div_(temperature), dim=-1)
        if not sparse:
            t_logp = torch.log_softmax(teacher.div_(temperature), dim=-1)
    if sparse:
        values, kd_grad = kd_losses.sparse_value_and_grad(
            kd_loss, s_logp, teacher.ids.long(), kd_losses.coarsen_teacher(teacher)
        )
    else:
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
    return kd_losses.zero_ignored_rows(grad, keep, by_index=grad.device.type == "cpu" and not torch.compiler.is_compiling())


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
    diagnostics: bool = True,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """The fused pass itself, without autograd: token sums and the objective's gradients.

    Args:
        student_hidden (torch.Tensor): ``(rows, dim_s)`` final hidden states.
        student_weight (torch.Tensor): ``(vocab, dim_s)`` output weight (the embedding when tied).
        teacher_hidden (Union[torch.Tensor, kd_losses.TeacherTopK]): ``(rows, dim_t)``; or a cached teacher,
            ``kd_losses.TeacherTopK`` rows ``(rows, k)`` with their ``entropy`` (then ``teacher_weight`` is ``None``).
        teacher_weight (Optional[torch.Tensor]): ``(vocab, dim_t)``.
        labels (torch.Tensor): ``(rows,)`` shifted labels, ``kd_loss.ignore_index`` where nothing counts.
        kd_loss: a ``kd_losses`` divergence (temperature and ``ignore_index`` are read from it).
        ce_coef, kd_coef (float or 0-d tensor): the objective is ``ce_coef * ce_sum + kd_coef * kd_sum``.
        chunk_size (int): rows per chunk.
        weight_grad (bool): also compute ``∂/∂W_s``.
        chunk_fn (Optional[Callable]): :func:`chunk_sums_and_grad` or a compiled version of it.
        diagnostics (bool): also the agreement and teacher-entropy sums (else they are 0).

    Returns:
        tuple: sums ``objective``, ``ce``, ``kd`` (× T²), ``agree``, ``teacher_entropy`` (fp32 scalars), the gradient
        for ``student_hidden`` (its dtype) and for ``student_weight`` (fp32) or ``None``.
    """
    chunk_fn = chunk_fn or chunk_sums_and_grad
    sparse = isinstance(teacher_hidden, kd_losses.TeacherTopK)
    device = student_hidden.device
    zero = torch.zeros((), dtype=torch.float32, device=device)
    sums = {key: zero.clone() for key in ("ce", "kd", "agree", "teacher_entropy")}
    grad_hidden = torch.empty_like(student_hidden)
    grad_weight = torch.zeros(student_weight.shape, dtype=torch.float32, device=device) if weight_grad else None
    weight_f32 = student_weight.float() if student_weight.dtype != torch.float32 else student_weight
    teacher_chunks = teacher_hidden.split(chunk_size)
    for start, teacher_rows in zip(range(0, student_hidden.shape[0], chunk_size), teacher_chunks):
        rows = slice(start, start + chunk_size)
        h_s = student_hidden[rows].to(student_weight.dtype)
        z_s = F.linear(h_s, student_weight).float()
        # A cached teacher's rows are its distribution already; live hidden states go through its output layer.
        teacher = teacher_rows if sparse else F.linear(teacher_rows.to(teacher_weight.dtype), teacher_weight).float()
        ce, kd, agree, entropy, grad = chunk_fn(z_s, teacher, labels[rows], kd_loss, ce_coef, kd_coef, diagnostics)
        del z_s, teacher
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
                chunk_size, chunk_fn, diagnostics):
        weight_grad = student_weight.requires_grad
        if isinstance(teacher_hidden, torch.Tensor):
            teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
        sums, grad_hidden, grad_weight = fused_sums_and_grads(
            student_hidden.detach(), student_weight.detach(), teacher_hidden, teacher_weight,
            labels, kd_loss, ce_coef=ce_coef, kd_coef=kd_coef, chunk_size=chunk_size, weight_grad=weight_grad,
            chunk_fn=chunk_fn, diagnostics=diagnostics,
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
    chunk_size: Optional[int] = None,
    chunk_fn: Optional[Callable] = None,
    teacher_entropy: Optional[torch.Tensor] = None,
    diagnostics: bool = True,
) -> dict[str, torch.Tensor]:
    """CE, KD and diagnostics of one micro-batch from final hidden states, with the weighted objective's gradient.

    Args:
        student_hidden (torch.Tensor): ``(bsz, seq_len, dim_s)`` or ``(rows, dim_s)``: the student's final, normed
            hidden states (what its output projection would read).
        student_weight (torch.Tensor): ``(vocab, dim_s)``; gradients reach it (and so a tied embedding) when it
            trains.
        teacher_hidden (Union[torch.Tensor, kd_losses.TeacherTopK]): ``(bsz, seq_len, dim_t)`` or ``(rows, dim_t)``;
            no gradient. Or the cached teacher, a ``kd_losses.TeacherTopK`` ``(bsz, seq_len, k)`` with
            ``teacher_weight=None`` and its ``entropy`` (or ``teacher_entropy``) ``(bsz, seq_len)``: the
            divergence's sparse form (see ``core.teacher_cache``).
        teacher_weight (Optional[torch.Tensor]): ``(vocab, dim_t)``; no gradient.
        labels (torch.Tensor): shifted labels with the hidden states' leading shape.
        kd_loss: any ``kd_losses`` divergence (its ``temperature`` and ``ignore_index`` apply).
        ce_coef, kd_coef (float or 0-d tensor): the differentiable ``objective`` is ``ce_coef * ce + kd_coef * kd``;
            pass each component's weight divided by the step's counted tokens.
        chunk_size (Optional[int]): tokens per chunk (memory ~ ``chunk_size × vocab`` fp32 a few times over);
            ``None``: :func:`auto_chunk_size` of this micro-batch's tokens and the student's output weight.
        chunk_fn (Optional[Callable]): the per-chunk computation, e.g. ``compiled_chunk_fn("inductor")`` (default:
            :func:`chunk_sums_and_grad`, eager).
        teacher_entropy (Optional[torch.Tensor]): the cached teacher's entropy per token, when its ``TeacherTopK``
            does not carry it.
        diagnostics (bool): also ``agree`` and ``teacher_entropy`` (the recipe asks on the steps it logs them).

    Returns:
        dict[str, torch.Tensor]: ``objective`` (differentiable), and the detached fp32 sums ``ce``, ``kd`` (× T²)
        and, with ``diagnostics``, ``agree`` and ``teacher_entropy`` over counted tokens — the unfused path's values.

    Raises:
        ValueError: different vocabularies, token counts or a bad ``chunk_size``; a cached teacher that does not
            fit the loss or carries no entropy.
    """
    cached = isinstance(teacher_hidden, kd_losses.TeacherTopK)
    if not cached and student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"student vocab size {student_weight.shape[0]} != teacher vocab size {teacher_weight.shape[0]}: logit "
            "distillation needs a shared vocabulary"
        )
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer or None (derived from the shapes)")
    rows_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    if chunk_size is None:
        chunk_size = auto_chunk_size(rows_s.shape[0], student_weight.shape[0], student_weight.shape[1])
    if cached:
        if teacher_entropy is not None:
            teacher_hidden = dataclasses.replace(teacher_hidden, entropy=teacher_entropy)
        if teacher_hidden.entropy is None and diagnostics:
            raise ValueError(
                "a cached teacher (TeacherTopK) needs its entropy (TeacherTopK.entropy or teacher_entropy)"
            )
        logits_shape = (*teacher_hidden.shape, student_weight.shape[0])
        kd_loss.check_sparse(student_hidden.new_empty(logits_shape, device="meta"), teacher_hidden)
        rows_t = teacher_hidden.reshape_rows()
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
        diagnostics,
    )
    sums = {"objective": objective, "ce": ce, "kd": kd}
    if diagnostics:
        sums.update(agree=agree, teacher_entropy=entropy)
    return sums


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
