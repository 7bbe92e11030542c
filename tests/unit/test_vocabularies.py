"""A teacher padded past the student's vocabulary (``core.vocabularies``) and the pre-flight that admits it
(``config_checks.vocab``): every reference is written here from the definitions, in float64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import kd_losses
from torchtune_kd.core import output_pass, teacher_source, vocabularies
from torchtune_kd.core.config_checks import vocab
from torchtune_kd.testing import standin_text

IGNORE = -100
SHARED, PADDED = 48, 56


def reference_padding_mass(logits: torch.Tensor, labels: torch.Tensor, shared: int) -> float:
    p = torch.softmax(logits.double(), dim=-1)
    return float(p[..., shared:].sum(-1)[labels != IGNORE].sum())


def reference_forward_kl(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> float:
    """Σ over counted tokens of KL(p_t ‖ p_s), p_t the teacher renormalised over the student's rows."""
    log_q = torch.log_softmax(student.double(), -1)
    log_p = torch.log_softmax(teacher.double(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return float(kl[labels != IGNORE].sum())


def batch_and_labels(seed: int = 0, bsz: int = 2, seq: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, SHARED, (bsz, seq), generator=g)
    labels[0, :2] = IGNORE
    labels[1, -1] = IGNORE
    return torch.randn(bsz, seq, PADDED, generator=g) * 3, labels


class FixedSource(teacher_source.TeacherSource):
    """The teacher's full-vocabulary signal, given."""

    def __init__(self, logits: torch.Tensor, hidden: torch.Tensor | None = None, weight: torch.Tensor | None = None):
        self.logits, self.hidden, self.weight = logits, hidden, weight

    def signal(self, batch, labels, *, form, diagnostics=False):
        if form == teacher_source.HIDDEN:
            return teacher_source.TeacherHidden(self.hidden, self.weight)
        return teacher_source.TeacherLogits(self.logits)


def test_padding_mass_matches_the_float64_definition_whole_and_chunked():
    logits, labels = batch_and_labels()
    logits[0, 3, 5] = float("-inf")  # a masked logit stays finite in the sum
    expected = reference_padding_mass(logits, labels, SHARED)
    whole = vocabularies.padding_mass_sum(logits, SHARED, labels, IGNORE)
    chunked = vocabularies.padding_mass_sum(list(logits.chunk(7, dim=1)), SHARED, labels, IGNORE)
    assert whole.dtype == torch.float32
    assert float(whole) == pytest.approx(expected, rel=1e-5)
    assert float(chunked) == pytest.approx(expected, rel=1e-5)


def test_padding_mass_from_hidden_states_equals_the_one_from_logits(monkeypatch):
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(2, 9, 8, generator=g), torch.randn(PADDED, 8, generator=g)
    labels = torch.randint(0, SHARED, (2, 9), generator=g)
    labels[1, :4] = IGNORE
    monkeypatch.setattr(vocabularies, "_MASS_ROWS", 5)  # several row blocks, one of them all ignored
    mass = vocabularies.padding_mass_sum_hidden(hidden, weight, SHARED, labels, IGNORE)
    assert float(mass) == pytest.approx(reference_padding_mass(hidden @ weight.T, labels, SHARED), rel=1e-5)


def test_padded_logits_give_the_divergence_of_hand_sliced_logits():
    teacher_logits, labels = batch_and_labels(seed=2)
    student_logits = torch.randn(2, 7, SHARED, generator=torch.Generator().manual_seed(3), requires_grad=True)
    source = vocabularies.PaddedVocabTeacher(FixedSource(teacher_logits), shared=SHARED, ignore_index=IGNORE)
    signal = source.signal({}, labels, form=teacher_source.LOGITS, diagnostics=True)
    assert signal.logits.shape[-1] == SHARED
    kd, _ = kd_losses.ForwardKLLoss(ignore_index=IGNORE).token_sum(student_logits, signal.logits, labels)
    assert float(kd.detach()) == pytest.approx(reference_forward_kl(student_logits.detach(), teacher_logits[..., :SHARED], labels), rel=1e-5)
    assert float(signal.extra_sums[vocabularies.PADDING_MASS]) == pytest.approx(
        reference_padding_mass(teacher_logits, labels, SHARED), rel=1e-5
    )
    # No diagnostics: nothing measured, the same signal.
    plain = source.signal({}, labels, form=teacher_source.LOGITS)
    assert not plain.extra_sums and torch.equal(plain.logits, signal.logits)


def test_fused_pass_on_a_padded_teacher_equals_the_unfused_pass_on_sliced_logits():
    g = torch.Generator().manual_seed(4)
    hidden_t, weight_t = torch.randn(2, 7, 8, generator=g), torch.randn(PADDED, 8, generator=g)
    hidden_s = torch.randn(2, 7, 6, generator=g, requires_grad=True)
    weight_s = torch.randn(SHARED, 6, generator=g)
    _, labels = batch_and_labels(seed=5)
    source = vocabularies.PaddedVocabTeacher(
        FixedSource(hidden_t @ weight_t.T, hidden_t, weight_t), shared=SHARED, ignore_index=IGNORE
    )
    loss = kd_losses.ForwardKLLoss(ignore_index=IGNORE)
    fused = output_pass.FusedPass(loss, student_weight=lambda: weight_s, chunk_size=5)
    signal = source.signal({}, labels, form=teacher_source.HIDDEN, diagnostics=True)
    assert signal.weight.shape == (SHARED, 8)
    sums = fused.token_sums(hidden_s, signal, labels, {"ce": torch.tensor(0.0), "kd": torch.tensor(1.0)},
                            diagnostics=False)
    expected = reference_forward_kl(hidden_s.detach() @ weight_s.T, (hidden_t @ weight_t.T)[..., :SHARED], labels)
    assert float(sums["kd"]) == pytest.approx(expected, rel=1e-4)
    assert float(signal.extra_sums[vocabularies.PADDING_MASS]) == pytest.approx(
        reference_padding_mass(hidden_t @ weight_t.T, labels, SHARED), rel=1e-5
    )


def test_a_sparse_signal_is_not_wrapped():
    class TopKSource(teacher_source.TeacherSource):
        def signal(self, batch, labels, *, form, diagnostics=False):
            return kd_losses.TeacherTopK(torch.zeros(1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1), torch.zeros(1, 1))

    with pytest.raises(TypeError, match="teacher cache stores the shared rows"):
        vocabularies.PaddedVocabTeacher(TopKSource(), SHARED, IGNORE).signal({}, None, form=teacher_source.LOGITS)


def test_padding_mass_warning_only_above_the_threshold():
    assert vocabularies.padding_mass_warning(1e-4, 1280) is None
    message = vocabularies.padding_mass_warning(0.3, 1280)
    assert "0.3" in message and "1280" in message and "may not be padding" in message


# ------------------------------------------------------------------------------------------------ the pre-flight


def sizes_cfg(**extra) -> OmegaConf:
    return OmegaConf.create({"tokenizer": {"_component_": "t", "path": "a"}, **extra})


def test_equal_sizes_need_nothing():
    found = vocab.check_sizes(sizes_cfg(), 1280, 1280)
    assert found.ok and found.shared_vocab is None and not found.notices


def test_a_larger_teacher_without_teacher_tokenizer_is_refused_with_both_fixes():
    found = vocab.check_sizes(sizes_cfg(), 151936, 152064)
    (problem,) = found.problems
    assert "151936" in problem and "152064" in problem and "teacher_tokenizer" in problem
    assert "Teachers with another tokenizer" in problem


def test_a_larger_teacher_with_teacher_tokenizer_compares_the_shared_rows():
    found = vocab.check_sizes(sizes_cfg(teacher_tokenizer={"_component_": "t", "path": "b"}), 151936, 152064)
    assert found.ok and found.shared_vocab == 151936
    assert "128 rows" in found.notices[0] and "kd/teacher_padding_mass" in found.notices[0]


def test_a_larger_student_is_refused():
    found = vocab.check_sizes(sizes_cfg(teacher_tokenizer={"_component_": "t"}), 1344, 1280)
    assert "model has more vocabulary rows (1344) than teacher_model (1280)" in found.problems[0]


def test_teacher_tokenizer_must_be_a_section():
    found = vocab.check_sizes(sizes_cfg(teacher_tokenizer="llama3"), 1280, 1344)
    assert "teacher_tokenizer='llama3' must be a tokenizer section" in found.problems[0]


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    standin_text.build_tokenizer(root / "a", bpe_vocab_size=1024)
    standin_text.build_tokenizer(root / "b", bpe_vocab_size=900)
    return root / "a", root / "b"


def section(folder: Path) -> dict:
    return {"_component_": "torchtune.models.llama3.llama3_tokenizer", "path": str(folder / "tokenizer.model"),
            "special_tokens_path": str(folder / "tokenizer.json")}


def samples(tokenizer, texts=("Hello, wörld: café ünïcode.", "  leading spaces and 12345 digits")) -> list:
    return [{"tokens": tokenizer.encode(text, add_bos=True, add_eos=True)} for text in texts]


def test_the_same_tokenizer_from_other_files_is_proved_the_same(two_tokenizers, tmp_path):
    first, _ = two_tokenizers
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    tokenizer = standin_text.standin_tokenizer(first)
    cfg = OmegaConf.create({"tokenizer": section(first), "teacher_tokenizer": section(copy)})
    found = vocab.check_tokenizers(cfg, tokenizer, samples(tokenizer), shared_vocab=1280, teacher_vocab=1344)
    assert found.ok, found.problems


def test_another_tokenizer_is_refused_with_the_first_difference(two_tokenizers):
    first, second = two_tokenizers
    tokenizer = standin_text.standin_tokenizer(first)
    cfg = OmegaConf.create({"tokenizer": section(first), "teacher_tokenizer": section(second)})
    found = vocab.check_tokenizers(cfg, tokenizer, samples(tokenizer), shared_vocab=1280, teacher_vocab=1344)
    (problem,) = found.problems
    assert "teacher_tokenizer is another tokenizer than tokenizer" in problem
    assert "Teachers with another tokenizer" in problem


def test_a_tokenizer_emitting_ids_past_the_shared_rows_is_refused(two_tokenizers):
    first, _ = two_tokenizers
    tokenizer = standin_text.standin_tokenizer(first)
    cfg = OmegaConf.create({"tokenizer": section(first), "teacher_tokenizer": section(first)})
    highest = vocab.highest_token_id(tokenizer)
    assert highest is not None and highest >= 1024  # the special tokens sit after the BPE ids
    found = vocab.check_tokenizers(cfg, tokenizer, samples(tokenizer), shared_vocab=highest, teacher_vocab=highest + 8)
    assert f"can emit ids up to {highest}" in found.problems[0]
    assert vocab.check_tokenizers(cfg, tokenizer, [], shared_vocab=highest + 1, teacher_vocab=highest + 8).ok


def test_tokenizer_difference_names_the_special_ids():
    class Tok:
        def __init__(self, bos):
            self.bos_id, self.eos_id, self.pad_id = bos, 2, 0

    assert vocab.tokenizer_difference(Tok(1), Tok(5), []) == "bos_id is 1 for tokenizer and 5 for teacher_tokenizer"
