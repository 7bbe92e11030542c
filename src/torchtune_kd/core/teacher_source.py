"""Where the teacher's signal for a micro-batch comes from: one interface for every source.

A training step needs, per micro-batch, the teacher's next-token distribution at every position the student is
trained on, plus two diagnostics (top-1 agreement, teacher entropy). A :class:`TeacherSource` provides it as a
*teacher signal*, in one of three forms:

=========================  ==========================================================================================
:class:`TeacherLogits`     full logits ``(bsz, seq_len, vocab)`` or torchtune's list of output chunks (unfused pass)
:class:`TeacherHidden`     final hidden states ``(bsz, seq_len, dim_t)`` and the output weight ``(vocab, dim_t)``: the
                           fused pass (``core.fused_output``) computes the logits chunk by chunk and never in full
``kd_losses.TeacherTopK``  the ``k`` most probable ids with their log-probabilities, the tail's mass and the entropy
                           per token: the divergences' sparse form (both passes take it)
:class:`TeacherAligned`    a teacher with another tokenizer: its logits at the aligned positions, ``(bsz, seq_len,
                           vocab_t)``, and which positions are aligned (the unfused pass)
=========================  ==========================================================================================

The output pass (``core.output_pass``) asks for a dense form (``form``: :data:`LOGITS` or :data:`HIDDEN`); a source
that only has a sparse distribution returns its ``TeacherTopK`` whatever the pass asked, and both passes accept it.
So the pair (source, pass) is never written out: each source works with each pass.

Sources:

- :class:`LiveTeacher`: the frozen teacher model, run on the micro-batch's own tokens;
- :class:`CachedTeacher`: a teacher cache (``core.teacher_cache``, built by ``recipes/cache_teacher.py``), looked up
  by the batch's sample ids; the teacher is never built;
- ``core.vocabularies.PaddedVocabTeacher``: wraps a live (or on-policy) source of a teacher whose vocabulary is the
  student's plus padding rows (one tokenizer): its logits, or the fused pass's output weight, restricted to the
  shared rows, and the dropped probability measured on diagnostics steps (:attr:`TeacherLogits.extra_sums`).

A source has three steps, :meth:`TeacherSource.begin_step`, :meth:`TeacherSource.prepare` and
:meth:`TeacherSource.signal`, so that sources beyond these fit without a new path in the recipe. Before an optimiser
step the recipe calls ``begin_step`` (which says what the step trains on: :data:`DATA`, :data:`STUDENT` or
:data:`TEACHER` sequences) and ``prepare`` on each of its micro-batches (:func:`prepare_step`), so that the step's
token counts, which weight every micro-batch, are those of the sequences actually trained on; then each micro-batch's
loss step asks ``signal``:

- *sequences a model generated* (on-policy distillation, ``core.on_policy.GeneratingTeacher``): ``prepare`` samples
  continuations of the batch's prompts from the student (or the teacher) and returns a batch whose ``tokens``,
  ``labels`` (the generated positions counted, the prompt ignored) and ``real_tokens`` are those sequences;
  ``signal`` scores them with a live teacher exactly as :class:`LiveTeacher` does (any of the three forms).
- *a teacher with another tokenizer* (``core.cross_tokenizer.CrossTokenizerTeacher``): ``on_host`` re-tokenises each
  sample's text for the teacher and aligns the positions; ``signal`` runs the teacher on its own tokens and returns
  :class:`TeacherAligned`: its logits over its own vocabulary gathered at the aligned student positions, which the
  unfused pass scores with ``core.cross_tokenizer_loss`` (the fused pass's shared output product cannot apply).

Every signal holds one row per student token (``labels.shape``); rows at ignored labels may hold anything finite or
not (the losses drop them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Protocol, Sequence, Union

import torch
from torch import nn

import kd_losses
from torchtune_kd.core import data, fused_output, loss_step

#: What an optimiser step trains on (:meth:`TeacherSource.begin_step`): the data's own sequences, or continuations
#: of its prompts that the student (on-policy) or the teacher (sequence-level KD) sampled.
DATA, STUDENT, TEACHER = "data", "student", "teacher"

#: The dense forms an output pass asks a source for.
LOGITS = "logits"
HIDDEN = "hidden"
FORMS = (LOGITS, HIDDEN)

Batch = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class TeacherLogits:
    """The teacher's full logits.

    Attributes:
        logits (Union[torch.Tensor, Sequence[torch.Tensor]]): ``(bsz, seq_len, vocab)``, or the list of
            ``(bsz, seq_len / n, vocab)`` chunks a model with ``num_output_chunks = n`` returns.
        extra_sums (Mapping[str, torch.Tensor]): detached fp32 token sums over the counted tokens that the source
            measured on the way (e.g. ``vocabularies.PADDING_MASS``); logged as means next to the losses.
    """

    logits: Union[torch.Tensor, Sequence[torch.Tensor]]
    extra_sums: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class TeacherHidden:
    """The teacher's final (normed) hidden states and the output weight that turns them into logits.

    Attributes:
        hidden (torch.Tensor): ``(bsz, seq_len, dim_t)``, no gradient.
        weight (torch.Tensor): ``(vocab, dim_t)``, whole (gathered when sharded), no gradient.
        extra_sums (Mapping[str, torch.Tensor]): as :attr:`TeacherLogits.extra_sums`.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    extra_sums: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class TeacherAligned:
    """A teacher with another tokenizer (``core.cross_tokenizer``): its logits over its own vocabulary, gathered at
    the student positions that have an aligned teacher position.

    Attributes:
        logits (torch.Tensor): ``(bsz, seq_len, vocab_t)``: at an aligned student position, the teacher's logits at
            the aligned teacher position; anything elsewhere. No gradient.
        aligned (torch.Tensor): ``(bsz, seq_len)`` bool.
    """

    logits: torch.Tensor
    aligned: torch.Tensor


TeacherSignal = Union[TeacherLogits, TeacherHidden, kd_losses.TeacherTopK, TeacherAligned]


#: What :meth:`CachedTeacher.on_host` adds to a batch: the cached rows, which move to the device with it.
CACHED_ROWS = ("teacher_ids", "teacher_logprobs", "teacher_log_tail", "teacher_entropy")


class TeacherSource:
    """The teacher's signal for each micro-batch (see the module docstring for the forms and the sources to come)."""

    def on_host(self, batch: Batch) -> Batch:
        """Work on the collated micro-batch while it is still on the host, before the recipe moves it to the device
        (outside the training step, so that host work there costs the step no device sync). Default: none.

        Args:
            batch (Batch): the collated micro-batch on the host.

        Returns:
            Batch: the batch, with whatever tensors the source adds (they move to the device with it).
        """
        return batch

    def begin_step(self, step: int) -> str:
        """Called before optimiser step ``step`` (from 1) prepares its micro-batches.

        Returns:
            str: what the step trains on: :data:`DATA` (default), :data:`STUDENT` or :data:`TEACHER` sequences.
        """
        return DATA

    def prepare(self, batch: Batch) -> Batch:
        """The micro-batch the student trains on.

        Args:
            batch (Batch): the collated micro-batch: ``tokens``, ``labels``, ``real_tokens`` ``(bsz, seq_len)``, with
                packing ``mask`` and ``input_pos``, with a cache ``sample_id`` ``(bsz,)``.

        Returns:
            Batch: this batch itself for a source that scores the data's own sequences; a source that brings its own
            sequences (on-policy) returns a batch of the same keys holding them.
        """
        return batch

    def signal(self, batch: Batch, labels: torch.Tensor, *, form: str, diagnostics: bool = False) -> TeacherSignal:
        """The teacher's signal for a prepared micro-batch, one row per student token.

        Args:
            batch (Batch): what :meth:`prepare` returned.
            labels (torch.Tensor): ``(bsz, seq_len)`` the batch's shifted labels (``ignore_index`` where nothing
                counts).
            form (str): the dense form the output pass takes, :data:`LOGITS` or :data:`HIDDEN`; a sparse source
                returns a ``kd_losses.TeacherTopK`` instead.
            diagnostics (bool): the step computes diagnostics: a source may measure more (``extra_sums``).

        Returns:
            TeacherSignal: :class:`TeacherLogits`, :class:`TeacherHidden` or ``kd_losses.TeacherTopK`` (with its
            ``entropy``).
        """
        raise NotImplementedError


def prepare_step(source: TeacherSource, step: int, batches: Sequence[Batch]) -> tuple[str, list[Batch]]:
    """Begin optimiser step ``step`` and prepare its micro-batches (before any of them is trained on).

    Returns:
        tuple[str, list[Batch]]: what the step trains on (:meth:`TeacherSource.begin_step`) and the prepared batches.
    """
    kind = source.begin_step(step)
    return kind, [source.prepare(batch) for batch in batches]


def _forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(batch["tokens"], mask=batch.get("mask", None), input_pos=batch.get("input_pos", None))


class LiveTeacher(TeacherSource):
    """The frozen teacher model run on each micro-batch (no gradient).

    Args:
        model (nn.Module): the teacher, a torchtune decoder (with ``num_output_chunks = 0`` for the hidden form).
        output_weight (Callable[[], torch.Tensor]): the teacher's whole output weight ``(vocab, dim_t)``, read at
            each call for the hidden form (data parallelism gathers a sharded one).
    """

    def __init__(self, model: nn.Module, output_weight: Callable[[], torch.Tensor]) -> None:
        self.model = model
        self._output_weight = output_weight

    def signal(self, batch: Batch, labels: torch.Tensor, *, form: str, diagnostics: bool = False) -> TeacherSignal:
        if form == HIDDEN:
            with fused_output.hidden_states_out(self.model), torch.no_grad():
                hidden = _forward(self.model, batch)
            return TeacherHidden(hidden, self._output_weight())
        if form == LOGITS:
            with torch.no_grad():
                return TeacherLogits(_forward(self.model, batch))
        raise ValueError(f"form={form!r}: a teacher source provides one of {FORMS}")


class TopKLookup(Protocol):
    """What :class:`CachedTeacher` reads: ``core.teacher_cache.TeacherCache``'s lookup."""

    ignore_index: int
    temperature: float

    def lookup(
        self, sample_ids: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor, real_tokens: torch.Tensor,
        unshifted_labels: torch.Tensor,
    ) -> tuple[kd_losses.TeacherTopK, torch.Tensor]: ...


class CachedTeacher(TeacherSource):
    """The teacher's top-k distributions and entropies read from a teacher cache by sample id.

    The lookup checks every item against the hash it was cached from (a changed dataset is refused, naming the
    item) and reads the batch's sample ids and counts: host work on host data, done in :meth:`on_host` before the
    batch moves to the device, so that the training step itself makes no host read (``tests/e2e`` checks it).

    Args:
        cache (TopKLookup): an open ``core.teacher_cache.TeacherCache``.
    """

    def __init__(self, cache: TopKLookup) -> None:
        self.cache = cache

    def on_host(self, batch: Batch) -> Batch:
        """The batch with its cached rows (:data:`CACHED_ROWS`), looked up on the host."""
        labels = loss_step.shift_labels(batch["labels"], self.cache.ignore_index)
        teacher, entropy = self._lookup(batch, labels)
        return {**batch, "teacher_ids": teacher.ids, "teacher_logprobs": teacher.logprobs,
                "teacher_log_tail": teacher.log_tail, "teacher_entropy": entropy}

    def signal(
        self, batch: Batch, labels: torch.Tensor, *, form: str, diagnostics: bool = False
    ) -> kd_losses.TeacherTopK:
        """The cached ``kd_losses.TeacherTopK`` ``(bsz, seq_len, k)`` with its ``entropy``, whatever ``form``: the
        rows :meth:`on_host` added, or (for a batch that did not pass through it) a lookup now."""
        if all(key in batch for key in CACHED_ROWS):
            ids, logprobs, log_tail, entropy = (batch[key] for key in CACHED_ROWS)
            return kd_losses.TeacherTopK(ids, logprobs, log_tail, self.cache.temperature, entropy)
        teacher, entropy = self._lookup(batch, labels)
        return dataclasses.replace(teacher, entropy=entropy)

    def _lookup(self, batch: Batch, labels: torch.Tensor) -> tuple[kd_losses.TeacherTopK, torch.Tensor]:
        return self.cache.lookup(
            batch[data.SAMPLE_ID_KEY], labels, batch["tokens"], batch[loss_step.REAL_TOKENS_KEY], batch["labels"]
        )
