"""A nan in the logits must show as a nan loss, never as 0 (a diverged model must not look like a perfect match).

The ``0·log 0 = 0`` convention (for -inf, masked-vocabulary logits) is applied where a probability is exactly 0;
it once swallowed every nan instead, so on the training path (student logits that require grad) a token with nan
logits added 0 to the loss. Ignored tokens are dropped whatever they hold: ``test_losses_reference.py`` covers
padding rows of -inf / nan and the finite values and gradients of masked vocabularies.
"""

from __future__ import annotations

import math

import pytest
import torch

import kd_losses

BSZ, SEQ, VOCAB, CHUNKS = 2, 8, 23, 4
NAN_TOKEN = (0, 3)  # inside the second chunk, so chunking has to carry it too


def _inputs(nan_in: str, ignore_nan_token: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(BSZ, SEQ, VOCAB, generator=g) * 3
    teacher = torch.randn(BSZ, SEQ, VOCAB, generator=g) * 3
    # Masked vocabulary entries in every row: the 0·log 0 convention is active wherever the nan is.
    student[..., -2:] = teacher[..., -2:] = float("-inf")
    labels = torch.randint(0, VOCAB, (BSZ, SEQ), generator=g)
    labels[1, 6] = -100
    (student if nan_in == "student" else teacher)[NAN_TOKEN + (5,)] = float("nan")
    if ignore_nan_token:
        labels[NAN_TOKEN] = -100
    return student, teacher, labels


def _loss_and_grad(loss: torch.nn.Module, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                   requires_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The loss (through the hand-derived-gradient path when ``requires_grad``) and the student's gradient."""
    leaf = student.clone().requires_grad_(requires_grad)
    if isinstance(loss, kd_losses.ChunkedOutputMixin):
        value = loss(list(leaf.chunk(CHUNKS, dim=1)), list(teacher.chunk(CHUNKS, dim=1)), labels)
    else:
        value = loss(leaf, teacher, labels)
    if not requires_grad:
        return value, None
    value.backward()
    return value, leaf.grad


def _make(name: str, chunked: bool, **kwargs) -> torch.nn.Module:
    plain, chunked_cls = kd_losses.DIVERGENCES[name]
    return chunked_cls(num_output_chunks=CHUNKS, **kwargs) if chunked else plain(**kwargs)


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("nan_in", ["student", "teacher"])
@pytest.mark.parametrize("chunked", [False, True], ids=["unchunked", "chunked"])
@pytest.mark.parametrize("name", list(kd_losses.DIVERGENCES))
def test_nan_logits_give_a_nan_loss_when_counted(name, chunked, nan_in, requires_grad):
    student, teacher, labels = _inputs(nan_in, ignore_nan_token=False)
    value, grad = _loss_and_grad(_make(name, chunked), student, teacher, labels, requires_grad)
    assert math.isnan(value.item()), f"{name}: a nan {nan_in} logit gave {value.item()}"
    if grad is not None:
        # The damage stays in its own token: every other row's gradient is what it would be without the nan.
        clean_value, clean_grad = _loss_and_grad(_make(name, chunked), *_inputs(nan_in, ignore_nan_token=True), True)
        others = torch.ones(BSZ, SEQ, dtype=torch.bool)
        others[NAN_TOKEN] = False
        assert torch.isfinite(grad[others]).all()
        # Same per-token gradients up to the 1/count of the mean (one more counted token here).
        count = int((labels != -100).sum())
        torch.testing.assert_close(grad[others] * count, clean_grad[others] * (count - 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("nan_in", ["student", "teacher"])
@pytest.mark.parametrize("chunked", [False, True], ids=["unchunked", "chunked"])
@pytest.mark.parametrize("name", list(kd_losses.DIVERGENCES))
def test_nan_logits_of_an_ignored_token_are_dropped(name, chunked, nan_in, requires_grad):
    student, teacher, labels = _inputs(nan_in, ignore_nan_token=True)
    value, grad = _loss_and_grad(_make(name, chunked), student, teacher, labels, requires_grad)
    assert math.isfinite(value.item())
    if grad is not None:
        assert torch.isfinite(grad).all()
        assert torch.equal(grad[NAN_TOKEN], torch.zeros(VOCAB))


@pytest.mark.parametrize(
    "name, kwargs",
    [("jsd", {"lambda_weight": 0.0}), ("jsd", {"lambda_weight": 1.0}), ("symmetric_kl", {"lambda_weight": 0.0}),
     ("symmetric_kl", {"lambda_weight": 1.0}), ("skew_kl", {"alpha": 0.0}), ("skew_kl", {"alpha": 1.0}),
     ("skew_reverse_kl", {"alpha": 0.0}), ("skew_reverse_kl", {"alpha": 1.0}), ("forward_kl", {"temperature": 2.0})],
)
@pytest.mark.parametrize("nan_in", ["student", "teacher"])
def test_nan_shows_at_extreme_weights_too(name, kwargs, nan_in):
    """JSD at λ ∈ {0, 1} and the skew KLs at α = 1 are identically 0 and read one input only: a nan still shows."""
    student, teacher, labels = _inputs(nan_in, ignore_nan_token=False)
    for chunked in (False, True):
        for requires_grad in (True, False):
            value, _ = _loss_and_grad(_make(name, chunked, **kwargs), student, teacher, labels, requires_grad)
            assert math.isnan(value.item()), (chunked, requires_grad)
    _, _, clean_labels = _inputs(nan_in, ignore_nan_token=True)
    for requires_grad in (True, False):
        value, _ = _loss_and_grad(_make(name, False, **kwargs), student, teacher, clean_labels, requires_grad)
        assert math.isfinite(value.item())


@pytest.mark.parametrize("name", list(kd_losses.DIVERGENCES))
@pytest.mark.parametrize("nan_in", ["student", "teacher"])
def test_per_token_and_value_and_grad_mark_exactly_the_nan_row(name, nan_in):
    """Both definitions of the per-token value agree on which row is nan; every other row stays finite."""
    student, teacher, _ = _inputs(nan_in, ignore_nan_token=False)
    s_logp = torch.log_softmax(student.reshape(-1, VOCAB), -1)
    t_logp = torch.log_softmax(teacher.reshape(-1, VOCAB), -1)
    loss = _make(name, False)
    expected = torch.zeros(BSZ * SEQ, dtype=torch.bool)
    expected[NAN_TOKEN[0] * SEQ + NAN_TOKEN[1]] = True
    per_token = loss.per_token(s_logp, t_logp)
    values, _ = loss.value_and_grad(s_logp.clone(), t_logp.clone())
    for got in (per_token, values):
        assert torch.equal(torch.isnan(got), expected)
        assert torch.isfinite(got[~expected]).all()


# ------------------------------------------------------------------------------------ hidden-state (IR) losses


@pytest.mark.parametrize("loss_cls", [kd_losses.CosineIRLoss, kd_losses.MSEIRLoss])
@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("nan_in", ["student", "teacher"])
@pytest.mark.parametrize("mask_kind", ["bool", "labels"])
def test_ir_losses_propagate_nan_and_drop_it_when_masked(loss_cls, layer_norm, nan_in, mask_kind):
    """A counted token with a nan hidden state gives a nan IR loss; a masked one changes nothing, gradient included."""
    g = torch.Generator().manual_seed(1)
    student = torch.randn(BSZ, SEQ, 16, generator=g)
    teacher = torch.randn(BSZ, SEQ, 16, generator=g)
    (student if nan_in == "student" else teacher)[NAN_TOKEN + (7,)] = float("nan")
    keep = torch.ones(BSZ, SEQ, dtype=torch.bool)
    loss = loss_cls(layer_norm=layer_norm)

    def mask(counted: bool) -> torch.Tensor:
        kept = keep.clone()
        kept[NAN_TOKEN] = counted
        if mask_kind == "bool":
            return kept
        return torch.where(kept, torch.zeros(BSZ, SEQ, dtype=torch.long), torch.full((BSZ, SEQ), -100))

    leaf = student.clone().requires_grad_(True)
    assert math.isnan(loss(leaf, teacher, mask(counted=True)).item())
    leaf = student.clone().requires_grad_(True)
    value = loss(leaf, teacher, mask(counted=False))
    value.backward()
    assert math.isfinite(value.item())
    # Nor does the dropped token's nan leak into the student's gradient (0·nan in a where()'s backward).
    assert torch.isfinite(leaf.grad).all()
    assert torch.equal(leaf.grad[NAN_TOKEN], torch.zeros(16))
