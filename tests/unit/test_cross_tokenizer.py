"""A teacher with another tokenizer: the alignment on crafted strings (``core.cross_tokenizer``) and the loss of the
aligned positions against float64 references written here (``core.cross_tokenizer_loss``)."""

from __future__ import annotations

import pytest
import torch
from tiktoken import Encoding

import kd_losses
from torchtune_kd.core import cross_tokenizer, cross_tokenizer_loss
from torchtune_kd.core.cross_tokenizer import UNALIGNED, TokenTable, teacher_view

SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")


class CraftedTokenizer:
    """A real byte-level BPE (tiktoken) over a hand-picked vocabulary: the 256 bytes, then ``merges`` in order, then
    special tokens; encodes each character run with no pre-split (so the merges alone decide the tokens)."""

    def __init__(self, merges, specials=SPECIALS):
        ranks = {bytes([b]): b for b in range(256)}
        for piece in merges:
            ranks[piece.encode("utf-8") if isinstance(piece, str) else piece] = len(ranks)
        self.special_tokens = {name: len(ranks) + i for i, name in enumerate(specials)}
        self._tt = Encoding(name="crafted", pat_str=r"[\s\S]+", mergeable_ranks=ranks,
                            special_tokens=self.special_tokens)
        self.bos_id = self.special_tokens.get("<|bos|>")
        self.eos_id = self.special_tokens.get("<|eos|>")
        self.pad_id = self.special_tokens.get("<|pad|>")

    def encode(self, text, add_bos=True, add_eos=True):
        ids = self._tt.encode(text, allowed_special=set(), disallowed_special=())
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def pieces(self, ids):
        return [self._tt.decode_single_token_bytes(i) if i not in self.special_tokens.values() else None for i in ids]


def view(student_tok, teacher_tok, text=None, ids=None, **kwargs):
    ids = student_tok.encode(text) if ids is None else ids
    return ids, teacher_view(ids, TokenTable.from_tokenizer(student_tok), teacher_tok,
                             TokenTable.from_tokenizer(teacher_tok), **kwargs)


def ends(tokenizer, ids):
    out, offset = [], 0
    for piece in tokenizer.pieces(ids):
        offset += len(piece or b"")
        out.append(offset)
    return out


def reference_alignment(student_tok, teacher_tok, student_ids, teacher_ids):
    """From the definition: student i and teacher j predict the same event when both have read the same bytes and
    both next tokens are text (or both the end of text)."""
    s_end, t_end = ends(student_tok, student_ids), ends(teacher_tok, teacher_ids)
    s_text = [p is not None for p in student_tok.pieces(student_ids)]
    t_text = [p is not None for p in teacher_tok.pieces(teacher_ids)]
    expected = []
    for i in range(len(student_ids)):
        match = UNALIGNED
        if i + 1 < len(student_ids):
            for j in range(len(teacher_ids) - 1):
                same_next = (s_text[i + 1] and t_text[j + 1]) or (
                    not s_text[i + 1] and not t_text[j + 1] and student_ids[i + 1] == student_tok.eos_id
                    and teacher_ids[j + 1] == teacher_tok.eos_id)
                if s_end[i] == t_end[j] and same_next:
                    match = j
        expected.append(match)
    return expected


STUDENT = CraftedTokenizer(["he", "hel", "lo", " w", " wo", "rl", "rld", "é", " t", " the"])
TEACHER = CraftedTokenizer(["he", "ll", "llo", "wo", "rl", "rld", "world", " world", "the"])


@pytest.mark.parametrize("text", [
    "hello world",                 # a teacher token straddling two student tokens (" world" over " wo" + "rld")
    "café é",                      # multi-byte UTF-8: the student has "é" (2 bytes), the teacher only its bytes
    " the the  the",               # leading and double spaces: " the" against " " + "the"
    "日本語 hello",                 # 3-byte characters in byte tokens on both sides
    "",                            # no text at all: BOS predicts EOS
])
def test_alignment_matches_the_definition_on_crafted_strings(text):
    ids, got = view(STUDENT, TEACHER, text)
    assert TEACHER._tt.decode(got.teacher_ids[1:-1]) == text  # the same text, in the teacher's tokens
    assert got.teacher_ids[0] == TEACHER.bos_id and got.teacher_ids[-1] == TEACHER.eos_id
    assert got.alignment == reference_alignment(STUDENT, TEACHER, ids, got.teacher_ids)


def test_hello_world_aligns_at_the_common_boundaries_only():
    ids, got = view(STUDENT, TEACHER, "hello world")
    assert STUDENT.pieces(ids)[1:-1] == [b"hel", b"lo", b" wo", b"rld"]
    assert TEACHER.pieces(got.teacher_ids)[1:-1] == [b"he", b"llo", b" world"]
    # BOS -> BOS (offset 0), "lo" -> "llo" (offset 5), "rld" -> " world" (both next: EOS); "hel" and " wo" end
    # inside a teacher token: the span's inner positions get no KD; EOS predicts nothing.
    assert got.alignment == [0, UNALIGNED, 2, UNALIGNED, 3, UNALIGNED]


def test_a_token_ending_inside_a_character_aligns_where_the_character_ends():
    ids, got = view(TEACHER, STUDENT, "é!")  # the teacher of this test has "é" whole, the student only its bytes
    assert TEACHER.pieces(ids)[1:3] == [b"\xc3", b"\xa9"]
    assert got.alignment == [0, UNALIGNED, 1, 2, UNALIGNED]


def test_the_same_tokenizer_twice_is_the_identity():
    ids, got = view(STUDENT, STUDENT, "hello world, the café")
    assert got.teacher_ids == ids
    assert got.alignment == [*range(len(ids) - 1), UNALIGNED]


def test_special_tokens_the_teacher_lacks_are_dropped_and_never_predicted():
    student = CraftedTokenizer(["he", "hel", "lo"], specials=(*SPECIALS, "<|sep|>"))
    sep = student.special_tokens["<|sep|>"]
    ids = [student.bos_id, *student.encode("hello", False, False), sep, sep,
           *student.encode("he", False, False), student.eos_id]
    _, got = view(student, TEACHER, ids=ids)
    assert sep not in got.teacher_ids and TEACHER._tt.decode(got.teacher_ids[1:-1]) == "hellohe"
    positions = {i: (ids[i], got.alignment[i]) for i in range(len(ids))}
    first_sep = ids.index(sep)
    assert got.alignment[first_sep - 1] == UNALIGNED  # it predicts <|sep|>, which the teacher has no token for
    assert got.alignment[first_sep] == UNALIGNED      # it predicts the second <|sep|> (an empty span)
    # After the seps the text resumes at offset 5, where the teacher's "llo" ends and its next token is text.
    teacher_llo = TEACHER.pieces(got.teacher_ids).index(b"llo")
    assert got.alignment[first_sep + 1] == teacher_llo, positions


def test_a_text_cut_inside_a_character_keeps_its_whole_characters():
    ids = STUDENT.encode("aé", add_eos=False)
    cut = [*ids[:-1], *STUDENT.encode("é", False, False)[:0], 0xC3]  # "a" then a lone lead byte (truncated "é")
    _, got = view(STUDENT, TEACHER, ids=cut)
    assert TEACHER._tt.decode(got.teacher_ids[1:]) == "a"
    assert got.alignment[-1] == UNALIGNED and got.alignment[-2] == UNALIGNED  # nothing predicts the cut byte


def test_a_teacher_sequence_past_its_limit_is_cut_and_its_positions_unaligned():
    ids, full = view(STUDENT, TEACHER, "hello world the end")
    _, cut = view(STUDENT, TEACHER, "hello world the end", max_teacher_len=4)
    assert cut.teacher_ids == full.teacher_ids[:4]
    assert all(j == UNALIGNED or j < 3 for j in cut.alignment)
    assert [j for j in cut.alignment if j != UNALIGNED] == [j for j in full.alignment if j != UNALIGNED and j < 3]


def test_shared_vocabulary_pairs_equal_bytes_and_mapped_specials():
    student_ids, teacher_ids = cross_tokenizer.shared_vocabulary(TokenTable.from_tokenizer(STUDENT),
                                                                 TokenTable.from_tokenizer(TEACHER))
    s_pieces, t_pieces = STUDENT.pieces(student_ids.tolist()), TEACHER.pieces(teacher_ids.tolist())
    assert all(a == b for a, b in zip(s_pieces, t_pieces) if a is not None)
    shared_text = {p for p in s_pieces if p is not None}
    assert shared_text == ({bytes([b]) for b in range(256)} | {b"he", b"rl", b"rld"})
    assert (STUDENT.eos_id, TEACHER.eos_id) in list(zip(student_ids.tolist(), teacher_ids.tolist()))


def test_a_tokenizer_without_token_bytes_is_refused_by_name():
    class Opaque:
        special_tokens = {}

    with pytest.raises(ValueError, match="Opaque is not a byte-level tokenizer"):
        TokenTable.from_tokenizer(Opaque())


# ---------------------------------------------------------------------------------------------------------- losses


def reference_uld(student: torch.Tensor, teacher: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """float64: both distributions sorted in decreasing order (a full sort), the first k (at most the smaller
    vocabulary) compared in L1."""
    k = min(k, student.shape[-1], teacher.shape[-1])
    p_s = torch.softmax(student.double() / temperature, -1).sort(-1, descending=True).values[:, :k]
    p_t = torch.softmax(teacher.double() / temperature, -1).sort(-1, descending=True).values[:, :k]
    return (p_s - p_t).abs().sum(-1)


@pytest.mark.parametrize("k,temperature", [(5, 1.0), (64, 2.0)])
def test_uld_matches_the_float64_reference_value_and_gradient(k, temperature):
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(6, 40, generator=g) * 3).requires_grad_()
    teacher = torch.randn(6, 29, generator=g) * 3
    teacher[0, :5] = float("-inf")  # masked teacher logits are probability 0
    got = cross_tokenizer_loss.uld_distance(student, teacher, k, temperature)
    student64 = student.detach().double().requires_grad_()
    expected = reference_uld(student64, teacher, k, temperature)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)
    weights = torch.rand(6, generator=g)
    (grad,) = torch.autograd.grad((got * weights).sum(), student)
    (grad64,) = torch.autograd.grad((expected * weights.double()).sum(), student64)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-7)


def test_uld_is_zero_for_permuted_equal_distributions():
    z = torch.randn(3, 17)
    assert float(cross_tokenizer_loss.uld_distance(z[:, torch.randperm(17)], z, 17).abs().max()) < 1e-6


def test_the_same_vocabulary_twice_with_uld_off_is_the_plain_divergence():
    g = torch.Generator().manual_seed(1)
    vocab = 23
    student, teacher = torch.randn(2, 5, vocab, generator=g), torch.randn(2, 5, vocab, generator=g)
    labels = torch.randint(0, vocab, (2, 5), generator=g)
    labels[0, 0] = -100
    ids = torch.arange(vocab)
    for divergence in (kd_losses.ForwardKLLoss(), kd_losses.JSDistanceLoss(), kd_losses.ReverseKLLoss()):
        loss = cross_tokenizer_loss.CrossTokenizerKD(divergence, ids, ids, uld_weight=0.0)
        sums = loss.token_sums(student, teacher, torch.ones(2, 5, dtype=torch.bool), labels)
        plain, _ = divergence.token_sum(student, teacher, labels)
        assert float(sums["kd"]) == pytest.approx(float(plain), rel=1e-6), type(divergence).__name__
        assert float(sums["aligned"]) == 9.0


def test_exact_part_is_the_divergence_renormalised_over_the_shared_tokens_and_unaligned_rows_add_nothing():
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(1, 4, 10, generator=g), torch.randn(1, 4, 7, generator=g)
    student_ids, teacher_ids = torch.tensor([0, 3, 4, 9]), torch.tensor([6, 0, 2, 1])
    aligned = torch.tensor([[True, False, True, True]])
    labels = torch.tensor([[1, 2, 3, -100]])
    sums = cross_tokenizer_loss.CrossTokenizerKD(kd_losses.ForwardKLLoss(), student_ids, teacher_ids,
                                                 exact_weight=1.0, uld_weight=0.5, uld_top_k=3).token_sums(
        student, teacher, aligned, labels)
    expected = 0.0
    for row in (0, 2):  # aligned and counted
        log_q = torch.log_softmax(student[0, row, student_ids].double(), -1)
        log_p = torch.log_softmax(teacher[0, row, teacher_ids].double(), -1)
        expected += float((log_p.exp() * (log_p - log_q)).sum())
        expected += 0.5 * float(reference_uld(student[0, row:row + 1], teacher[0, row:row + 1], 3, 1.0).sum())
    assert float(sums["kd"]) == pytest.approx(expected, rel=1e-5)
    assert float(sums["aligned"]) == 2.0
