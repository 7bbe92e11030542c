"""A teacher whose vocabulary is the student's plus padding rows (one tokenizer, two padded sizes).

Models of one family often pad their output layer to a multiple of some number, so two models with one tokenizer
can have different vocabulary sizes: Qwen2.5-7B has 152,064 rows and Qwen2.5-0.5B 151,936, yet both use the same
151,665-token tokenizer. The rows past the tokenizer's highest id are never emitted: the two next-token distributions
are distributions over the same tokens, and logit distillation compares them on the shared rows.

:class:`PaddedVocabTeacher` wraps any teacher source (live, on-policy) and hands the output pass the teacher's
distribution restricted to the student's ``shared`` rows and renormalised over them: the logits are sliced (a
softmax over the slice is the renormalisation) and, for the fused pass, the output weight is (its first ``shared``
rows). Because the renormalised distribution over the shared rows depends only on those rows' logits, a padded
teacher trains the student exactly as the same teacher without its padding rows would (``tests/e2e`` checks it).
The probability the teacher put on its padding rows is what the renormalisation drops: on the steps that compute
diagnostics it is summed over the counted tokens (``teacher_padding_mass``, logged as the mean
``kd/teacher_padding_mass``); it should be ~0, and a large value means the rows are not padding.

A teacher cache (``recipes/cache_teacher.py``) stores the top-k of the same sliced distribution
(:func:`shared_weight`), so a cached padded teacher needs no wrapper. Whether the two tokenizers are one is the
pre-flight's job (``config_checks.vocab``): same files, or the same ids on a sample of the training text, and no id
past the shared rows.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import torch

from torchtune_kd.core.teacher_source import (
    HIDDEN, LOGITS, Batch, TeacherHidden, TeacherLogits, TeacherSignal, TeacherSource,
)

#: The token sum of the teacher's probability on its padding rows (over counted tokens, at T = 1).
PADDING_MASS = "teacher_padding_mass"

#: A mean padding mass above this is warned about: the rows carry probability, so they are not padding.
PADDING_MASS_WARNING = 0.01

# Rows of hidden states per output product when the fused form's padding mass is measured: bounds the
# (rows, vocab) fp32 logits it materialises.
_MASS_ROWS = 1024


def _counted_mass(logits: torch.Tensor, shared: int, counted: torch.Tensor) -> torch.Tensor:
    """Σ over counted rows of p(row ≥ shared), from ``(..., vocab)`` logits in fp32 (log space: stable for -inf)."""
    logits = logits.float()
    log_padding = torch.logsumexp(logits[..., shared:], dim=-1) - torch.logsumexp(logits, dim=-1)
    mass = torch.exp(log_padding).nan_to_num(0.0)
    return torch.where(counted, mass, torch.zeros_like(mass)).sum()


def padding_mass_sum(
    logits: Union[torch.Tensor, Sequence[torch.Tensor]], shared: int, labels: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """The teacher's probability on rows ``>= shared``, summed over the counted tokens.

    Args:
        logits (Union[torch.Tensor, Sequence[torch.Tensor]]): ``(bsz, seq_len, vocab_t)`` or torchtune's list of
            ``(bsz, seq_len / n, vocab_t)`` chunks.
        shared (int): the rows both models have (the student's vocabulary).
        labels (torch.Tensor): ``(bsz, seq_len)`` shifted labels.
        ignore_index (int): label value that does not count.

    Returns:
        torch.Tensor: fp32 scalar.
    """
    chunks = [logits] if isinstance(logits, torch.Tensor) else list(logits)
    label_chunks = labels.chunk(len(chunks), dim=1) if len(chunks) > 1 else [labels]
    total = torch.zeros((), dtype=torch.float32, device=labels.device)
    for chunk, chunk_labels in zip(chunks, label_chunks):
        total = total + _counted_mass(chunk, shared, chunk_labels != ignore_index)
    return total


def padding_mass_sum_hidden(
    hidden: torch.Tensor, weight: torch.Tensor, shared: int, labels: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """:func:`padding_mass_sum` from hidden states ``(bsz, seq_len, dim_t)`` and the whole output weight
    ``(vocab_t, dim_t)``, a bounded number of rows at a time (the fused pass never holds full logits)."""
    rows, counted = hidden.reshape(-1, hidden.shape[-1]), (labels != ignore_index).reshape(-1)
    total = torch.zeros((), dtype=torch.float32, device=labels.device)
    for start in range(0, rows.shape[0], _MASS_ROWS):
        part = counted[start:start + _MASS_ROWS]
        if part.any():
            total = total + _counted_mass(rows[start:start + _MASS_ROWS] @ weight.T, shared, part)
    return total


def padding_mass_warning(mean_mass: Optional[float], shared: int) -> Optional[str]:
    """A warning when the teacher's mean probability on its rows past ``shared`` is large (``None`` otherwise)."""
    if mean_mass is None or mean_mass <= PADDING_MASS_WARNING:
        return None
    return (
        f"the padded teacher puts {mean_mass:.3g} of its probability (mean over counted tokens) on its rows past "
        f"{shared}: they may not be padding. KD renormalises over the first {shared} rows; check that teacher_model "
        "and model really share one tokenizer (teacher_tokenizer)"
    )


def shared_weight(weight: torch.Tensor, shared: Optional[int]) -> torch.Tensor:
    """The output weight's first ``shared`` rows (a view; all of it for ``None``)."""
    return weight if shared is None else weight[:shared]


def shared_logits(
    logits: Union[torch.Tensor, Sequence[torch.Tensor]], shared: int
) -> Union[torch.Tensor, list[torch.Tensor]]:
    """The logits' first ``shared`` vocabulary columns (views), chunked as given."""
    if isinstance(logits, torch.Tensor):
        return logits[..., :shared]
    return [chunk[..., :shared] for chunk in logits]


class PaddedVocabTeacher(TeacherSource):
    """A teacher source whose signal is restricted to the student's vocabulary (see the module docstring).

    Args:
        inner (TeacherSource): the source of the teacher's full-vocabulary signal (live or on-policy).
        shared (int): the rows both models have (the student's vocabulary size, below the teacher's).
        ignore_index (int): label value that does not count.
    """

    def __init__(self, inner: TeacherSource, shared: int, ignore_index: int) -> None:
        self.inner = inner
        self.shared = shared
        self.ignore_index = ignore_index

    def on_host(self, batch: Batch) -> Batch:
        return self.inner.on_host(batch)

    def begin_step(self, step: int) -> str:
        return self.inner.begin_step(step)

    def prepare(self, batch: Batch) -> Batch:
        return self.inner.prepare(batch)

    def signal(self, batch: Batch, labels: torch.Tensor, *, form: str, diagnostics: bool = False) -> TeacherSignal:
        """The inner source's signal on the shared rows; with ``diagnostics`` its ``extra_sums`` hold
        :data:`PADDING_MASS`."""
        full = self.inner.signal(batch, labels, form=form, diagnostics=diagnostics)
        sums = dict(getattr(full, "extra_sums", {}))
        if isinstance(full, TeacherLogits):
            if diagnostics:
                sums[PADDING_MASS] = padding_mass_sum(full.logits, self.shared, labels, self.ignore_index)
            return TeacherLogits(shared_logits(full.logits, self.shared), extra_sums=sums)
        if isinstance(full, TeacherHidden):
            if diagnostics:
                sums[PADDING_MASS] = padding_mass_sum_hidden(
                    full.hidden, full.weight, self.shared, labels, self.ignore_index
                )
            return dataclasses.replace(full, weight=shared_weight(full.weight, self.shared), extra_sums=sums)
        raise TypeError(
            f"a padded-vocabulary teacher wraps a source of logits or hidden states, got {type(full).__name__} "
            f"(form {form!r} of {LOGITS!r}/{HIDDEN!r}); a teacher cache stores the shared rows already"
        )
