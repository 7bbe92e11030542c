"""A teacher with another tokenizer: the same text in the teacher's tokens, and where the two models' next-token
predictions are about the same event.

Both tokenizers must be byte-level (every token stands for a run of UTF-8 bytes, read from the tokenizer itself:
:class:`TokenTable`). A student sequence is text bytes interleaved with special tokens. :func:`teacher_view`
re-tokenises that text with the teacher's tokenizer, segment by segment between special tokens (the text is the
student tokens' own bytes, so nothing is re-read from the dataset), maps the special tokens the teacher also has
(the same name, or BOS/EOS by role) and drops the others. Every token then has a byte offset where it ends in the
shared text.

Positions are aligned at common boundaries. Student position ``i`` predicts the student token starting at byte
``b = end_s[i]``; teacher position ``j`` predicts the teacher token starting at ``end_t[j]``. The two predictions are
about the same event, "what comes after these ``b`` bytes", when ``end_t[j] == b`` and both next tokens are text
(or the same mapped special token). Between two common boundaries lie runs of tokens whose boundaries differ: a
*span*, over which only the first position (at the common boundary) is aligned; the positions inside it predict a
token whose start the other model never predicts from, and get no KD (they keep CE). Byte offsets rather than
character offsets: a byte-level token may end inside a multi-byte character, where no character offset exists.

Truncation: a text cut at ``max_seq_len`` inside a character keeps its complete characters for the teacher (the
rest is never aligned), and a teacher sequence longer than the teacher's limit is cut, its positions past it
unaligned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from torchtune_kd.core.loss_step import REAL_TOKENS_KEY
from torchtune_kd.core.teacher_source import Batch, TeacherAligned, TeacherSource

#: Alignment value of a student position with no teacher position.
UNALIGNED = -1


@dataclass(frozen=True)
class TokenTable:
    """What each id of a byte-level tokenizer stands for.

    Attributes:
        pieces (list[Optional[bytes]]): per id, the bytes of its text (``None`` for a special token or an unused id).
        special_names (dict[int, str]): special token id -> name.
        bos_id (Optional[int]), eos_id (Optional[int]), pad_id (Optional[int]): the tokenizer's own.
    """

    pieces: list[Optional[bytes]]
    special_names: dict[int, str]
    bos_id: Optional[int]
    eos_id: Optional[int]
    pad_id: Optional[int]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: Optional[int] = None) -> "TokenTable":
        """Read a torchtune tokenizer backed by tiktoken (``llama3_tokenizer``, ``smollm2_tokenizer``).

        Args:
            tokenizer (Any): the built tokenizer.
            vocab_size (Optional[int]): rows of the model (ids past the tokenizer's are unused).

        Raises:
            ValueError: the tokenizer's token bytes cannot be read (not tiktoken-based).
        """
        encoding = _tiktoken_encoding(tokenizer)
        if encoding is None:
            raise ValueError(
                f"{type(tokenizer).__name__} is not a byte-level tokenizer whose token bytes can be read (torchtune's "
                "tiktoken-based tokenizers: llama3_tokenizer, smollm2_tokenizer): cross-tokenizer distillation needs "
                "every token's bytes"
            )
        specials = {int(i): str(name) for name, i in (getattr(tokenizer, "special_tokens", None) or {}).items()}
        size = max(vocab_size or 0, encoding.n_vocab, max(specials, default=-1) + 1)
        pieces: list[Optional[bytes]] = []
        for token_id in range(size):
            if token_id in specials or token_id >= encoding.n_vocab:
                pieces.append(None)
                continue
            try:
                pieces.append(encoding.decode_single_token_bytes(token_id))
            except KeyError:  # an id tiktoken does not know (a gap in the ranks)
                pieces.append(None)
        return cls(pieces, specials, getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None),
                   getattr(tokenizer, "pad_id", None))

    def piece(self, token_id: int) -> Optional[bytes]:
        return self.pieces[token_id] if 0 <= token_id < len(self.pieces) else None


def _tiktoken_encoding(tokenizer: Any) -> Any:
    for candidate in (getattr(tokenizer, "_tt", None), getattr(getattr(tokenizer, "tt_model", None), "tt_model", None),
                      getattr(tokenizer, "tt_model", None)):
        if candidate is not None and hasattr(candidate, "decode_single_token_bytes"):
            return candidate
    return None


def special_map(student: TokenTable, teacher: TokenTable) -> dict[int, int]:
    """Student special id -> teacher special id: the same name, else BOS to BOS and EOS to EOS."""
    by_name = {name: i for i, name in teacher.special_names.items()}
    mapped = {i: by_name[name] for i, name in student.special_names.items() if name in by_name}
    for mine, theirs in ((student.bos_id, teacher.bos_id), (student.eos_id, teacher.eos_id)):
        if mine is not None and theirs is not None:
            mapped.setdefault(mine, theirs)
    return mapped


def shared_vocabulary(student: TokenTable, teacher: TokenTable) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens both vocabularies have: the same bytes, or mapped special tokens (:func:`special_map`).

    Returns:
        tuple[torch.Tensor, torch.Tensor]: ``(student_ids, teacher_ids)``, int64 ``(shared,)``, pairwise equal
        tokens, ordered by student id.
    """
    by_bytes = {piece: i for i, piece in enumerate(teacher.pieces) if piece is not None}
    pairs = [(i, by_bytes[piece]) for i, piece in enumerate(student.pieces) if piece is not None and piece in by_bytes]
    pairs += sorted(special_map(student, teacher).items())
    pairs.sort()
    ids = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    return ids[:, 0].contiguous(), ids[:, 1].contiguous()


@dataclass(frozen=True)
class TeacherView:
    """One student sequence as the teacher reads it.

    Attributes:
        teacher_ids (list[int]): the teacher's tokens of the same text (and mapped special tokens).
        alignment (list[int]): per student position, the teacher position predicting the same event, or
            :data:`UNALIGNED`.
    """

    teacher_ids: list[int]
    alignment: list[int]


def _valid_utf8_prefix(raw: bytes) -> str:
    """The longest prefix of ``raw`` that is whole UTF-8 characters (a cut inside the last one drops it)."""
    for cut in range(len(raw), max(len(raw) - 4, -1), -1):
        try:
            return raw[:cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return raw.decode("utf-8", errors="ignore")


def teacher_view(
    student_ids: Sequence[int],
    student: TokenTable,
    teacher_tokenizer: Any,
    teacher: TokenTable,
    *,
    max_teacher_len: Optional[int] = None,
) -> TeacherView:
    """The teacher's tokens of a student sequence and the aligned positions (see the module docstring).

    Args:
        student_ids (Sequence[int]): the student's tokens (padding included: it is a special token or unused id).
        student (TokenTable): the student tokenizer's table.
        teacher_tokenizer (Any): the teacher's tokenizer (``encode(text, add_bos=False, add_eos=False)``).
        teacher (TokenTable): its table.
        max_teacher_len (Optional[int]): the teacher's sequence limit (longer sequences are cut).

    Returns:
        TeacherView: the teacher's ids and, per student position, the aligned teacher position.
    """
    specials = special_map(student, teacher)
    ids = [int(i) for i in student_ids]
    # Student side: where each token ends in the text, and what it is ("text" or a mapped special's teacher id).
    student_end: list[int] = []
    student_kind: list[Any] = []
    teacher_ids: list[int] = []
    teacher_end: list[Optional[int]] = []  # None: inside a segment the teacher did not reproduce byte for byte
    teacher_kind: list[Any] = []

    def flush(segment: bytearray, start: int) -> None:
        if not segment:
            return
        text = _valid_utf8_prefix(bytes(segment))
        tokens = list(teacher_tokenizer.encode(text, add_bos=False, add_eos=False)) if text else []
        pieces = [teacher.piece(t) for t in tokens]
        exact = all(p is not None for p in pieces) and b"".join(pieces) == text.encode("utf-8")
        end = start
        for token, piece in zip(tokens, pieces):
            teacher_ids.append(token)
            teacher_kind.append("text")
            if exact:
                end += len(piece)
                teacher_end.append(end)
            else:  # the teacher tokenizer dropped or changed bytes: no boundary in this segment is trusted
                teacher_end.append(None)

    segment, segment_start, offset = bytearray(), 0, 0
    for token in ids:
        piece = student.piece(token)
        if piece is not None:
            if not segment:
                segment_start = offset
            segment += piece
            offset += len(piece)
            student_kind.append("text")
            student_end.append(offset)
            continue
        student_kind.append(specials.get(token))  # None: a special the teacher lacks (never aligned)
        student_end.append(offset)
        flush(segment, segment_start)
        segment = bytearray()
        if token in specials:
            teacher_ids.append(specials[token])
            teacher_end.append(offset)
            teacher_kind.append(specials[token])
    flush(segment, segment_start)
    if max_teacher_len is not None and len(teacher_ids) > max_teacher_len:
        del teacher_ids[max_teacher_len:], teacher_end[max_teacher_len:], teacher_kind[max_teacher_len:]

    # Teacher position j predicts the event (end_t[j], kind of token j+1); a BOS-less start predicts from offset 0.
    events: dict[tuple[int, Any], int] = {}
    for j in range(len(teacher_ids) - 1):
        if teacher_end[j] is not None and teacher_kind[j + 1] is not None:
            events[(teacher_end[j], teacher_kind[j + 1])] = j
    alignment = []
    for i in range(len(ids)):
        kind = student_kind[i + 1] if i + 1 < len(ids) else None
        alignment.append(events.get((student_end[i], kind), UNALIGNED) if kind is not None else UNALIGNED)
    return TeacherView(teacher_ids, alignment)



#: What :meth:`CrossTokenizerTeacher.on_host` adds to a batch.
TEACHER_TOKENS, ALIGNMENT = "teacher_tokens", "teacher_alignment"


class CrossTokenizerTeacher(TeacherSource):
    """A live teacher with another tokenizer: it reads each micro-batch re-tokenised (:func:`teacher_view`, on the
    host before the batch moves) and gives its logits at the aligned positions (``TeacherAligned``).

    Args:
        model (nn.Module): the teacher, a torchtune decoder.
        student (TokenTable), teacher (TokenTable): the two tokenizers' tables.
        teacher_tokenizer (Any): the teacher's tokenizer.
        max_teacher_len (Optional[int]): the teacher's sequence limit.
    """

    def __init__(self, model: nn.Module, student: TokenTable, teacher: TokenTable, teacher_tokenizer: Any,
                 max_teacher_len: Optional[int] = None) -> None:
        self.model = model
        self.student, self.teacher = student, teacher
        self.teacher_tokenizer = teacher_tokenizer
        self.max_teacher_len = max_teacher_len
        pad = teacher.pad_id if teacher.pad_id is not None else teacher.eos_id
        self._pad_id = int(pad if pad is not None else 0)

    def on_host(self, batch: Batch) -> Batch:
        tokens = batch["tokens"]
        real = batch.get(REAL_TOKENS_KEY, torch.ones_like(tokens, dtype=torch.bool))
        views = [
            teacher_view(row[mask].tolist(), self.student, self.teacher_tokenizer, self.teacher,
                         max_teacher_len=self.max_teacher_len)
            for row, mask in zip(tokens, real.bool())
        ]
        width = max(1, max(len(v.teacher_ids) for v in views))
        teacher_tokens = torch.full((len(views), width), self._pad_id, dtype=tokens.dtype)
        alignment = torch.full(tokens.shape, UNALIGNED, dtype=torch.long)
        for b, (view, mask) in enumerate(zip(views, real.bool())):
            teacher_tokens[b, : len(view.teacher_ids)] = torch.tensor(view.teacher_ids, dtype=tokens.dtype)
            alignment[b, mask.nonzero().squeeze(1)] = torch.tensor(view.alignment, dtype=torch.long)
        return {**batch, TEACHER_TOKENS: teacher_tokens, ALIGNMENT: alignment}

    def signal(self, batch: Batch, labels: torch.Tensor, *, form: str, diagnostics: bool = False) -> TeacherAligned:
        """``TeacherAligned`` whatever ``form`` (the unfused pass takes it)."""
        if TEACHER_TOKENS not in batch:
            batch = self.on_host(batch)
        with torch.no_grad():
            logits = self.model(batch[TEACHER_TOKENS].to(labels.device))
            logits = torch.cat(list(logits), dim=1) if not isinstance(logits, torch.Tensor) else logits
        alignment = batch[ALIGNMENT].to(labels.device)
        index = alignment.clamp(min=0).unsqueeze(-1).expand(-1, -1, logits.shape[-1])
        return TeacherAligned(logits.gather(1, index), alignment != UNALIGNED)
