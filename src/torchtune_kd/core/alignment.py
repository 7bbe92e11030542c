"""Layer-to-layer alignment between a student and a teacher decoder.

A layer mapping pairs the *output* of student decoder layer ``s`` with the *output* of teacher decoder layer
``t``: ``[[0, 15], [1, 20], [2, 25]]``. Indices are 0-based, negative ones count from the end (``-1`` is the last
layer). This differs from torchtune's ``TransformerDecoder(output_hidden_states=[i])``, which records the *input*
of layer ``i`` (the embedding output for ``i = 0``): our ``s`` is torchtune's ``s + 1``. We capture outputs with
forward hooks on exactly the mapped layers, which works unchanged with LoRA layers, chunked output, activation
checkpointing (the hook sits on the wrapper, so recomputation does not fire it twice) and per-layer compile.

The pieces here know nothing about the recipe:

- :func:`resolve_layer_mapping` validates a user mapping (or ``"auto"``) against the models' depths;
- :class:`LayerOutputCapture` records the outputs of chosen layers during a forward pass;
- :class:`HiddenStateAligner` owns one learned student-dim -> teacher-dim projection per pair and turns captured
  states into an IR (intermediate representation) loss via a pluggable loss such as ``kd_losses.CosineIRLoss``.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

import kd_losses

from torchtune_kd.core import seeded_init

LayerPair = tuple[int, int]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a torchtune ``TransformerDecoder`` (``model.layers``).

    Raises:
        ValueError: if the model has no ``layers`` module list.
    """
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__} has no `layers` ModuleList; layer alignment needs a torchtune "
            "TransformerDecoder (e.g. torchtune.models.llama3_2.llama3_2_1b)."
        )
    return layers


def model_embed_dim(model: nn.Module) -> int:
    """Hidden size of a torchtune decoder, read from its token embedding (works on the meta device too)."""
    embeddings = getattr(model, "tok_embeddings", None)
    if embeddings is None or not hasattr(embeddings, "embedding_dim"):
        raise ValueError(f"{type(model).__name__} has no `tok_embeddings`; cannot read its hidden size.")
    return int(embeddings.embedding_dim)


def model_vocab_size(model: nn.Module) -> int:
    """Vocabulary size of a torchtune decoder, read from its token embedding."""
    return int(model.tok_embeddings.num_embeddings)


def auto_layer_mapping(student_depth: int, teacher_depth: int) -> list[LayerPair]:
    """Pair every student layer with a teacher layer spread uniformly by depth.

    Student layer ``i`` (of ``S``) sits at relative depth ``(i + 1) / S``; it is paired with the teacher layer at the
    same relative depth, ``round((i + 1) * T / S) - 1``, so the last layers always meet. A 16-layer student and a
    28-layer teacher give ``[0, 1], [1, 3], [2, 4], ..., [15, 27]``.

    Args:
        student_depth (int): number of student decoder layers.
        teacher_depth (int): number of teacher decoder layers.

    Returns:
        list[tuple[int, int]]: ``(student_layer, teacher_layer)`` pairs, one per student layer.
    """
    if student_depth < 1 or teacher_depth < 1:
        raise ValueError(f"auto layer mapping needs positive depths, got student={student_depth}, teacher={teacher_depth}")
    pairs = []
    for i in range(student_depth):
        # Half-up rounding (not Python's banker's rounding) keeps the spacing symmetric.
        t = int((i + 1) * teacher_depth / student_depth + 0.5) - 1
        pairs.append((i, min(max(t, 0), teacher_depth - 1)))
    return pairs


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def resolve_layer_mapping(
    mapping: Any,
    student_depth: int,
    teacher_depth: int,
    *,
    key: str = "layer_mapping",
) -> list[LayerPair]:
    """Validate a layer mapping and normalise it to non-negative ``(student, teacher)`` pairs.

    Args:
        mapping (Any): ``None`` / empty (no alignment), ``"auto"``, or a sequence of ``[student, teacher]`` pairs
            (negative indices count from the end).
        student_depth (int): number of student decoder layers.
        teacher_depth (int): number of teacher decoder layers.
        key (str): config key named in error messages.

    Returns:
        list[tuple[int, int]]: validated pairs with non-negative indices, in the given order.

    Raises:
        ValueError: listing every bad pair at once: non-integer entries, pairs that are not of length 2, indices out
            of range (naming the model's depth and the valid range), a student layer used twice.
    """
    if mapping is None:
        return []
    if isinstance(mapping, str):
        if mapping.strip().lower() == "auto":
            return auto_layer_mapping(student_depth, teacher_depth)
        raise ValueError(f"{key}={mapping!r} is not a mapping: use 'auto' or a list of [student, teacher] pairs.")
    if not isinstance(mapping, Iterable):
        raise ValueError(f"{key}={mapping!r} is not a mapping: use 'auto' or a list of [student, teacher] pairs.")

    errors: list[str] = []
    pairs: list[LayerPair] = []
    seen_students: dict[int, int] = {}
    for position, pair in enumerate(mapping):
        entries = list(pair) if isinstance(pair, Iterable) and not isinstance(pair, (str, bytes)) else None
        if entries is None or len(entries) != 2:
            errors.append(f"{key}[{position}]={pair!r} must be a pair [student_layer, teacher_layer]")
            continue
        if not all(_is_int(v) for v in entries):
            errors.append(f"{key}[{position}]={entries!r} must hold integers, e.g. [0, 15]")
            continue
        s, t = int(entries[0]), int(entries[1])
        ok = True
        for name, value, depth in (("student", s, student_depth), ("teacher", t, teacher_depth)):
            if not -depth <= value < depth:
                errors.append(
                    f"{key}[{position}]={[s, t]}: {name} layer {value} is out of range; the {name} has {depth} "
                    f"layers, so valid indices are 0..{depth - 1} (or -{depth}..-1 from the end)"
                )
                ok = False
        if not ok:
            continue
        s, t = s % student_depth, t % teacher_depth
        if s in seen_students:
            errors.append(
                f"{key}[{position}]: student layer {s} is already mapped by {key}[{seen_students[s]}]; "
                "map each student layer at most once"
            )
            continue
        seen_students[s] = position
        pairs.append((s, t))
    if errors:
        raise ValueError("Invalid layer mapping:\n  - " + "\n  - ".join(errors))
    return pairs


def pair_name(pair: LayerPair) -> str:
    """Stable name of a pair, used for module keys and metric names: ``"<s>-<t>"``."""
    return f"{pair[0]}-{pair[1]}"


class LayerOutputCapture:
    """Record the outputs of chosen decoder layers with forward hooks.

    Only the listed layers are hooked, so nothing else is kept alive. Use as a context manager around a forward
    pass, or keep it installed for the whole run and call :meth:`pop` after each forward.

    Args:
        layers (nn.ModuleList): the decoder's layers (``model.layers``), possibly wrapped by activation
            checkpointing or compiled.
        indices (Sequence[int]): non-negative indices of the layers whose outputs to record.
        detach (bool): detach the recorded tensors (for a frozen teacher). Default False.
    """

    def __init__(self, layers: nn.ModuleList, indices: Sequence[int], *, detach: bool = False) -> None:
        self._outputs: dict[int, torch.Tensor] = {}
        self._handles = []
        self._detach = detach
        for index in sorted(set(indices)):
            self._handles.append(layers[index].register_forward_hook(self._make_hook(index)))

    def _make_hook(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            self._outputs[index] = hidden.detach() if self._detach else hidden

        return hook

    def pop(self) -> dict[int, torch.Tensor]:
        """Return the recorded outputs ``{layer: (bsz, seq_len, dim)}`` and forget them."""
        outputs, self._outputs = self._outputs, {}
        return outputs

    def remove(self) -> None:
        """Remove the hooks and drop any recorded tensors."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs = {}

    def __enter__(self) -> "LayerOutputCapture":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


class HiddenStateAligner(nn.Module):
    """Learned projections and the IR loss for a list of aligned layer pairs.

    One projection per pair maps the student's hidden size to the teacher's (``kd_losses.make_projection``;
    identity when the sizes match and ``identity_when_equal``). Sizes come from the caller, normally read from the
    instantiated models (:func:`model_embed_dim`), never hard-coded: Llama 3.2 1B -> 3B gives 2048 -> 3072.

    Args:
        pairs (Sequence[tuple[int, int]]): validated ``(student_layer, teacher_layer)`` pairs.
        student_dim (int): student hidden size.
        teacher_dim (int): teacher hidden size.
        ir_loss (nn.Module): a hidden-state loss with ``token_sum(student, teacher, labels) -> (sum, count)``,
            e.g. ``kd_losses.CosineIRLoss()``.
        identity_when_equal (bool): use no projection when the sizes match. Default True.
    """

    def __init__(
        self,
        pairs: Sequence[LayerPair],
        student_dim: int,
        teacher_dim: int,
        ir_loss: nn.Module,
        *,
        identity_when_equal: bool = True,
    ) -> None:
        super().__init__()
        if not pairs:
            raise ValueError("HiddenStateAligner needs at least one layer pair")
        self.pairs = [tuple(p) for p in pairs]
        self.student_dim = int(student_dim)
        self.teacher_dim = int(teacher_dim)
        self.ir_loss = ir_loss
        self.projections = nn.ModuleDict(
            {
                pair_name(p): kd_losses.make_projection(
                    self.student_dim, self.teacher_dim, identity_when_equal=identity_when_equal
                )
                for p in self.pairs
            }
        )

    @property
    def student_layers(self) -> list[int]:
        return [s for s, _ in self.pairs]

    @property
    def teacher_layers(self) -> list[int]:
        return [t for _, t in self.pairs]

    def token_sums(
        self,
        student_states: Mapping[int, torch.Tensor],
        teacher_states: Mapping[int, torch.Tensor],
        token_mask: torch.Tensor,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-pair IR loss sums over real tokens.

        Args:
            student_states (Mapping[int, torch.Tensor]): student layer outputs ``(bsz, seq_len, student_dim)``.
            teacher_states (Mapping[int, torch.Tensor]): teacher layer outputs ``(bsz, seq_len, teacher_dim)``.
            token_mask (torch.Tensor): ``(bsz, seq_len)`` bool, True at real (non-padding) positions.

        Returns:
            tuple: ``({"<s>-<t>": fp32 scalar sum}, number of real tokens)``; the caller normalises.
        """
        sums: dict[str, torch.Tensor] = {}
        count = token_mask.sum()
        for pair in self.pairs:
            name = pair_name(pair)
            student_hidden = student_states[pair[0]]
            projection = self.projections[name]
            projected = projection(student_hidden.to(_param_dtype(projection, student_hidden.dtype)))
            pair_sum, count = self.ir_loss.token_sum(projected, teacher_states[pair[1]], token_mask)
            sums[name] = pair_sum
        return sums, count


def _param_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    for parameter in module.parameters():
        return parameter.dtype
    return default


def attach(
    student: nn.Module,
    teacher: nn.Module,
    pairs: Sequence[LayerPair],
    ir_loss: nn.Module,
    *,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
) -> tuple[HiddenStateAligner, LayerOutputCapture, LayerOutputCapture]:
    """Set up alignment between two models: projections sized from them, hooks on exactly the mapped layers.

    Args:
        student (nn.Module): the student decoder (its mapped layers' outputs keep their autograd graph).
        teacher (nn.Module): the frozen teacher decoder (captured outputs are detached).
        pairs (Sequence[LayerPair]): resolved ``(student_layer, teacher_layer)`` pairs.
        ir_loss (nn.Module): a hidden-state loss with ``token_sum`` (e.g. ``kd_losses.CosineIRLoss``).
        device (torch.device): where the projections live.
        dtype (torch.dtype): the projections' dtype.
        seed (int): the run's seed; the projections' starting weights depend only on it and their names
            (``seeded_init``), so they are the same on one device or many.

    Returns:
        tuple: the aligner (projections + IR loss) and the student's and teacher's captures; call ``remove()`` on
        the captures when done.
    """
    from torchtune import utils

    aligner = HiddenStateAligner(
        pairs, student_dim=model_embed_dim(student), teacher_dim=model_embed_dim(teacher), ir_loss=ir_loss
    ).to(device=device, dtype=dtype)
    seeded_init.reset_linear_layers(aligner.projections, seed, prefix="projections.")
    student_capture = LayerOutputCapture(decoder_layers(student), aligner.student_layers)
    teacher_capture = LayerOutputCapture(decoder_layers(teacher), aligner.teacher_layers, detach=True)
    utils.get_logger("INFO").info(
        f"Layer mapping (student -> teacher): {list(pairs)}; projections {aligner.student_dim} -> "
        f"{aligner.teacher_dim}; IR loss {type(ir_loss).__name__}."
    )
    return aligner, student_capture, teacher_capture
