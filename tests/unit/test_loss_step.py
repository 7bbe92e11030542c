"""Per-micro-batch pieces: label shifting, token-sum CE, KD health diagnostics (float64 references)."""

import pytest
import torch

from torchtune_kd.core import loss_step


def test_shift_labels():
    labels = torch.tensor([[1, 2, 3], [4, 5, -100]])
    assert loss_step.shift_labels(labels, -100).tolist() == [[2, 3, -100], [5, -100, -100]]


def test_ce_token_sum_chunked_equals_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 8, 11, generator=g)
    labels = torch.randint(0, 11, (2, 8), generator=g)
    labels[0, :3] = -100
    keep = labels != -100
    logp = torch.log_softmax(logits.double(), -1)
    expected = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0][keep].sum()
    torch.testing.assert_close(loss_step.ce_token_sum(logits, labels, -100).double(), expected)
    torch.testing.assert_close(loss_step.ce_token_sum(list(logits.chunk(4, 1)), labels, -100).double(), expected)


def test_health_sums_match_reference_and_ignore_masked_rows():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 6, 9, generator=g)
    t = torch.randn(2, 6, 9, generator=g)
    t[..., -2:] = float("-inf")  # masked vocabulary in the teacher
    labels = torch.randint(0, 9, (2, 6), generator=g)
    labels[1] = -100
    keep = labels != -100
    pt = torch.softmax(t.double(), -1)
    entropy = -(torch.where(pt > 0, pt * pt.log(), torch.zeros_like(pt))).sum(-1)[keep].sum()
    agree = (s.argmax(-1) == t.argmax(-1))[keep].sum()
    for s_in, t_in in ((s, t), (list(s.chunk(3, 1)), list(t.chunk(3, 1)))):
        a, e = loss_step.kd_health_sums(s_in, t_in, labels, -100)
        assert int(a) == int(agree)
        torch.testing.assert_close(e.double(), entropy, rtol=1e-5, atol=1e-6)
    a, e = loss_step.kd_health_sums(s, t, torch.full_like(labels, -100), -100)
    assert float(a) == 0.0 and float(e) == 0.0


@pytest.mark.parametrize("log_every, every, due", [
    (1, 10, [1, 10, 20, 30]),
    (1, 1, list(range(1, 31))),
    (5, 2, [5, 10, 20, 30]),  # logged steps 5, 10, 15, ...: the first and every 2nd of them
    (4, 3, [4, 12, 24]),
])
def test_diagnostics_are_due_on_logged_steps_only(log_every, every, due):
    assert [s for s in range(1, 31) if loss_step.diagnostics_due(s, log_every, every)] == due
