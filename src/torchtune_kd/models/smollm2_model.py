"""SmolLM2-135M's architecture as torchtune builders, loading a converted folder, and shallower students.

- :func:`smollm2_135m` / :func:`lora_smollm2_135m` are YAML builders (``_component_:
  torchtune_kd.models.smollm2.smollm2_135m``) over torchtune's ``llama3_2`` component builders with SmolLM2's
  numbers; ``num_layers`` is overridable for students. Load weights with
  ``FullModelHFCheckpointer(model_type: LLAMA3_2)``.
- :func:`build_student_from_teacher` makes a shallower student by keeping evenly spaced teacher layers.

The YAML path stays ``torchtune_kd.models.smollm2``, which re-exports every public name here.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from torchtune.models.llama3_2._component_builders import llama3_2, lora_llama3_2
from torchtune.modules import TransformerDecoder

from torchtune_kd import pruning

# SmolLM2-135M's architecture. Every value is checked against the GGUF's own config during conversion.
SMOLLM2_135M_ARGS: dict[str, Any] = {
    "vocab_size": 49152,
    "num_layers": 30,
    "num_heads": 9,
    "num_kv_heads": 3,
    "embed_dim": 576,
    "intermediate_dim": 1536,
    "rope_base": 100_000,
    "norm_eps": 1e-5,
}
SMOLLM2_MAX_POSITIONS = 8192


# --------------------------------------------------------------------------------------------------------------
# Model builders (usable from YAML)
# --------------------------------------------------------------------------------------------------------------


def _check_num_layers(num_layers: int) -> None:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(
            f"num_layers={num_layers!r} is invalid: give a positive integer (SmolLM2-135M has "
            f"{SMOLLM2_135M_ARGS['num_layers']} layers; a student built with build_student_from_teacher has fewer)."
        )


def smollm2_135m(
    num_layers: int = 30, max_seq_len: int = SMOLLM2_MAX_POSITIONS, attn_dropout: float = 0.0,
    vocab_size: Optional[int] = None,
) -> TransformerDecoder:
    """SmolLM2-135M as a torchtune decoder (Llama architecture, tied embeddings, RoPE base 100000).

    Load the weights written by :func:`convert_smollm2` or :func:`build_student_from_teacher` with
    ``torchtune.training.FullModelHFCheckpointer(model_type="LLAMA3_2")``.

    Args:
        num_layers: Decoder layers; 30 for the real model, fewer for a student built from it.
        max_seq_len: Longest sequence the RoPE cache covers (SmolLM2 was trained up to 8192).
        attn_dropout: Attention dropout.
        vocab_size: Rows of the embedding and output (default SmolLM2's 49152); more for a teacher padded past the
            tokenizer (``scripts/pad_vocab.py``, ``core.vocabularies``).

    Returns:
        A ``TransformerDecoder`` mapping tokens ``(bsz, seq_len)`` to logits ``(bsz, seq_len, vocab_size)``.

    Raises:
        ValueError: if ``num_layers`` is not a positive integer.
    """
    _check_num_layers(num_layers)
    args = {**SMOLLM2_135M_ARGS, "num_layers": num_layers}
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < SMOLLM2_135M_ARGS["vocab_size"]:
            raise ValueError(f"vocab_size={vocab_size!r} must be an integer >= {SMOLLM2_135M_ARGS['vocab_size']}")
        args["vocab_size"] = vocab_size
    # scale_factor=1 turns Llama 3's RoPE frequency rescaling into the identity: SmolLM2 uses plain RoPE.
    return llama3_2(
        **args, max_seq_len=max_seq_len, attn_dropout=attn_dropout, scale_factor=1, tie_word_embeddings=True
    )


def lora_smollm2_135m(
    lora_attn_modules: Sequence[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    *,
    num_layers: int = 30,
    max_seq_len: int = SMOLLM2_MAX_POSITIONS,
    attn_dropout: float = 0.0,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """SmolLM2-135M with LoRA adapters, via torchtune's ``lora_llama3_2`` component builder.

    Args:
        lora_attn_modules: Attention projections that get adapters, from ``q_proj``, ``k_proj``, ``v_proj``,
            ``output_proj``.
        apply_lora_to_mlp: Also adapt the MLP projections.
        apply_lora_to_output: Must stay False: the output projection is tied to the token embedding.
        num_layers: Decoder layers (fewer for a student).
        max_seq_len: Longest sequence the RoPE cache covers.
        attn_dropout: Attention dropout.
        lora_rank: Rank of each adapter.
        lora_alpha: LoRA scaling numerator (the update is scaled by ``lora_alpha / lora_rank``).
        lora_dropout: Dropout on the adapter input.
        use_dora: Use DoRA instead of LoRA.
        quantize_base: Keep the frozen base weights in NF4.

    Returns:
        A LoRA ``TransformerDecoder`` with logits ``(bsz, seq_len, 49152)``.

    Raises:
        ValueError: for a bad ``num_layers`` or ``apply_lora_to_output=True``.
    """
    _check_num_layers(num_layers)
    if apply_lora_to_output:
        raise ValueError(
            "apply_lora_to_output=True is not possible for SmolLM2: its output projection is tied to the token "
            "embedding. Set apply_lora_to_output: false."
        )
    args = {**SMOLLM2_135M_ARGS, "num_layers": num_layers}
    return lora_llama3_2(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=False,
        **args,
        max_seq_len=max_seq_len,
        attn_dropout=attn_dropout,
        scale_factor=1,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        tie_word_embeddings=True,
    )


def load_torchtune_model(model_dir: str | Path, max_seq_len: int = 2048) -> TransformerDecoder:
    """Build a SmolLM2-shaped decoder and load an HF folder written by this module, the way a recipe does.

    Args:
        model_dir: A folder from :func:`convert_smollm2` or :func:`build_student_from_teacher`.
        max_seq_len: RoPE cache length of the built model.

    Returns:
        The decoder in eval mode with the folder's weights (depth read from its ``config.json``).
    """
    from torchtune.training import MODEL_KEY, FullModelHFCheckpointer

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    model = smollm2_135m(num_layers=int(config["num_hidden_layers"]), max_seq_len=max_seq_len)
    # The checkpointer insists on an output folder outside the checkpoint folder; loading never writes to it.
    with tempfile.TemporaryDirectory() as scratch:
        checkpointer = FullModelHFCheckpointer(
            checkpoint_dir=str(model_dir),
            checkpoint_files=["model.safetensors"],
            model_type="LLAMA3_2",
            output_dir=scratch,
        )
        state = checkpointer.load_checkpoint()[MODEL_KEY]
    model.load_state_dict(state)
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# Students made of teacher layers
# --------------------------------------------------------------------------------------------------------------


def select_teacher_layers(
    num_teacher_layers: int, keep_every: int | None = None, num_layers: int | None = None
) -> list[int]:
    """Which teacher layers a shallower student keeps (DistilBERT / Minitron-style depth pruning).

    Give exactly one of:

    - ``num_layers=n``: ``n`` layers evenly spread over the teacher, the first and the last always included:
      layer ``round(i * (T - 1) / (n - 1))`` for ``i = 0 .. n-1`` (``n = 1`` keeps layer 0).
    - ``keep_every=k``: layers ``0, k, 2k, ...`` plus the last layer if the stride misses it
      (30 layers, ``k = 2``: ``0, 2, ..., 28, 29``; ``k = 1`` keeps all).

    Args:
        num_teacher_layers: Teacher depth ``T``.
        keep_every: Stride ``k >= 1``.
        num_layers: Student depth ``1 <= n <= T``.

    Returns:
        Strictly increasing teacher layer indices; student layer ``i`` starts as teacher layer ``result[i]``.

    Raises:
        ValueError: for both or neither option given, or values out of range.
    """
    if isinstance(num_teacher_layers, bool) or not isinstance(num_teacher_layers, int) or num_teacher_layers < 1:
        raise ValueError(f"num_teacher_layers={num_teacher_layers!r} is invalid: give a positive integer.")
    if (keep_every is None) == (num_layers is None):
        raise ValueError(
            f"give exactly one of keep_every (got {keep_every!r}) and num_layers (got {num_layers!r}), e.g. "
            "num_layers=6."
        )
    last = num_teacher_layers - 1
    if keep_every is not None:
        if isinstance(keep_every, bool) or not isinstance(keep_every, int) or keep_every < 1:
            raise ValueError(f"keep_every={keep_every!r} is invalid: give an integer >= 1 (2 keeps every other layer).")
        kept = list(range(0, num_teacher_layers, keep_every))
        return kept if kept[-1] == last else [*kept, last]
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= num_teacher_layers:
        raise ValueError(
            f"num_layers={num_layers!r} is invalid: give an integer from 1 to the teacher's depth {num_teacher_layers}."
        )
    return pruning.evenly_spaced(num_teacher_layers, num_layers)


def build_student_from_teacher(
    teacher_dir: str | Path,
    out_dir: str | Path,
    keep_every: int | None = None,
    num_layers: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write a shallower student made of a subset of the teacher's layers, in the teacher's HF format.

    The student keeps the teacher's embedding (tied output) and final norm, and the teacher layers chosen by
    :func:`select_teacher_layers`, renumbered ``0 .. n-1``. Tokenizer and generation files are copied, so the
    folder loads like the teacher (``FullModelHFCheckpointer`` + :func:`smollm2_135m` with ``num_layers=n``,
    or transformers). Idempotent: an existing student with the same layer choice is reused.

    Args:
        teacher_dir: HF folder with ``config.json`` and a single ``model.safetensors`` (Llama layout).
        out_dir: Student folder (created).
        keep_every: Keep every k-th layer (see :func:`select_teacher_layers`).
        num_layers: Or: the student depth.
        force: Rebuild even if a matching student exists.

    Returns:
        ``{"out_dir": str, "kept_layers": [...], "num_layers": n, "teacher_num_layers": T,
        "layer_mapping": [[i, kept[i]], ...], "builder": {"_component_": "torchtune_kd.models.smollm2.smollm2_135m",
        "num_layers": n}}``. ``layer_mapping`` pairs student layer ``i``'s output with that of the teacher layer
        it was copied from, in the project's ``layer_mapping`` convention.

    Raises:
        ValueError: for a bad layer choice, a teacher folder without the expected files, or
            ``out_dir == teacher_dir``.
    """
    teacher_dir = Path(teacher_dir)
    if not (teacher_dir / "config.json").is_file():
        raise ValueError(
            f"teacher_dir={str(teacher_dir)!r} needs config.json and model.safetensors; run "
            "torchtune_kd.models.smollm2.convert_smollm2 first."
        )
    teacher_layers = int(json.loads((teacher_dir / "config.json").read_text())["num_hidden_layers"])
    kept = select_teacher_layers(teacher_layers, keep_every=keep_every, num_layers=num_layers)
    builder = {"_component_": "torchtune_kd.models.smollm2.smollm2_135m", "num_layers": len(kept)}
    return pruning.write_pruned_student(teacher_dir, out_dir, kept, info={"builder": builder}, force=force)
