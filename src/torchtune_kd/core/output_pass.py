"""How a micro-batch's CE, KD and diagnostics are computed from the student's output and the teacher's signal.

Whether the output layer is fused with the losses is a property of the pass, not a second copy of the loss step:

- :class:`UnfusedPass`: the student returns logits (or torchtune's chunks of them); CE is ``loss_step``'s token sum
  and the KD loss's ``token_sum`` runs on them with autograd. A ``kd_losses`` divergence returns the diagnostics
  from the log-probabilities it computes anyway (``token_sum_and_diagnostics``); any other KD loss gets them from
  ``loss_step.kd_health_sums``.
- :class:`FusedPass`: the student returns its final hidden states; ``core.fused_output`` computes logits, CE, KD, the
  diagnostics and the weighted objective's gradient chunk by chunk, so the step's coefficients are needed before the
  forward (``loss_step.accumulate_gradients`` passes them when ``fused`` is set).

Both take every teacher signal ``core.teacher_source`` defines in the form they asked for (:attr:`teacher_form`)
or in the sparse form, ``kd_losses.TeacherTopK``, and return the same sums under the same names: ``ce``, ``kd``
(× T²), ``agree`` and ``teacher_entropy`` over counted tokens, plus the differentiable ``objective`` when fused.
:func:`micro_batch_sums` is the loss step of one micro-batch for any source and either pass.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Dict, Optional, Union

import torch
from torch import nn

import kd_losses
from torchtune_kd.core import fused_output, loss_step
from torchtune_kd.core.teacher_source import (
    HIDDEN, LOGITS, Batch, TeacherAligned, TeacherHidden, TeacherLogits, TeacherSignal, TeacherSource,
)

Sums = Dict[str, torch.Tensor]


def _wrong_signal(teacher: object, wanted: str) -> TypeError:
    return TypeError(f"this output pass takes {wanted} or kd_losses.TeacherTopK, got {type(teacher).__name__}")


class UnfusedPass:
    """CE and KD on the logits the student returns; gradients through autograd.

    Args:
        losses (loss_step.StepLosses): the step's CE and KD token sums (compiled when asked) and the KD loss.
    """

    fused = False
    teacher_form = LOGITS

    def __init__(self, losses: loss_step.StepLosses, cross_tokenizer: Optional[nn.Module] = None) -> None:
        self._losses = losses
        self._cross_tokenizer = cross_tokenizer

    def student_output(self, model: nn.Module) -> ContextManager[None]:
        """The context the student's forward runs in: the model as it is (logits)."""
        return contextlib.nullcontext()

    def token_sums(
        self, student: loss_step.Logits, teacher: TeacherSignal, labels: torch.Tensor,
        coefficients: Optional[Dict[str, torch.Tensor]] = None, diagnostics: bool = True,
    ) -> Sums:
        """Token sums of one micro-batch.

        Args:
            student (loss_step.Logits): ``(bsz, seq_len, vocab)`` logits or their list of chunks.
            teacher (TeacherSignal): :class:`TeacherLogits` of the same shapes, or a ``kd_losses.TeacherTopK``
                ``(bsz, seq_len, k)`` with its ``entropy``.
            labels (torch.Tensor): shifted labels ``(bsz, seq_len)``.
            coefficients (Optional[Dict[str, torch.Tensor]]): unused: the objective is weighted after this pass.
            diagnostics (bool): also ``agree`` and ``teacher_entropy``.

        Returns:
            Sums: differentiable fp32 sums ``ce`` and ``kd`` (× T²); with ``diagnostics`` the detached ``agree`` and
            ``teacher_entropy``.
        """
        if isinstance(teacher, TeacherAligned):
            return self._aligned_sums(student, teacher, labels, diagnostics)
        if isinstance(teacher, TeacherLogits):
            target = teacher.logits
        elif isinstance(teacher, kd_losses.TeacherTopK):
            target = teacher
        else:
            raise _wrong_signal(teacher, "TeacherLogits")
        losses = self._losses
        sums = {"ce": losses.ce_token_sum(student, labels)}
        if not diagnostics:
            sums["kd"], _ = losses.kd_token_sum(student, target, labels)
        elif kd_losses.is_divergence(losses.kd_loss):
            # Its blocks are the compiled ones when compile is on (compile_blocks).
            sums["kd"], sums["agree"], sums["teacher_entropy"] = losses.kd_loss.token_sum_and_diagnostics(
                student, target, labels
            )
        else:
            sums["kd"], _ = losses.kd_token_sum(student, target, labels)
            sums["agree"], sums["teacher_entropy"] = loss_step.kd_health_sums(
                student, target, labels, losses.ignore_index
            )
        return sums


    def _aligned_sums(self, student: loss_step.Logits, teacher: TeacherAligned, labels: torch.Tensor,
                      diagnostics: bool) -> Sums:
        """CE on every counted student token; KD (``core.cross_tokenizer_loss``) on the aligned ones, whose count is
        ``aligned`` (logged as the aligned share of the counted tokens)."""
        if self._cross_tokenizer is None:
            raise TypeError("a TeacherAligned signal needs the pass's cross_tokenizer loss (UnfusedPass(cross_tokenizer=...))")
        sums = {"ce": self._losses.ce_token_sum(student, labels)}
        sums.update(self._cross_tokenizer.token_sums(student, teacher.logits, teacher.aligned, labels,
                                                     diagnostics=diagnostics))
        return sums


class FusedPass:
    """The output layer, CE and KD in one chunked pass (``core.fused_output``): no full logits exist.

    Args:
        kd_loss (kd_losses.Divergence): the divergence (its hand-derived gradients are what the pass needs).
        student_weight (Callable[[], torch.Tensor]): the student's whole output weight ``(vocab, dim_s)`` (the
            embedding when tied), read at each call (data parallelism gathers a sharded one).
        chunk_size (Optional[int]): tokens per chunk; ``None``: derived from each micro-batch's shapes
            (``fused_output.auto_chunk_size``).
        chunk_fn (Optional[Callable]): the per-chunk computation, e.g. ``fused_output.compiled_chunk_fn()``
            (default: the eager one).

    Raises:
        ValueError: ``kd_loss`` is not a ``kd_losses`` divergence.
    """

    fused = True
    teacher_form = HIDDEN

    def __init__(
        self, kd_loss: nn.Module, student_weight: Callable[[], torch.Tensor], chunk_size: Optional[int] = None,
        chunk_fn: Optional[Callable] = None,
    ) -> None:
        if not kd_losses.is_divergence(kd_loss):
            raise ValueError(
                f"the fused output pass needs a kd_losses divergence, got {type(kd_loss).__name__}: use e.g. "
                "kd_losses.ForwardKLLoss, or fused_output.enabled=false"
            )
        self.kd_loss = kd_loss
        self.chunk_size = chunk_size
        self.chunk_fn = chunk_fn
        self._student_weight = student_weight

    def student_output(self, model: nn.Module) -> ContextManager[None]:
        """The context the student's forward runs in: it returns its final hidden states instead of logits."""
        return fused_output.hidden_states_out(model)

    def token_sums(
        self, student: torch.Tensor, teacher: TeacherSignal, labels: torch.Tensor,
        coefficients: Optional[Dict[str, torch.Tensor]] = None, diagnostics: bool = True,
    ) -> Sums:
        """Token sums of one micro-batch and the differentiable objective ``c_ce · ce + c_kd · kd``.

        Args:
            student (torch.Tensor): ``(bsz, seq_len, dim_s)`` the student's final hidden states.
            teacher (TeacherSignal): :class:`TeacherHidden`, or a ``kd_losses.TeacherTopK`` ``(bsz, seq_len, k)``
                with its ``entropy``.
            labels (torch.Tensor): shifted labels ``(bsz, seq_len)``.
            coefficients (Optional[Dict[str, torch.Tensor]]): ``ce`` and ``kd``: each component's weight divided by
                the step's counted tokens.
            diagnostics (bool): also ``agree`` and ``teacher_entropy``.

        Returns:
            Sums: ``objective`` (differentiable) and the detached fp32 sums ``ce``, ``kd`` (× T²) and, with
            ``diagnostics``, ``agree`` and ``teacher_entropy``.

        Raises:
            ValueError: no coefficients.
        """
        if coefficients is None:
            raise ValueError(
                "the fused output pass needs the step's coefficients (accumulate_gradients' fused_components)"
            )
        if isinstance(teacher, TeacherHidden):
            teacher_rows, teacher_weight = teacher.hidden, teacher.weight
        elif isinstance(teacher, kd_losses.TeacherTopK):
            teacher_rows, teacher_weight = teacher, None
        else:
            raise _wrong_signal(teacher, "TeacherHidden")
        return fused_output.fused_output_token_sums(
            student, self._student_weight(), teacher_rows, teacher_weight, labels, self.kd_loss,
            ce_coef=coefficients["ce"], kd_coef=coefficients["kd"], chunk_size=self.chunk_size, chunk_fn=self.chunk_fn,
            diagnostics=diagnostics,
        )


OutputPass = Union[UnfusedPass, FusedPass]


def micro_batch_sums(
    student: nn.Module,
    teacher: TeacherSource,
    output_pass: OutputPass,
    batch: Batch,
    ignore_index: int,
    coefficients: Optional[Dict[str, torch.Tensor]] = None,
    *,
    activations: Optional[ContextManager] = None,
    diagnostics: bool = True,
) -> Sums:
    """The loss step of one micro-batch, whatever the teacher source and the pass: the recipe's one path.

    The student runs on the (prepared: ``teacher_source.prepare_step``) batch (in the pass's output mode, inside ``activations``), the
    source gives its signal in the form the pass takes, and the pass returns the token sums.

    Args:
        student (nn.Module): the student, a torchtune decoder.
        teacher (TeacherSource): where the teacher's signal comes from.
        output_pass (OutputPass): :class:`UnfusedPass` or :class:`FusedPass`.
        batch (Batch): the micro-batch as the source prepared it (``tokens``, ``labels``, ``real_tokens``, ...).
        ignore_index (int): label value that does not count.
        coefficients (Optional[Dict[str, torch.Tensor]]): the fused pass's ``ce`` and ``kd`` coefficients.
        activations (Optional[ContextManager]): the context of the student's forward (activation offloading).
        diagnostics (bool): also the top-1 agreement and teacher-entropy sums (the recipe asks on the steps it logs
            them: two argmax passes and an entropy pass over ``(tokens, vocab)`` saved on the others).

    Returns:
        Sums: the pass's token sums.
    """
    labels = loss_step.shift_labels(batch["labels"], ignore_index)
    with output_pass.student_output(student), (activations or contextlib.nullcontext()):
        output = student(batch["tokens"], mask=batch.get("mask", None), input_pos=batch.get("input_pos", None))
    signal = teacher.signal(batch, labels, form=output_pass.teacher_form, diagnostics=diagnostics)
    sums = output_pass.token_sums(output, signal, labels, coefficients, diagnostics=diagnostics)
    sums.update(getattr(signal, "extra_sums", {}))  # what the source measured (e.g. a padded teacher's dropped mass)
    return sums
