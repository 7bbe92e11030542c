"""On-policy distillation: the student trains on continuations it sampled itself, scored token by token by the teacher.

GKD (Agarwal et al., ICLR 2024) in the recipe's terms. Each optimiser step is one of three kinds, drawn from the
run's seed and the step number (so every rank and a resumed run draw the same):

=============  ==============================================================================================
:data:`DATA`     the dataset's own sequences (today's off-policy recipe)
:data:`STUDENT`  a share ``fraction`` (GKD's λ) of the steps: each sequence is its prompt followed by a
                 continuation the *student* sampled; the teacher scores every generated token
:data:`TEACHER`  with ``teacher_generated`` (GKD's ``seq_kd``), the steps that are not :data:`STUDENT`: the
                 continuation is the *teacher's* sample (sequence-level KD; off-policy for the student)
=============  ==============================================================================================

The KD loss (any ``kd_losses`` divergence; :class:`kd_losses.GeneralizedJSDLoss` is GKD's) is taken on the generated
tokens only: the prompt, the padding and everything after the first stop token get ignored labels. The stop token
itself counts (ending is part of what the student learns). CE: on a :data:`STUDENT` step the labels are the student's
own samples, so CE would only reinforce what it already does; it is left out of the objective there (its value is
logged as ``on_policy/student_nll``), and the step's objective is the weighted KD (and IR) mean over its generated
tokens. :data:`DATA` and :data:`TEACHER` steps keep CE (on a teacher sample it *is* sequence-level KD). Every mean is
over the step's counted tokens, all micro-batches together, as on any step.

The prompt of a sequence is the dataset's prompt part (the tokens before its first counted label, as instruct
datasets such as alpaca mark them with ``ignore_index``), or its first ``prompt_tokens`` tokens for plain text. A
prompt longer than ``max_seq_len - max_new_tokens`` keeps its last tokens (the model conditions on the most recent
context); an empty one (every token a label) keeps its first token.

Sampling (:func:`sample_continuations`): batched over the micro-batch, prompts of different lengths left-padded with
torchtune's padding-mask utilities, KV caches (``torchtune.modules.local_kv_cache``, freed on exit so they do not
add to the training step's peak memory), no gradient, dropout off (the model's training mode is restored), stopping
per sequence at a stop token. The random numbers come from a generator seeded from (seed, step, rank, micro-batch):
the same seed gives the same samples and a run resumed mid-epoch samples what the uninterrupted run would have, with
the generator's state a function of the step counter the training state already holds.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules import local_kv_cache

from torchtune_kd.core import loss_step
from torchtune_kd.core.teacher_source import DATA, STUDENT, TEACHER, Batch, LiveTeacher, TeacherSignal, TeacherSource

#: The name under which a :data:`STUDENT` step's CE on its own samples is summed and logged (not trained on).
STUDENT_NLL = "on_policy/student_nll"

#: The keys of the ``on_policy`` config section and their defaults.
DEFAULTS: Dict[str, Any] = {
    "fraction": 0.0,
    "max_new_tokens": 64,
    "temperature": 1.0,
    "top_k": None,
    "top_p": 1.0,
    "prompt_tokens": None,
    "teacher_generated": False,
}


@dataclass(frozen=True)
class OnPolicySettings:
    """The ``on_policy`` config section (see :data:`DEFAULTS`; :func:`section_problems` validates it).

    Attributes:
        fraction (float): the share λ ∈ [0, 1] of optimiser steps trained on the student's own samples.
        max_new_tokens (int): the most tokens sampled per sequence.
        temperature (float): the sampling temperature (> 0).
        top_k (Optional[int]): sample among the ``top_k`` most probable tokens only (``None``: all).
        top_p (float): nucleus sampling: the smallest set of tokens whose probability reaches ``top_p`` (1: all).
        prompt_tokens (Optional[int]): the prompt is each sequence's first ``prompt_tokens`` tokens (plain text);
            ``None``: the dataset's prompt part (the tokens before the first counted label).
        teacher_generated (bool): the steps that are not the student's sample the teacher's continuation instead of
            using the dataset's (GKD's ``seq_kd``).
    """

    fraction: float = 0.0
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: float = 1.0
    prompt_tokens: Optional[int] = None
    teacher_generated: bool = False

    @property
    def active(self) -> bool:
        """Whether any step generates (otherwise the recipe is today's, step for step)."""
        return self.fraction > 0 or self.teacher_generated


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def section_problems(section: Mapping[str, Any]) -> List[str]:
    """Every problem of an ``on_policy`` section on its own (unknown keys, types and ranges), each naming the key, the
    value and the fix."""
    problems = []
    for key in section:
        if key not in DEFAULTS:
            problems.append(f"on_policy.{key} is not a key of on_policy: the keys are {sorted(DEFAULTS)}")
    value = section.get("fraction", DEFAULTS["fraction"])
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        problems.append(f"on_policy.fraction={value!r} must be a number in [0, 1] (the share of steps trained on the "
                        "student's own samples; 0 = off)")
    value = section.get("max_new_tokens", DEFAULTS["max_new_tokens"])
    if not _is_int(value) or value < 1:
        problems.append(f"on_policy.max_new_tokens={value!r} must be an integer >= 1, e.g. 128")
    value = section.get("temperature", DEFAULTS["temperature"])
    if not _is_number(value) or value <= 0:
        problems.append(f"on_policy.temperature={value!r} must be a finite number > 0 (for greedy sampling set "
                        "on_policy.top_k=1)")
    value = section.get("top_k", DEFAULTS["top_k"])
    if value is not None and (not _is_int(value) or value < 1):
        problems.append(f"on_policy.top_k={value!r} must be null (all tokens) or an integer >= 1")
    value = section.get("top_p", DEFAULTS["top_p"])
    if not _is_number(value) or not 0.0 < value <= 1.0:
        problems.append(f"on_policy.top_p={value!r} must be a number in (0, 1] (1 = no nucleus truncation)")
    value = section.get("prompt_tokens", DEFAULTS["prompt_tokens"])
    if value is not None and (not _is_int(value) or value < 1):
        problems.append(f"on_policy.prompt_tokens={value!r} must be null (the dataset's prompt part) or an integer "
                        ">= 1 (a fixed prefix length for plain text)")
    value = section.get("teacher_generated", DEFAULTS["teacher_generated"])
    if not isinstance(value, bool):
        problems.append(f"on_policy.teacher_generated={value!r} must be true or false")
    return problems


def settings(section: Optional[Mapping[str, Any]]) -> OnPolicySettings:
    """The settings of a validated ``on_policy`` section (``None``: off)."""
    if section is None:
        return OnPolicySettings()
    values = {key: section.get(key, default) for key, default in DEFAULTS.items()}
    values["fraction"] = float(values["fraction"])
    values["temperature"] = float(values["temperature"])
    values["top_p"] = float(values["top_p"])
    return OnPolicySettings(**values)


# ----------------------------------------------------------------------------------------------- the step's kind


def _unit_draw(*keys: Any) -> float:
    """A uniform number in [0, 1) that depends only on ``keys`` (the same in every process and every run)."""
    return random.Random("/".join(str(k) for k in ("kd-on-policy", *keys))).random()


def _seed_of(*keys: Any) -> int:
    digest = hashlib.sha256("/".join(str(k) for k in ("kd-sampling", *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def step_kind(settings: OnPolicySettings, seed: int, step: int) -> str:
    """What optimiser step ``step`` (from 1) trains on: :data:`STUDENT` with probability ``fraction``, else
    :data:`TEACHER` with ``teacher_generated``, else :data:`DATA`."""
    if settings.fraction > 0 and _unit_draw(seed, step) < settings.fraction:
        return STUDENT
    return TEACHER if settings.teacher_generated else DATA


def sampling_generator(device: torch.device, *, seed: int, step: int, rank: int, micro_batch: int) -> torch.Generator:
    """The generator a micro-batch's sampling draws from: a function of its place in the run only."""
    generator = torch.Generator(device=device)
    generator.manual_seed(_seed_of(seed, step, rank, micro_batch))
    return generator


# ----------------------------------------------------------------------------------------------------- prompts


def prompt_lengths(
    labels: torch.Tensor, real_tokens: torch.Tensor, ignore_index: int, prompt_tokens: Optional[int], max_prompt: int
) -> tuple[List[int], List[int]]:
    """Where each sequence's prompt starts and ends.

    Args:
        labels (torch.Tensor): unshifted labels ``(bsz, seq_len)``.
        real_tokens (torch.Tensor): ``(bsz, seq_len)`` bool, True on real (non-padding) tokens.
        ignore_index (int): label value that does not count.
        prompt_tokens (Optional[int]): a fixed prefix length, or ``None`` for the tokens before the first counted
            label.
        max_prompt (int): the longest prompt kept (its last tokens).

    Returns:
        tuple[List[int], List[int]]: per sequence the prompt's start and end (``tokens[i, start:end]``), ``end >
        start``.
    """
    real = real_tokens.sum(-1)
    if prompt_tokens is None:
        counted = (labels != ignore_index) & real_tokens
        positions = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
        first = torch.where(counted, positions, labels.shape[1]).min(-1).values
        ends = torch.minimum(first, real)
    else:
        ends = real.clamp(max=prompt_tokens)
    ends = ends.clamp(min=1)
    starts = (ends - max_prompt).clamp(min=0)
    return starts.tolist(), ends.tolist()


# ---------------------------------------------------------------------------------------------------- sampling


def filter_logits(logits: torch.Tensor, *, temperature: float, top_k: Optional[int], top_p: float) -> torch.Tensor:
    """Next-token logits ``(bsz, vocab)`` as sampled from: fp32, divided by the temperature, ``-inf`` outside the
    top-k and outside the nucleus (the most probable tokens whose mass reaches ``top_p``; the first always kept)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One token per row from filtered logits ``(bsz, vocab)``, given ``noise`` ``(bsz, vocab)`` of Exp(1) draws:
    ``argmax(p / noise)`` is a sample of ``p`` (the exponential race; no host sync, unlike ``torch.multinomial``)."""
    return (torch.softmax(logits, dim=-1) / noise).argmax(-1)


def _last_logits(output: Any) -> torch.Tensor:
    """The last position's logits ``(bsz, vocab)`` from a decoder's output (logits, or torchtune's chunks)."""
    if isinstance(output, (list, tuple)):
        output = output[-1]
    return output[:, -1]


@dataclass
class Samples:
    """What :func:`sample_continuations` returns.

    Attributes:
        tokens (torch.Tensor): ``(bsz, max_new_tokens)`` the sampled ids, ``pad_id`` after each sequence's end.
        lengths (torch.Tensor): ``(bsz,)`` tokens sampled per sequence (up to and including its stop token).
        stopped (torch.Tensor): ``(bsz,)`` bool, whether the sequence ended with a stop token.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    stopped: torch.Tensor


def _all_done_here(done: torch.Tensor) -> bool:
    return bool(done.all())


@torch.no_grad()
def sample_continuations(
    model: nn.Module,
    prompts: Sequence[torch.Tensor],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: Optional[int],
    top_p: float,
    stop_tokens: Sequence[int],
    pad_id: int,
    generator: torch.Generator,
    dtype: torch.dtype,
    all_done: Callable[[torch.Tensor], bool] = _all_done_here,
) -> Samples:
    """Sample a continuation of each prompt from ``model``, batched, with KV caches.

    Step ``t`` draws one ``(bsz, vocab)`` tensor of Exp(1) noise from ``generator`` (rows that have stopped draw too,
    so a sequence's samples do not depend on when the others stop).

    Args:
        model (nn.Module): a torchtune decoder without KV caches set up (the student, or the teacher).
        prompts (Sequence[torch.Tensor]): 1-D prompts of any lengths ``>= 1``, on the model's device.
        max_new_tokens (int): the most tokens sampled per sequence.
        temperature (float): > 0.
        top_k (Optional[int]): sample among the top-k only (``None``: all).
        top_p (float): nucleus mass (1: all).
        stop_tokens (Sequence[int]): ids that end a sequence (kept as its last token).
        pad_id (int): what fills a sequence after its end.
        generator (torch.Generator): the noise's source, on the model's device.
        dtype (torch.dtype): the KV caches' dtype (the model's).
        all_done (Callable[[torch.Tensor], bool]): whether every sequence has stopped, given this process's
            ``(bsz,)`` flags; under data parallelism every rank must make the same number of forwards, so the
            recipe's version asks every rank.

    Returns:
        Samples: the sampled tokens, lengths and whether each sequence stopped.
    """
    device = prompts[0].device
    bsz, width = len(prompts), max(len(p) for p in prompts)
    total = width + max_new_tokens
    prompt = torch.full((bsz, width), pad_id, dtype=torch.long, device=device)
    real = torch.zeros((bsz, total), dtype=torch.bool, device=device)
    for row, tokens in enumerate(prompts):  # left-padded: every prompt ends where sampling starts
        prompt[row, width - len(tokens):] = tokens
        real[row, width - len(tokens):] = True
    real[:, width:] = True
    masks = get_causal_mask_from_padding_mask(real, target_seq_len=total)
    positions = get_position_ids_from_padding_mask(real)
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    sampled = torch.full((bsz, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    lengths = torch.zeros(bsz, dtype=torch.long, device=device)
    stopped = torch.zeros(bsz, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()  # dropout off while sampling
    try:
        with local_kv_cache(model, batch_size=bsz, device=device, dtype=dtype, decoder_max_seq_len=total):
            logits = _last_logits(model(prompt, mask=masks[:, :width], input_pos=positions[:, :width]))
            for step in range(max_new_tokens):
                filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
                noise = torch.empty(filtered.shape, device=device).exponential_(1, generator=generator)
                token = sample_next(filtered, noise)
                live = ~done
                sampled[:, step] = torch.where(live, token, pad_id)
                lengths += live.long()
                is_stop = torch.isin(token, stop) & live
                stopped |= is_stop
                done |= is_stop
                if step + 1 == max_new_tokens or all_done(done):
                    break
                at = width + step
                logits = _last_logits(
                    model(token[:, None], mask=masks[:, at:at + 1], input_pos=positions[:, at:at + 1])
                )
    finally:
        model.train(was_training)
    return Samples(sampled, lengths, stopped)


def generated_batch(
    prompts: Sequence[torch.Tensor], samples: Samples, *, pad_id: int, ignore_index: int
) -> Batch:
    """The micro-batch the step trains on: each prompt followed by its sample, right-padded like an SFT batch.

    Args:
        prompts (Sequence[torch.Tensor]): the 1-D prompts.
        samples (Samples): their continuations.
        pad_id (int): padding token.
        ignore_index (int): label of what does not count.

    Returns:
        Batch: ``tokens``, ``labels`` (the sampled tokens; the prompt, padding and nothing after a stop token
        counted) and ``real_tokens`` ``(bsz, seq_len)``.
    """
    lengths = samples.lengths.tolist()
    rows = [torch.cat((p, samples.tokens[i, :lengths[i]])) for i, p in enumerate(prompts)]
    width = max(len(r) for r in rows)
    device = samples.tokens.device
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    labels = torch.full((len(rows), width), ignore_index, dtype=torch.long, device=device)
    real = torch.zeros((len(rows), width), dtype=torch.bool, device=device)
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        tokens[i, :len(row)] = row
        labels[i, len(prompt):len(row)] = row[len(prompt):]
        real[i, :len(row)] = True
    return {"tokens": tokens, "labels": labels, loss_step.REAL_TOKENS_KEY: real}


# ------------------------------------------------------------------------------------------------------- source


@dataclass
class StepStats:
    """What an optimiser step's generation did (this process's share)."""

    sequences: int = 0
    generated_tokens: int = 0
    stopped: int = 0
    truncated_prompts: int = 0
    generate_seconds: float = 0.0
    score_seconds: float = 0.0


class GeneratingTeacher(TeacherSource):
    """A live teacher that scores sequences the student (or, with ``teacher_generated``, the teacher) generated.

    :meth:`begin_step` draws the step's kind; :meth:`prepare` returns the data's own micro-batch on a :data:`DATA`
    step and otherwise a batch of the prompts followed by the sampled continuations (:func:`generated_batch`);
    :meth:`signal` scores whatever :meth:`prepare` returned with the live teacher.

    Args:
        teacher (LiveTeacher): the frozen teacher.
        student (nn.Module): the student (sampled from on :data:`STUDENT` steps).
        settings (OnPolicySettings): the ``on_policy`` section.
        seed (int): the run's seed.
        rank (int): this process's data-parallel rank (its samples differ from the other ranks').
        ignore_index (int): label value that does not count.
        pad_id (int): the tokenizer's padding id.
        stop_tokens (Sequence[int]): ids that end a sample.
        max_seq_len (Optional[int]): the longest training sequence (prompts keep their last
            ``max_seq_len - max_new_tokens`` tokens); ``None``: no limit.
        dtype (torch.dtype): the models' dtype (the KV caches').
        all_done (Callable[[torch.Tensor], bool]): see :func:`sample_continuations`.
        synchronize (Callable[[], None]): waits for the device (for the timings; a no-op on CPU).
    """

    def __init__(
        self,
        teacher: LiveTeacher,
        student: nn.Module,
        settings: OnPolicySettings,
        *,
        seed: int,
        rank: int,
        ignore_index: int,
        pad_id: int,
        stop_tokens: Sequence[int],
        max_seq_len: Optional[int],
        dtype: torch.dtype,
        all_done: Callable[[torch.Tensor], bool] = _all_done_here,
        synchronize: Callable[[], None] = lambda: None,
    ) -> None:
        self.teacher = teacher
        self.student = student
        self.settings = settings
        self.seed, self.rank = seed, rank
        self.ignore_index, self.pad_id, self.stop_tokens = ignore_index, pad_id, list(stop_tokens)
        self.max_prompt = (max_seq_len - settings.max_new_tokens) if max_seq_len else 1 << 62
        self.dtype = dtype
        self.all_done = all_done
        self.synchronize = synchronize
        self.kind = DATA
        self.step = 0
        self.stats = StepStats()
        self._micro_batch = 0

    def begin_step(self, step: int) -> str:
        self.kind = step_kind(self.settings, self.seed, step)
        self.step, self._micro_batch, self.stats = step, 0, StepStats()
        return self.kind

    def prepare(self, batch: Batch) -> Batch:
        """The micro-batch to train on: the data's own (:data:`DATA`) or prompts + samples (every key but
        ``tokens``, ``labels`` and ``real_tokens`` dropped: they described the data's sequences)."""
        if self.kind == DATA:
            return batch
        if "mask" in batch or "input_pos" in batch:
            raise ValueError("on-policy distillation needs unpacked data (dataset.packed=False)")
        started = time.perf_counter()
        starts, ends = prompt_lengths(
            batch["labels"], batch[loss_step.REAL_TOKENS_KEY], self.ignore_index, self.settings.prompt_tokens,
            self.max_prompt,
        )
        prompts = [batch["tokens"][i, s:e] for i, (s, e) in enumerate(zip(starts, ends))]
        generator = sampling_generator(
            batch["tokens"].device, seed=self.seed, step=self.step, rank=self.rank, micro_batch=self._micro_batch
        )
        self._micro_batch += 1
        model = self.student if self.kind == STUDENT else self.teacher.model
        s = self.settings
        samples = sample_continuations(
            model, prompts, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
            top_p=s.top_p, stop_tokens=self.stop_tokens, pad_id=self.pad_id, generator=generator, dtype=self.dtype,
            all_done=self.all_done,
        )
        prepared = generated_batch(prompts, samples, pad_id=self.pad_id, ignore_index=self.ignore_index)
        stats = self.stats
        stats.sequences += len(prompts)
        stats.generated_tokens += int(samples.lengths.sum())
        stats.stopped += int(samples.stopped.sum())
        stats.truncated_prompts += sum(1 for s in starts if s > 0)
        stats.generate_seconds += time.perf_counter() - started
        return prepared

    def signal(self, batch: Batch, labels: torch.Tensor, *, form: str, diagnostics: bool = False) -> TeacherSignal:
        if self.kind == DATA:
            return self.teacher.signal(batch, labels, form=form, diagnostics=diagnostics)
        started = time.perf_counter()
        signal = self.teacher.signal(batch, labels, form=form, diagnostics=diagnostics)
        self.synchronize()  # a generated step already waits for the device at every sampled token
        self.stats.score_seconds += time.perf_counter() - started
        return signal

    def step_counts(self) -> torch.Tensor:
        """This process's ``(sequences, generated tokens, stopped sequences, truncated prompts)`` of the step, to be
        summed over ranks."""
        s = self.stats
        return torch.tensor([s.sequences, s.generated_tokens, s.stopped, s.truncated_prompts], dtype=torch.float64)


def step_metrics(kind: str, counts: Sequence[float], stats: StepStats, step_seconds: float) -> Dict[str, float]:
    """The ``on_policy/*`` metrics of one optimiser step.

    Args:
        kind (str): :data:`DATA`, :data:`STUDENT` or :data:`TEACHER`.
        counts (Sequence[float]): ``(sequences, generated tokens, stopped, truncated prompts)`` summed over ranks.
        stats (StepStats): this process's timings.
        step_seconds (float): the whole step's wall time on this process.

    Returns:
        Dict[str, float]: ``student_generated`` and ``teacher_generated`` (0/1) on every step; on a generated step also
        ``mean_generated_tokens``, ``eos_fraction``, ``truncated_prompts``, ``generate_seconds``, ``score_seconds``,
        ``train_seconds`` (the rest of the step) and ``generated_tokens_per_second`` (this process's).
    """
    metrics = {"on_policy/student_generated": float(kind == STUDENT), "on_policy/teacher_generated": float(kind == TEACHER)}
    if kind == DATA:
        return metrics
    sequences, generated, stopped, truncated = counts
    metrics.update({
        "on_policy/mean_generated_tokens": generated / max(sequences, 1),
        "on_policy/eos_fraction": stopped / max(sequences, 1),
        "on_policy/truncated_prompts": truncated,
        "on_policy/generate_seconds": stats.generate_seconds,
        "on_policy/score_seconds": stats.score_seconds,
        "on_policy/train_seconds": max(step_seconds - stats.generate_seconds - stats.score_seconds, 0.0),
        "on_policy/generated_tokens_per_second": stats.generated_tokens / max(stats.generate_seconds, 1e-9),
    })
    return metrics
