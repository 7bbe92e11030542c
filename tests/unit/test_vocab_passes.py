"""The pass counter behind the README's list of passes over [tokens, vocab] per step."""

import pytest
import torch

from torchtune_kd.testing.vocab_passes import VocabPasses

TOKENS, VOCAB, DIM = 12, 50, 8


def test_each_operation_counts_its_share_of_a_full_logits_tensor():
    h, w = torch.randn(TOKENS, DIM), torch.randn(VOCAB, DIM)
    with VocabPasses(VOCAB, TOKENS, [w]) as counter:
        for rows in h.split(4):  # three chunks of a third each
            logits = rows @ w.t()
            logp = torch.log_softmax(logits, dim=-1)
            logp.gather(1, torch.zeros(rows.shape[0], 1, dtype=torch.long))  # the label's logit: not a pass
    assert counter.passes["mm"] == pytest.approx(1.0)
    assert counter.passes["_log_softmax"] == pytest.approx(1.0)
    assert "gather" not in counter.passes and counter.total == pytest.approx(2.0)


def test_the_weights_views_and_small_tensors_are_not_passes():
    w = torch.randn(VOCAB, DIM)
    with VocabPasses(VOCAB, TOKENS, [w]) as counter:
        w.t().sum()  # the output weight's transpose ends in vocab but is no logits tensor
        torch.randn(TOKENS, VOCAB).view(TOKENS * VOCAB)  # a view reads nothing (randn itself writes one)
        torch.randn(VOCAB).exp()  # one row
    assert counter.passes == {"randn": pytest.approx(1.0)}


def test_backward_is_counted_too():
    logits = torch.randn(TOKENS, VOCAB, requires_grad=True)
    with VocabPasses(VOCAB, TOKENS) as counter:
        torch.log_softmax(logits, dim=-1).sum().backward()
    assert counter.passes["_log_softmax_backward_data"] == pytest.approx(1.0)
