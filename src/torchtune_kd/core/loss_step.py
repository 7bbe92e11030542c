"""Per-micro-batch pieces of a distillation step and the token-exact accumulation over a step's micro-batches.

Shared by the single-device and the distributed recipe; ``core.output_pass`` builds a micro-batch's CE and KD
sums from these pieces, and ``core.teacher_source`` provides the teacher's side.

Everything here returns *token sums* (fp32 scalars) plus counts; the recipe divides once by the token count of the
whole optimiser step, so gradient accumulation weights every token equally (torchtune 0.6.1's KD recipe instead
backpropagates each micro-batch's mean and then also divides by the step's token count).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

import kd_losses
from torchtune_kd.core.loss_weighting import COMPONENTS

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
    """Diagnostics on counted tokens from both models' logits: top-1 agreement count and summed teacher entropy
    (nats, T = 1), by ``kd_losses.diagnostics``.

    For a KD loss that is not a ``kd_losses`` divergence: a divergence reads the same diagnostics from the
    log-probabilities it computes anyway (``token_sum_and_diagnostics``); this computes the teacher's log-softmax
    once more, chunk by chunk.

    Args:
        student_logits (Logits): ``(bsz, seq_len, vocab)`` or a list of ``(bsz, seq_len / n, vocab)`` chunks.
        teacher_logits (Logits): the teacher's, same shapes.
        labels (torch.Tensor): shifted labels ``(bsz, seq_len)``.
        ignore_index (int): label value that does not count.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: ``(agreements, entropy_sum)`` as fp32 scalars.
    """
    agree = torch.zeros((), dtype=torch.float32, device=labels.device)
    entropy = torch.zeros((), dtype=torch.float32, device=labels.device)
    student_chunks = _as_chunks(student_logits, labels)
    teacher_chunks = _as_chunks(teacher_logits, labels)
    for (s_chunk, chunk_labels), (t_chunk, _) in zip(student_chunks, teacher_chunks):
        chunk_agree, chunk_entropy = kd_losses.diagnostics(
            s_chunk, torch.log_softmax(t_chunk.float(), dim=-1), chunk_labels != ignore_index
        )
        agree, entropy = agree + chunk_agree, entropy + chunk_entropy
    return agree, entropy


REAL_TOKENS_KEY = "real_tokens"


def _sample_mask(length: int, real: int) -> torch.Tensor:
    mask = torch.zeros(length, dtype=torch.bool)
    mask[:real] = True
    return mask


def collate_with_real_tokens(
    batch: Sequence[dict],
    collate_fn: Callable[[Sequence[dict]], dict],
    *,
    packed: bool,
    padding_idx: int = 0,
    ignore_index: int = -100,
) -> dict:
    """Collate a batch and add ``real_tokens``: ``(bsz, seq_len)`` bool, True where a real (non-padding) token is.

    The mask comes from what the collator knows, never from token values: comparing tokens with a pad id is wrong
    when the pad id is also a real token (e.g. pad = eos) and for packs, which torchtune pads with id 0.

    - Unpacked samples: each sample's own length before the collator pads the batch to its longest sample.
    - Packs (``PackedDataset``): a pack's padding is its last ``seq_lens`` segment, appended only when the pack is
      shorter than ``max_seq_len``; it is recognised as the last segment whose tokens are all ``padding_idx`` and
      whose labels are all ``ignore_index`` (a real sample starts with its BOS token and so never looks like that).

    Args:
        batch (Sequence[dict]): samples with ``tokens`` and ``labels`` (and ``seq_lens`` when packed).
        collate_fn (Callable): torchtune's collator (``padded_collate_sft`` or ``padded_collate_packed``).
        packed (bool): whether the samples are packs.
        padding_idx (int): token id ``PackedDataset`` pads packs with. Default 0 (torchtune's).
        ignore_index (int): label value of padding. Default -100.

    Returns:
        dict: the collator's output plus ``real_tokens``.
    """
    collated = collate_fn(batch)
    seq_len = collated["tokens"].shape[1]
    masks = []
    for sample in batch:
        tokens = torch.as_tensor(sample["tokens"])
        real = len(tokens)
        if packed:
            labels = torch.as_tensor(sample["labels"])
            last = int(torch.as_tensor(sample["seq_lens"])[-1])
            tail = slice(real - last, real)
            if last > 0 and bool((tokens[tail] == padding_idx).all()) and bool((labels[tail] == ignore_index).all()):
                real -= last
        masks.append(_sample_mask(seq_len, real))
    collated[REAL_TOKENS_KEY] = torch.stack(masks)
    if batch and "sample_id" in batch[0]:  # core.data.WithSampleIds: the key of a teacher cache
        collated["sample_id"] = torch.tensor([int(sample["sample_id"]) for sample in batch], dtype=torch.int64)
    return collated


def label_token_count(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Number of counted next-token targets of a micro-batch, as a device tensor (no host sync).

    Args:
        labels (torch.Tensor): unshifted labels ``(bsz, seq_len)``.
        ignore_index (int): label value that does not count.
    """
    return (labels[:, 1:] != ignore_index).sum()


def compile_losses(ce_token_sum: Callable, kd_loss: torch.nn.Module) -> tuple[Callable, Callable]:
    """``torch.compile`` the loss computations that run in the training step (as torchtune compiles its losses).

    The CE token sum is compiled whole. A KD loss exposing ``compile_blocks(backend)`` (every ``kd_losses``
    divergence) compiles its per-chunk computation itself, the part that dominates at large vocabularies; any other
    loss has its ``token_sum`` compiled. (Fetching ``.token_sum`` from a ``torch.compile``d module would return the
    eager method.)

    Returns:
        tuple[Callable, Callable]: the CE token sum and the KD ``token_sum`` to call in the step.
    """
    backend = os.environ.get("TORCH_COMPILE_BACKEND", "inductor")
    ce = torch.compile(ce_token_sum, backend=backend)
    if hasattr(kd_loss, "compile_blocks"):
        kd_loss.compile_blocks(backend)
        return ce, kd_loss.token_sum
    return ce, torch.compile(kd_loss.token_sum, backend=backend)


# The components a fused output pass computes together, and the key of their differentiable weighted sum.
FUSED = ("ce", "kd")
FUSED_OBJECTIVE = "objective"


def accumulate_gradients(
    batches: Sequence[dict],
    loss_step: Callable[[dict], dict],
    weighting: Any,
    ignore_index: int,
    *,
    reduce_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    grad_scale: float = 1.0,
    fused_components: Optional[Sequence[str]] = None,
) -> tuple[dict, dict]:
    """Forward and backward every micro-batch of one optimiser step, without a host sync.

    Token counts of the whole step are known (as device tensors) before the first backward, so each micro-batch
    contributes ``sum / total_tokens`` and the accumulated gradient is that of the step's token mean, whatever the
    split into micro-batches. With data parallelism, ``reduce_sum`` (a sum over ranks, e.g. an all-reduce) makes the
    counts and the returned means global, and ``grad_scale`` undoes the averaging of gradients over ranks (FSDP
    divides by the world size): each rank then contributes ``world_size * sum / global_tokens`` and the averaged
    gradient is the single-device gradient of the same global batch.

    Args:
        batches (Sequence[dict]): the step's micro-batches (``tokens``, ``labels``, ``real_tokens``, ...).
        loss_step (Callable[[dict], dict]): a micro-batch -> token sums ``ce``, ``kd``, optional ``ir`` and
            ``ir/<pair>`` (over real tokens), and diagnostics ``agree``, ``teacher_entropy`` (over label tokens).
        weighting (Any): a ``loss_weighting.LossWeighting`` (``weights(components)`` -> weight per component).
        ignore_index (int): label value that does not count.
        reduce_sum (Optional[Callable]): sums a tensor over data-parallel ranks (``None``: one process).
        grad_scale (float): factor on every backward (the world size under gradient-averaging data parallelism).
        fused_components (Optional[Sequence[str]]): the step's components, for a loss step that computes CE and KD
            with their gradients in one fused pass (``fused_output``): it is then called as
            ``loss_step(batch, {"ce": w_ce / label_tokens, "kd": w_kd / label_tokens})`` (weights known before the
            first forward) and returns the differentiable ``objective`` of those two next to their detached sums.

    Returns:
        tuple[dict, dict]: the step's (global) means (``loss`` and each sum's key) and ``label_tokens`` as detached
        0-d tensors, and the weight of each component.
    """
    counts = torch.stack(
        [
            torch.stack([label_token_count(b["labels"], ignore_index) for b in batches]).sum(),
            torch.stack([b[REAL_TOKENS_KEY].sum() for b in batches]).sum(),
        ]
    )
    if reduce_sum is not None:
        counts = reduce_sum(counts)
    n_label, n_real = counts.unbind()
    label_divisor, real_divisor = n_label.clamp(min=1), n_real.clamp(min=1)
    totals: dict[str, torch.Tensor] = {}
    weights: Optional[dict[str, float]] = None
    coefficients = None
    if fused_components is not None:
        weights = weighting.weights(fused_components)
        coefficients = {c: weights.get(c, 0.0) / label_divisor for c in FUSED}
    for batch in batches:
        sums = loss_step(batch) if coefficients is None else loss_step(batch, coefficients)
        fused_objective = sums.pop(FUSED_OBJECTIVE, None)
        means = {k: v / (real_divisor if k == "ir" or k.startswith("ir/") else label_divisor) for k, v in sums.items()}
        if weights is None:
            weights = weighting.weights([c for c in COMPONENTS if c in means])
        if fused_objective is None:
            objective = sum(weights[c] * means[c] for c in weights if c in means)
        else:
            # CE and KD are already in the fused objective (with their gradients); the rest goes through autograd.
            objective = fused_objective + sum(weights[c] * means[c] for c in weights if c in means and c not in FUSED)
        if objective.requires_grad:
            (objective * grad_scale if grad_scale != 1.0 else objective).backward()
        for key, value in (*means.items(), ("loss", objective)):
            totals[key] = totals[key] + value.detach() if key in totals else value.detach()
    if reduce_sum is not None:
        # One collective for every logged value: the sum over ranks of their shares of the global means.
        totals = dict(zip(totals, reduce_sum(torch.stack([v.float() for v in totals.values()])).unbind()))
    totals["label_tokens"] = n_label
    return totals, weights or {}


def read_step_values(totals: Mapping[str, torch.Tensor], grad_norm: torch.Tensor, weights: Mapping[str, float]) -> dict:
    """The step's one host sync: every value to log and to check, as Python floats."""
    names = [*totals, "grad_norm"]
    stacked = torch.stack([v.float() for v in (*totals.values(), grad_norm.detach())])
    values = dict(zip(names, stacked.tolist()))
    values.update({f"weight/{c}": w for c, w in weights.items()})
    return values


def diagnostics_due(step: int, log_every_n_steps: int, diagnostics_every_n_steps: int) -> bool:
    """Whether optimiser step ``step`` (from 1) computes the diagnostics (top-1 agreement, teacher entropy): the
    first logged step and every ``diagnostics_every_n_steps``-th logged step after it, so that they are logged
    wherever they are computed."""
    if step % log_every_n_steps:
        return False
    logged = step // log_every_n_steps
    return logged == 1 or logged % diagnostics_every_n_steps == 0


def log_dict(values: Mapping[str, float], *, lr: float, elapsed: float) -> dict[str, float]:
    """The metrics of one optimiser step under the names the project logs (stdout, disk, W&B)."""
    logged = {
        "loss": values["loss"],
        "kd_loss": values["kd"],
        "grad_norm": values["grad_norm"],
        "lr": lr,
        "tokens_per_second": values["label_tokens"] / max(elapsed, 1e-9),
    }
    if "ce" in values:  # not on a step that trains on the student's own samples (core.on_policy)
        logged["ce_loss"] = values["ce"]
    if "agree" in values:  # the steps the diagnostics were computed on (diagnostics_every_n_steps)
        # Already means over the step's counted tokens.
        logged["kd/top1_agreement"] = values["agree"]
        logged["kd/teacher_entropy"] = values["teacher_entropy"]
    if "aligned" in values:  # a teacher with another tokenizer (core.cross_tokenizer): the counted tokens with KD
        logged["kd/aligned_fraction"] = values["aligned"]
    if "teacher_padding_mass" in values:  # a padded-vocabulary teacher (core.vocabularies), on diagnostics steps
        logged["kd/teacher_padding_mass"] = values["teacher_padding_mass"]
    if "ir" in values:
        logged["ir_loss"] = values["ir"]
    for key, value in values.items():
        if key.startswith("ir/"):
            logged[f"ir_loss/{key[3:]}"] = value
        elif key.startswith(("weight/", "on_policy/")):
            logged[key] = value
    return logged


@dataclass
class StepLosses:
    """The loss functions a step calls: CE and KD token sums (compiled when asked), and what they share."""

    ce_token_sum: Callable
    kd_token_sum: Callable
    kd_loss: torch.nn.Module
    ignore_index: int
    num_output_chunks: int


def build_losses(cfg_loss: Any, cfg_kd_loss: Any, models: Sequence[torch.nn.Module], *, compile: bool) -> StepLosses:
    """Instantiate ``loss`` (CE: read for ``ignore_index`` and ``num_output_chunks``) and ``kd_loss``, make the
    models emit that many logit chunks, and compile the token sums if asked."""
    from torchtune import config

    ce_loss, kd_loss = config.instantiate(cfg_loss), config.instantiate(cfg_kd_loss)
    ignore_index = getattr(ce_loss, "ignore_index", -100)
    num_chunks = getattr(ce_loss, "num_output_chunks", 0)
    if num_chunks:
        for model in models:
            model.set_num_output_chunks(num_chunks)
    ce_sum, kd_sum = partial(ce_token_sum, ignore_index=ignore_index), kd_loss.token_sum
    if compile:
        ce_sum, kd_sum = compile_losses(ce_sum, kd_loss)
    return StepLosses(ce_sum, kd_sum, kd_loss, ignore_index, num_chunks)
