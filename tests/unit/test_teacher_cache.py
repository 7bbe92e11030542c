"""core.teacher_cache's pieces: the top-k rows against a float64 reference, the config section, fingerprint
mismatch messages, shard writing and lookup, and the fused output pass against a cached teacher."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import kd_losses
from torchtune_kd.core import fused_output, loss_step, teacher_cache


def reference_rows(logits: torch.Tensor, k: int, T: float):
    """float64, probability space: top-k ids by probability, their log-probabilities at T, log(1 − Σ top-k), H(T=1)."""
    z = logits.double()
    p_t = torch.softmax(z / T, dim=-1)
    order = torch.argsort(p_t, dim=-1, descending=True)[:, :k]
    top = p_t.gather(-1, order)
    tail = 1.0 - top.sum(-1)
    p1 = torch.softmax(z, dim=-1)
    entropy = -(torch.where(p1 > 0, p1 * p1.log(), torch.zeros_like(p1))).sum(-1)
    return order, top.log(), tail, entropy


@pytest.mark.parametrize("k,T", [(1, 1.0), (5, 1.0), (5, 2.0), (40, 0.5)])
def test_topk_rows_match_a_float64_reference(k, T):
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(23, 41, generator=g) * 3
    rows = teacher_cache.topk_rows(logits, k, T)
    ids, logp, tail, entropy = reference_rows(logits, k, T)
    assert rows["ids"].dtype == torch.int32 and rows["ids"].shape == (23, k)
    assert torch.equal(rows["ids"].long(), ids)
    torch.testing.assert_close(rows["logprobs"].double(), logp, rtol=1e-5, atol=1e-5)
    # The tail is a logsumexp of the rest, not log(1 − Σ): exact even where 1 − Σ loses digits in fp32.
    torch.testing.assert_close(rows["log_tail"].double().exp(), tail, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(rows["entropy"].double(), entropy, rtol=1e-5, atol=1e-6)


def test_topk_rows_at_full_vocab_have_an_empty_tail_and_masked_logits_are_finite():
    logits = torch.randn(4, 9)
    rows = teacher_cache.topk_rows(logits, 9, 1.0)
    assert torch.isneginf(rows["log_tail"]).all()
    torch.testing.assert_close(rows["logprobs"].exp().sum(-1), torch.ones(4))
    masked = logits.clone()
    masked[:, 5:] = float("-inf")
    rows = teacher_cache.topk_rows(masked, 3, 1.0)
    assert torch.isfinite(rows["entropy"]).all() and torch.isfinite(rows["logprobs"]).all()
    rows = teacher_cache.topk_rows(masked, 7, 1.0)  # more ids than unmasked tokens
    assert torch.isneginf(rows["log_tail"]).all() and torch.isfinite(rows["entropy"]).all()


def test_section_problems_name_key_value_and_fix():
    problems = teacher_cache.section_problems(
        {"path": "", "top_k": 0, "dtype": "int8", "samples_per_shard": -1, "overwrite": "yes", "topk": 3}, vocab_size=100
    )
    text = "\n".join(problems)
    for expected in ("unknown key 'teacher_cache.topk'", "teacher_cache.path=''", "teacher_cache.top_k=0",
                     "teacher_cache.dtype='int8'", "teacher_cache.samples_per_shard=-1", "teacher_cache.overwrite='yes'"):
        assert expected in text
    assert teacher_cache.section_problems({"path": "x", "top_k": 101}, vocab_size=100) == [
        "teacher_cache.top_k=101 exceeds the vocabulary (100 tokens): use at most 100"
    ]
    assert teacher_cache.section_problems({"path": "x"}, vocab_size=100) == []
    assert "must be a mapping" in teacher_cache.section_problems("cache/x", vocab_size=None)[0]


def test_mismatches_name_each_difference():
    saved = {"teacher_model": {"a": 1}, "teacher_weights": {"model.safetensors": "aa"}, "tokenizer": {"files": {}},
             "max_seq_len": 256, "dataset": {"config": {}, "files": {}, "items": 10}, "tokenisation": "x",
             "ignore_index": -100, "vocab_size": 8, "top_k": 4, "temperature": 1.0}
    assert teacher_cache.mismatches(saved, dict(saved), path=Path("c"), config_hint="cfg.yaml") == []
    changed = {**saved, "teacher_weights": {"model.safetensors": "bb"}, "max_seq_len": 128, "temperature": 2.0,
               "dataset": {"config": {}, "files": {}, "items": 9}}
    problems = teacher_cache.mismatches(saved, changed, path=Path("c"), config_hint="cfg.yaml")
    assert len(problems) == 4
    assert any("teacher's weights" in p and "model.safetensors differ" in p for p in problems)
    assert any("cache: 256, config: 128" in p for p in problems)
    assert any("cache: 1.0, config: 2.0" in p for p in problems)
    assert any("items: cache 10, config 9" in p for p in problems)
    assert all("tune run recipes/cache_teacher.py --config cfg.yaml" in p for p in problems)
    # Absent teacher files and an unset top_k are not compared.
    relaxed = {**saved, "teacher_weights": None, "top_k": None}
    assert teacher_cache.mismatches(saved, relaxed, path=Path("c"), config_hint="x") == []


def test_item_hash_sees_tokens_and_labels():
    tokens, labels = torch.tensor([1, 2, 3]), torch.tensor([-100, 2, 3])
    base = teacher_cache.item_hash(tokens, labels)
    assert base == teacher_cache.item_hash(tokens.clone(), labels.clone()) and 0 <= base < 2**63
    assert base != teacher_cache.item_hash(torch.tensor([1, 2, 4]), labels)
    assert base != teacher_cache.item_hash(tokens, torch.tensor([1, 2, 3]))


def _write_cache(folder: Path, items, k: int, vocab: int, per_shard: int):
    """A cache of ``items`` (tokens, labels) with random teacher logits, written by the module's own writer."""
    settings = teacher_cache.CacheSettings(folder, k, "float32", per_shard, None, False)
    folder.mkdir(parents=True)
    fingerprint = {"top_k": k, "temperature": 1.0, "vocab_size": vocab}
    digest = teacher_cache.fingerprint_digest(fingerprint)
    g = torch.Generator().manual_seed(3)
    logits_per_item = []
    for shard in range(teacher_cache.num_shards(len(items), per_shard)):
        rows, hashes = [], []
        for tokens, labels in items[shard * per_shard: (shard + 1) * per_shard]:
            shifted = loss_step.shift_labels(labels[None], -100)[0]
            logits = torch.randn(len(tokens), vocab, generator=g)
            logits_per_item.append(logits)
            rows.append(teacher_cache.topk_rows(logits[shifted != -100], k, 1.0))
            hashes.append(teacher_cache.item_hash(tokens, labels))
        teacher_cache.write_shard(folder, shard, rows, hashes, dtype="float32", digest=digest, first_item=shard * per_shard)
    teacher_cache.write_manifest(folder, fingerprint_=fingerprint, stamps={}, settings_=settings, num_items=len(items), extra={})
    return logits_per_item


def test_lookup_places_each_items_rows_at_its_counted_positions(tmp_path):
    vocab, k = 13, 4
    items = [
        (torch.tensor([5, 6, 7, 8, 9]), torch.tensor([-100, -100, 7, 8, 9])),
        (torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3])),
        (torch.tensor([4, 4, 4, 4]), torch.tensor([-100, -100, -100, -100])),  # nothing counted
    ]
    logits = _write_cache(tmp_path / "c", items, k, vocab, per_shard=2)
    cache = teacher_cache.TeacherCache(tmp_path / "c")
    assert cache.k == k and cache.num_items == 3
    order = [2, 0, 1]  # a shuffled batch, padded to 5 tokens
    tokens = torch.zeros(3, 5, dtype=torch.long)
    labels = torch.full((3, 5), -100)
    real = torch.zeros(3, 5, dtype=torch.bool)
    for b, item in enumerate(order):
        n = len(items[item][0])
        tokens[b, :n], labels[b, :n], real[b, :n] = items[item][0], items[item][1], True
    shifted = loss_step.shift_labels(labels, -100)
    teacher, entropy = cache.lookup(torch.tensor(order), shifted, tokens, real, labels)
    assert teacher.shape == (3, 5) and teacher.k == k
    for b, item in enumerate(order):
        n = len(items[item][0])
        expected = teacher_cache.topk_rows(logits[item], k, 1.0)
        for position in range(5):
            if shifted[b, position] == -100:
                assert entropy[b, position] == 0
                continue
            assert torch.equal(teacher.ids[b, position], expected["ids"][position])
            torch.testing.assert_close(teacher.logprobs[b, position], expected["logprobs"][position])
            torch.testing.assert_close(entropy[b, position], expected["entropy"][position])
        assert n <= 5
    # An item whose counted tokens changed is refused.
    labels2 = labels.clone()
    labels2[1, 2] = -100
    with pytest.raises(teacher_cache.CacheError, match="tokens differ"):
        cache.lookup(torch.tensor(order), loss_step.shift_labels(labels2, -100), tokens, real, labels2)
    with pytest.raises(teacher_cache.CacheError, match="not in the teacher cache"):
        cache.lookup(torch.tensor([7, 0, 1]), shifted, tokens, real, labels)


def test_missing_cache_is_a_clear_error(tmp_path):
    with pytest.raises(teacher_cache.CacheError, match="no complete teacher cache"):
        teacher_cache.TeacherCache(tmp_path)
    (tmp_path / teacher_cache.MANIFEST).write_text("{not json")
    with pytest.raises(teacher_cache.CacheError, match="cannot be read"):
        teacher_cache.TeacherCache(tmp_path)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_fused_pass_against_a_cached_teacher_equals_the_unfused_sparse_losses(T):
    """fused_output with a TeacherTopK: the same CE, KD (sparse form), diagnostics and gradients as the student's
    logits followed by ce_token_sum and the divergence's token_sum over the same TeacherTopK."""
    g = torch.Generator().manual_seed(5)
    rows, dim, vocab, k = 29, 8, 31, 6
    hidden = torch.randn(rows, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) * 0.5
    teacher_logits = torch.randn(rows, vocab, generator=g) * 2
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[::4] = -100
    cached = teacher_cache.topk_rows(teacher_logits, k, T)
    teacher = kd_losses.TeacherTopK(cached["ids"], cached["logprobs"].half(), cached["log_tail"], T)
    loss = kd_losses.JSDistanceLoss(temperature=T, lambda_weight=0.3)
    ce_coef, kd_coef = 0.4 / 22, 0.6 / 22

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    sums = fused_output.fused_output_token_sums(
        h1, w1, teacher, None, labels, loss, ce_coef=ce_coef, kd_coef=kd_coef, chunk_size=7,
        teacher_entropy=cached["entropy"],
    )
    sums["objective"].backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = h2 @ w2.t()
    ce = loss_step.ce_token_sum(logits, labels, -100)
    kd, _ = loss.token_sum(logits, teacher, labels)
    (ce * ce_coef + kd * kd_coef).backward()
    keep = labels != -100
    agree = ((logits.argmax(-1) == cached["ids"][:, 0].long()) & keep).sum()

    assert sums["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert sums["kd"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert sums["agree"].item() == agree.item()
    assert sums["teacher_entropy"].item() == pytest.approx(cached["entropy"][keep].sum().item(), rel=1e-6)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-7)
    assert math.isfinite(sums["objective"].item())
