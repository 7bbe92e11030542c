"""``teacher_tokenizer``: which vocabularies the two models may have, and the proof that they share a tokenizer.

=====================================  ===============================================================================
sizes and tokenizers                   what happens
=====================================  ===============================================================================
same size, no ``teacher_tokenizer``    one tokenizer (the ``tokenizer`` section) for both models: as always
teacher larger, same tokenizer         padded vocabularies (``core.vocabularies``): KD on the student's rows; needs
                                       ``teacher_tokenizer``, proved the same tokenizer and emitting no id past them
teacher larger, no ``teacher_tok...``  refused: sizes alone cannot tell padding from another tokenizer
student larger                         refused: the student's extra rows would have no teacher probability
another tokenizer (any sizes)          ``cross_tokenizer`` set: KD through the shared tokens and ULD
                                       (``core.cross_tokenizer``); else refused, pointing to it
=====================================  ===============================================================================

Two tokenizer sections are the same tokenizer when they are equal but for ``max_seq_len`` (the same files), or when
both encode a sample of the training text (the first :data:`SAMPLES` samples, decoded by the student's tokenizer) to
the same ids and agree on the BOS, EOS and pad ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from torchtune_kd.core import data
from torchtune_kd.core.config_checks.common import Findings, short

#: Training samples the two tokenizers must encode alike.
SAMPLES = 16
CROSS_TOKENIZER_POINTER = "distillation across tokenizers: see the README section 'Teachers with another tokenizer'"
_SPECIAL_IDS = ("bos_id", "eos_id", "pad_id")


@dataclass
class VocabFindings(Findings):
    """The problems found, and the rows KD compares on when the teacher is padded (``None``: the whole vocabulary,
    shared)."""

    shared_vocab: Optional[int] = None


def _padding_fix(student_vocab: int, teacher_vocab: int) -> str:
    return (
        f"vocabulary sizes differ: model has {student_vocab} tokens, teacher_model has {teacher_vocab}. If both use "
        "one tokenizer and the teacher's extra rows are padding (e.g. Qwen2.5-7B has 152064 rows, Qwen2.5-0.5B "
        "151936), add teacher_tokenizer: the teacher's own tokenizer section, which the pre-flight checks is the same "
        "tokenizer; KD then compares the shared rows. If the teacher has another tokenizer, that is "
        + CROSS_TOKENIZER_POINTER
    )


def check_sizes(cfg: DictConfig, student_vocab: int, teacher_vocab: int) -> VocabFindings:
    """The vocabulary sizes against ``teacher_tokenizer`` (no tokenizer is built).

    Args:
        cfg (DictConfig): the config.
        student_vocab (int), teacher_vocab (int): the models' vocabulary sizes.
    """
    found = VocabFindings()
    if cfg.get("cross_tokenizer", None) is not None:
        return found  # two vocabularies of any sizes: compared through the shared tokens (config_checks.cross_tokenizer)
    has_teacher_tokenizer = cfg.get("teacher_tokenizer", None) is not None
    if has_teacher_tokenizer and not isinstance(cfg.teacher_tokenizer, DictConfig):
        found.problems.append(
            f"teacher_tokenizer={cfg.teacher_tokenizer!r} must be a tokenizer section (a mapping with a _component_ "
            "and its files, like tokenizer), or absent when the teacher uses the student's tokenizer"
        )
        return found
    if student_vocab > teacher_vocab:
        found.problems.append(
            f"model has more vocabulary rows ({student_vocab}) than teacher_model ({teacher_vocab}): the student's "
            f"extra rows would have no teacher probability. Use a teacher with at least {student_vocab} rows (a "
            "padded teacher is supported, a padded student is not); if the tokenizers differ, that is "
            + CROSS_TOKENIZER_POINTER
        )
    elif student_vocab < teacher_vocab:
        if not has_teacher_tokenizer:
            found.problems.append(_padding_fix(student_vocab, teacher_vocab))
        else:
            found.shared_vocab = student_vocab
            found.notices.append(
                f"teacher_model has {teacher_vocab - student_vocab} rows past the student's {student_vocab}: KD "
                "compares the first {0} rows, renormalised, and logs the teacher's probability on the rest as "
                "kd/teacher_padding_mass (it should be ~0)".format(student_vocab)
            )
    return found


def highest_token_id(tokenizer: Any) -> Optional[int]:
    """The highest id ``tokenizer`` can emit (its vocabulary and special tokens), ``None`` when unreadable."""
    candidates = []
    for owner in (tokenizer, getattr(tokenizer, "tt_model", None)):
        size = getattr(owner, "vocab_size", None)
        if isinstance(size, int):
            candidates.append(size - 1)
    specials = getattr(tokenizer, "special_tokens", None)
    if isinstance(specials, dict):
        candidates.extend(int(i) for i in specials.values() if isinstance(i, int))
    return max(candidates) if candidates else None


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_bos=False, add_eos=False))


def tokenizer_difference(student: Any, teacher: Any, token_samples: Sequence[Sequence[int]]) -> Optional[str]:
    """Where two built tokenizers differ on the given samples (student token ids, decoded by ``student``), or
    ``None`` when they encode every sample alike and share the BOS, EOS and pad ids."""
    for name in _SPECIAL_IDS:
        mine, theirs = getattr(student, name, None), getattr(teacher, name, None)
        if mine != theirs:
            return f"{name} is {mine} for tokenizer and {theirs} for teacher_tokenizer"
    for index, tokens in enumerate(token_samples):
        text = student.decode([int(t) for t in tokens])
        mine, theirs = _encode(student, text), _encode(teacher, text)
        if mine != theirs:
            at = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            return (
                f"training sample {index} encodes to other ids (first difference at token {at}: "
                f"{mine[at:at + 3]} against {theirs[at:at + 3]})"
            )
    return None


def _same_sections(cfg: DictConfig) -> bool:
    def files(section: DictConfig) -> dict:
        plain = OmegaConf.to_container(section, resolve=True)
        plain.pop("max_seq_len", None)
        return plain

    return files(cfg.tokenizer) == files(cfg.teacher_tokenizer)


@dataclass
class TokenizerFindings(Findings):
    """The problems found, and the teacher's tokenizer when it was built (``None``: the student's)."""

    teacher_tokenizer: Any = None


def _cross_tokenizer(tokenizer: Any, teacher_tokenizer: Any, student_vocab: Optional[int],
                     teacher_vocab: Optional[int]) -> TokenizerFindings:
    """Both tokenizers' token bytes can be read and the vocabularies share tokens."""
    from torchtune_kd.core import cross_tokenizer

    found = TokenizerFindings(teacher_tokenizer=teacher_tokenizer)
    tables = []
    for key, built, size in (("tokenizer", tokenizer, student_vocab), ("teacher_tokenizer", teacher_tokenizer,
                                                                          teacher_vocab)):
        try:
            tables.append(cross_tokenizer.TokenTable.from_tokenizer(built, size))
        except ValueError as err:
            found.problems.append(f"{key}: {err}")
    if found.ok:
        student_ids, _ = cross_tokenizer.shared_vocabulary(*tables)
        if student_ids.numel() == 0:
            found.problems.append("tokenizer and teacher_tokenizer share no token: cross-tokenizer KD has nothing exact "
                                  "to compare; set cross_tokenizer.exact_weight=0 to use ULD alone")
        found.notices.append(
            f"cross_tokenizer: the vocabularies share {student_ids.numel()} tokens (of {len(tables[0].pieces)} and "
            f"{len(tables[1].pieces)}); KD at the positions where both tokenizations reach the same byte"
        )
    return found


def check_tokenizers(
    cfg: DictConfig, tokenizer: Any, dataset: Any, *, shared_vocab: Optional[int], teacher_vocab: Optional[int],
    student_vocab: Optional[int] = None,
) -> TokenizerFindings:
    """``teacher_tokenizer`` (when set) is the student's tokenizer, and emits no id past the shared rows; with
    ``cross_tokenizer``, it may be another byte-level tokenizer (built and returned).

    Args:
        cfg (DictConfig): the config (``teacher_tokenizer`` a section: :func:`check_sizes` passed).
        tokenizer (Any): the student's tokenizer, built.
        dataset (Any): the training dataset, built (samples with ``tokens``).
        shared_vocab (Optional[int]): the rows KD compares on when the teacher is padded.
        teacher_vocab (Optional[int]): the teacher's vocabulary size.
    """
    found = TokenizerFindings()
    if not isinstance(cfg.get("teacher_tokenizer", None), DictConfig):
        return found
    if cfg.get("cross_tokenizer", None) is not None or not _same_sections(cfg):
        try:
            teacher_tokenizer = data.build_tokenizer(cfg.teacher_tokenizer)
        except Exception as err:  # the user's tokenizer builder may raise anything
            found.problems.append(f"teacher_tokenizer: could not build it: {type(err).__name__}: {short(err)}")
            return found
        if cfg.get("cross_tokenizer", None) is not None:
            return _cross_tokenizer(tokenizer, teacher_tokenizer, student_vocab, teacher_vocab)
        samples = [dataset[i]["tokens"] for i in range(min(SAMPLES, len(dataset)))]
        difference = tokenizer_difference(tokenizer, teacher_tokenizer, samples)
        if difference is not None:
            found.problems.append(
                f"teacher_tokenizer is another tokenizer than tokenizer: {difference}. Logit distillation over one "
                "vocabulary needs one tokenizer (padded sizes are fine); for a teacher with another tokenizer, "
                "that is " + CROSS_TOKENIZER_POINTER + " (the cross_tokenizer section)"
            )
            return found
    limit = shared_vocab if shared_vocab is not None else teacher_vocab
    highest = highest_token_id(tokenizer)
    if limit is not None and highest is not None and highest >= limit:
        found.problems.append(
            f"tokenizer can emit ids up to {highest}, past the {limit} vocabulary rows the two models share: those "
            "rows are not padding. Use models whose vocabularies cover the tokenizer"
        )
    return found
