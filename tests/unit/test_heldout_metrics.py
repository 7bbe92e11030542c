"""Held-out metrics (perplexity, top-1 agreement, forward KL to the teacher) against a float64 computation written
from the definitions, on the stand-in teacher and student."""

from __future__ import annotations

import math

import pytest
import torch

from torchtune_kd.evaluation import heldout_metrics


def reference(teacher_dir: str, student_dir: str, windows: torch.Tensor) -> dict[str, float]:
    """float64, probability space: mean NLL, share of equal argmaxes, mean Σ p_t·log(p_t / p_s)."""
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        t = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float64).eval()(windows).logits[:, :-1]
        s = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float64).eval()(windows).logits[:, :-1]
    p_t, p_s = torch.softmax(t, -1), torch.softmax(s, -1)
    targets = windows[:, 1:]
    nll = -torch.log(p_s.gather(-1, targets.unsqueeze(-1))).mean().item()
    kl = (p_t * (p_t.log() - p_s.log())).sum(-1).mean().item()
    agree = (s.argmax(-1) == t.argmax(-1)).double().mean().item()
    return {"nll": nll, "kl": kl, "agree": agree}


def test_metrics_match_the_definitions(tiny_assets):
    teacher, student = tiny_assets["teacher_dir"], tiny_assets["student_dir"]
    text = tiny_assets["data"]["heldout_text"]
    results = heldout_metrics.evaluate_heldout(
        {"teacher": teacher, "student": student}, text, teacher="teacher", seq_len=40, max_windows=5, batch_size=2
    )
    windows = heldout_metrics.heldout_windows(teacher, open(text).read(), 40, 5)
    expected = reference(teacher, student, windows)
    got = results["student"]
    assert got["tokens"] == windows[:, 1:].numel()
    assert got["nll"] == pytest.approx(expected["nll"], rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(expected["nll"]), rel=1e-5)
    assert got["kl_to_teacher"] == pytest.approx(expected["kl"], rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(expected["agree"], abs=1e-9)
    assert got["kl_to_teacher"] > 0
    # The teacher against itself: KL exactly 0, full agreement.
    assert results["teacher"]["kl_to_teacher"] == 0.0 and results["teacher"]["top1_agreement"] == 1.0


def test_kl_sum_is_zero_at_equality_and_handles_masked_tokens():
    logits = torch.randn(3, 5, 11)
    assert heldout_metrics.kl_sum(logits, logits) == 0.0
    masked = logits.clone()
    masked[..., 0] = float("-inf")  # a token the teacher never predicts contributes nothing
    value = heldout_metrics.kl_sum(masked, logits)
    assert math.isfinite(value) and value > 0
    p = torch.softmax(masked.double(), -1)
    q = torch.log_softmax(logits.double(), -1)
    expected = (p[..., 1:] * (p[..., 1:].log() - q[..., 1:])).sum().item()
    assert value == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("teacher_first", [True, False])
def test_kept_teacher_logits_give_the_same_results_with_one_teacher_pass(tiny_assets, monkeypatch, teacher_first):
    """Within the memory budget the teacher runs once per batch for every model; above it, once per model. The
    numbers are identical."""
    teacher, student = tiny_assets["teacher_dir"], tiny_assets["student_dir"]
    text = tiny_assets["data"]["heldout_text"]
    names = ["teacher", "student", "student_again"] if teacher_first else ["student", "student_again", "teacher"]
    dirs = {"teacher": teacher, "student": student, "student_again": student}
    models = {name: dirs[name] for name in names}
    calls = []
    real_load = heldout_metrics._load

    def counting_load(folder):
        model = real_load(folder)
        if str(folder) == str(teacher):
            model.register_forward_hook(lambda *_: calls.append(1))
        return model

    monkeypatch.setattr(heldout_metrics, "_load", counting_load)
    kept = heldout_metrics.evaluate_heldout(models, text, teacher="teacher", seq_len=40, max_windows=3, batch_size=2)
    kept_calls, calls[:] = len(calls), []
    recomputed = heldout_metrics.evaluate_heldout(models, text, teacher="teacher", seq_len=40, max_windows=3,
                                                  batch_size=2, keep_teacher_logits_bytes=0)
    assert kept == recomputed
    batches = 2  # 3 windows in batches of 2: the last one smaller
    assert kept_calls == batches and len(calls) == batches * 3


def test_on_policy_metrics_are_zero_kl_against_itself_and_reproducible(tiny_assets, assets_root, tmp_path):
    from torchtune_kd.testing.recipes import tiny_config

    cfg = tiny_config(assets_root, tmp_path / "out", [])
    prompts = heldout_metrics.dataset_prompts(cfg, tiny_assets["data"]["train"], 3)
    assert len(prompts) == 3 and all(len(p) > 1 for p in prompts)  # the alpaca instruction, not just the BOS
    teacher, student = tiny_assets["teacher_dir"], tiny_assets["student_dir"]
    itself = heldout_metrics.evaluate_on_policy(teacher, teacher, prompts, max_new_tokens=5, batch_size=2)
    assert itself["onpolicy_kl"] == pytest.approx(0.0, abs=1e-6)
    assert 0 < itself["onpolicy_tokens"] <= 15 and itself["onpolicy_teacher_nll"] > 0
    first = heldout_metrics.evaluate_on_policy(student, teacher, prompts, max_new_tokens=5, batch_size=2)
    again = heldout_metrics.evaluate_on_policy(student, teacher, prompts, max_new_tokens=5, batch_size=2)
    assert first == again and first["onpolicy_kl"] > 0.01
    other_seed = heldout_metrics.evaluate_on_policy(student, teacher, prompts, max_new_tokens=5, batch_size=2, seed=1)
    assert other_seed != first


def test_bits_per_byte_is_the_nll_in_bits_over_the_texts_utf8_bytes(tiny_assets):
    student = tiny_assets["student_dir"]
    text_path = tiny_assets["data"]["heldout_text"]
    results = heldout_metrics.evaluate_heldout({"student": student}, text_path, seq_len=40, max_windows=5)
    windows = heldout_metrics.heldout_windows(student, open(text_path).read(), 40, 5)
    from transformers import AutoTokenizer

    # The windows' bodies are consecutive: together they decode to a prefix of the text, whose bytes are counted.
    covered = AutoTokenizer.from_pretrained(student).decode(windows[:, 1:].reshape(-1).tolist())
    assert open(text_path).read().startswith(covered)
    got = results["student"]
    assert got["bytes"] == len(covered.encode("utf-8"))
    assert got["bits_per_byte"] == pytest.approx(got["nll"] * got["tokens"] / (math.log(2) * got["bytes"]), rel=1e-9)


def test_token_byte_lengths_count_split_characters_and_no_special_token(tiny_assets):
    from transformers import AutoTokenizer

    folder = tiny_assets["student_dir"]
    lengths = heldout_metrics.token_byte_lengths(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for text in ("café", "日本語", " leading space", "naïve façade — ok"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert sum(lengths[i] for i in ids) == len(text.encode("utf-8")), text
    assert all(lengths[i] == 0 for i in tokenizer.all_special_ids)


def test_a_model_with_another_tokenizer_gets_bits_per_byte_but_no_teacher_comparison(tiny_assets, tmp_path):
    import shutil

    from torchtune_kd.testing import standin_text

    other = tmp_path / "student_other_tokenizer"
    shutil.copytree(tiny_assets["student_dir"], other)
    tokenizer_dir = tmp_path / "tokenizer"
    standin_text.build_tokenizer(tokenizer_dir, bpe_vocab_size=900)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, other / name)
    results = heldout_metrics.evaluate_heldout(
        {"teacher": tiny_assets["teacher_dir"], "other": other}, tiny_assets["data"]["heldout_text"],
        teacher="teacher", seq_len=40, max_windows=5,
    )
    assert "kl_to_teacher" not in results["other"] and "top1_agreement" not in results["other"]
    assert results["other"]["bits_per_byte"] > 0 and results["teacher"]["kl_to_teacher"] == 0.0
    # Another tokenizer reads more tokens for the same text: the bytes of its windows differ, each its own count.
    assert results["other"]["bytes"] > 0
