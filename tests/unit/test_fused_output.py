"""The fused output-layer + CE + KD pass against the unfused path (full logits, autograd) on the same inputs."""

from __future__ import annotations

import pytest
import torch

import kd_losses
from torchtune_kd.core import loss_step
from torchtune_kd.core.fused_output import fused_output_token_sums

VOCAB, DIM_S, DIM_T, ROWS = 53, 12, 20, 37
IGNORE = -100


def inputs(seed: int, *, dtype=torch.float32, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    h_s = (torch.randn(ROWS, DIM_S, generator=g) * scale).to(dtype).requires_grad_(True)
    w_s = (torch.randn(VOCAB, DIM_S, generator=g) * 0.5).to(dtype).requires_grad_(True)
    h_t = (torch.randn(ROWS, DIM_T, generator=g) * scale).to(dtype)
    w_t = (torch.randn(VOCAB, DIM_T, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, VOCAB, (ROWS,), generator=g)
    labels[[0, 5, 6, 30]] = IGNORE
    return h_s, w_s, h_t, w_t, labels


def unfused(h_s, w_s, h_t, w_t, labels, kd, ce_coef, kd_coef):
    logits = h_s @ w_s.T
    with torch.no_grad():
        teacher = h_t @ w_t.T
    ce = loss_step.ce_token_sum(logits, labels, IGNORE)
    value, _ = kd.token_sum(logits, teacher, labels)
    agree, entropy = loss_step.kd_health_sums(logits, teacher, labels, IGNORE)
    objective = ce_coef * ce + kd_coef * value
    objective.backward()
    return {"objective": objective.detach(), "ce": ce.detach(), "kd": value.detach(), "agree": agree,
            "teacher_entropy": entropy}


def fused(h_s, w_s, h_t, w_t, labels, kd, ce_coef, kd_coef, chunk_size):
    sums = fused_output_token_sums(h_s, w_s, h_t, w_t, labels, kd, ce_coef=ce_coef, kd_coef=kd_coef,
                                   chunk_size=chunk_size)
    sums["objective"].backward()
    return {k: v.detach() for k, v in sums.items()}


def clones(tensors):
    return [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]


@pytest.mark.parametrize("name", sorted(kd_losses.DIVERGENCES))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("chunk_size", [ROWS, 8])  # 8 does not divide 37: an uneven last chunk
def test_values_and_gradients_equal_the_unfused_path(name, temperature, chunk_size):
    kd = kd_losses.DIVERGENCES[name][0](temperature=temperature)
    base = inputs(1)
    a, b = clones(base), clones(base)
    ref = unfused(*a, kd, 0.3, 0.7)
    out = fused(*b, kd, 0.3, 0.7, chunk_size)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-5, msg=key)
    torch.testing.assert_close(b[0].grad, a[0].grad, rtol=1e-5, atol=1e-6)  # hidden states
    torch.testing.assert_close(b[1].grad, a[1].grad, rtol=1e-5, atol=1e-6)  # output weight
    assert b[2].grad is None and b[3].grad is None


def test_a_tied_weight_gets_the_gradients_of_both_uses():
    """Llama 3.2 ties the output projection to the token embedding: in a full fine-tune the embedding's gradient
    is the sum of what flows through the input lookup and through the output projection."""
    kd = kd_losses.JSDistanceLoss(temperature=1.5)
    g = torch.Generator().manual_seed(3)
    embedding = torch.randn(VOCAB, DIM_S, generator=g).requires_grad_(True)
    tokens = torch.randint(0, VOCAB, (ROWS,), generator=g)
    _, _, h_t, w_t, labels = inputs(4)
    mix = torch.randn(DIM_S, DIM_S, generator=g) * 0.3

    def run(use_fused: bool) -> torch.Tensor:
        weight = embedding.detach().clone().requires_grad_(True)
        hidden = torch.tanh(weight[tokens] @ mix)  # a stand-in for the decoder between lookup and output
        if use_fused:
            fused_output_token_sums(hidden, weight, h_t, w_t, labels, kd, ce_coef=0.5, kd_coef=0.5,
                                    chunk_size=10)["objective"].backward()
        else:
            unfused(hidden, weight, h_t, w_t, labels, kd, 0.5, 0.5)
        return weight.grad

    torch.testing.assert_close(run(True), run(False), rtol=1e-5, atol=1e-6)


def test_a_frozen_output_weight_gets_no_gradient_and_costs_none():
    kd = kd_losses.ForwardKLLoss()
    h_s, w_s, h_t, w_t, labels = inputs(5)
    w_s = w_s.detach()  # LoRA student without adapters on the output: only the hidden states train
    a, b = clones([h_s]), clones([h_s])
    unfused(a[0], w_s, h_t, w_t, labels, kd, 1.0, 1.0)
    fused(b[0], w_s, h_t, w_t, labels, kd, 1.0, 1.0, 16)
    torch.testing.assert_close(b[0].grad, a[0].grad, rtol=1e-5, atol=1e-6)


def test_every_token_ignored_gives_zero_sums_and_zero_gradients():
    kd = kd_losses.SymmetricKLLoss()
    h_s, w_s, h_t, w_t, labels = inputs(6)
    out = fused(h_s, w_s, h_t, w_t, torch.full_like(labels, IGNORE), kd, 0.5, 0.5, 8)
    assert all(float(v) == 0.0 for v in out.values())
    assert not h_s.grad.any() and not w_s.grad.any()


def test_large_logit_gaps_stay_finite_and_equal():
    """Logits of order 1e3 (saturated softmaxes): the log-space computations give the unfused values."""
    kd = kd_losses.JSDistanceLoss()
    base = inputs(7, scale=300.0)
    a, b = clones(base), clones(base)
    ref = unfused(*a, kd, 0.5, 0.5)
    out = fused(*b, kd, 0.5, 0.5, 8)
    assert all(torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(out["objective"], ref["objective"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(b[0].grad, a[0].grad, rtol=1e-4, atol=1e-4)


def test_bf16_inputs_are_at_least_as_accurate_as_the_unfused_bf16_path():
    """bf16 models: both paths against an fp32 computation on the same (bf16-representable) values. The fused pass
    keeps the logit gradient in fp32 through the matmuls, the unfused one rounds it to bf16 first."""
    kd = kd_losses.ReverseKLLoss(temperature=2.0)
    base = inputs(8, dtype=torch.bfloat16)
    a, b = clones(base), clones(base)
    exact = [t.detach().float().requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in base]
    ref = unfused(*exact, kd, 0.4, 0.6)
    bf16 = unfused(*a, kd, 0.4, 0.6)
    out = fused(*b, kd, 0.4, 0.6, 8)
    assert out["objective"].dtype == torch.float32
    assert b[0].grad.dtype == torch.bfloat16 and b[1].grad.dtype == torch.bfloat16
    for key in ("objective", "ce", "kd"):
        assert abs(float(out[key] - ref[key])) <= abs(float(bf16[key] - ref[key])) + 1e-3 * abs(float(ref[key])), key
    for index in (0, 1):
        fused_error = (b[index].grad.float() - exact[index].grad).abs().max()
        unfused_error = (a[index].grad.float() - exact[index].grad).abs().max()
        assert fused_error <= unfused_error * 1.05 + 1e-6, (index, float(fused_error), float(unfused_error))


def test_backward_scales_by_the_incoming_gradient():
    kd = kd_losses.TVDistanceLoss()
    base = inputs(9)
    a, b = clones(base), clones(base)
    fused_output_token_sums(*a, kd, ce_coef=0.2, kd_coef=0.8, chunk_size=8)["objective"].backward()
    (fused_output_token_sums(*b, kd, ce_coef=0.2, kd_coef=0.8, chunk_size=8)["objective"] * 3.0).backward()
    torch.testing.assert_close(b[0].grad, a[0].grad * 3.0)
    torch.testing.assert_close(b[1].grad, a[1].grad * 3.0)


def test_bad_shapes_are_refused():
    kd = kd_losses.ForwardKLLoss()
    h_s, w_s, h_t, w_t, labels = inputs(10)
    with pytest.raises(ValueError, match="vocab size 53 != teacher vocab size 52"):
        fused_output_token_sums(h_s, w_s, h_t, w_t[:-1], labels, kd, ce_coef=1, kd_coef=1)
    with pytest.raises(ValueError, match="same tokens"):
        fused_output_token_sums(h_s, w_s, h_t[:-1], w_t, labels, kd, ce_coef=1, kd_coef=1)
    with pytest.raises(ValueError, match="chunk_size=0"):
        fused_output_token_sums(h_s, w_s, h_t, w_t, labels, kd, ce_coef=1, kd_coef=1, chunk_size=0)


def test_a_nan_hidden_state_makes_every_sum_nan():
    """A diverged student must not look like a perfect match: NaN reaches CE and KD (the recipe then stops)."""
    kd = kd_losses.JSDistanceLoss()
    h_s, w_s, h_t, w_t, labels = inputs(11)
    h_s = h_s.detach().clone()
    h_s[3, 0] = float("nan")
    out = fused_output_token_sums(h_s, w_s.detach(), h_t, w_t, labels, kd, ce_coef=0.5, kd_coef=0.5, chunk_size=8)
    assert torch.isnan(out["ce"]) and torch.isnan(out["kd"]) and torch.isnan(out["objective"])


# ------------------------------------------------------------------------------------------ chunk size from shapes


@pytest.mark.parametrize("rows, vocab, hidden", [
    (1, 1280, 64), (1024, 32000, 256), (1024, 128256, 256), (8192, 128256, 2048), (16384, 128256, 2048),
    (8192, 151936, 896), (4096, 49152, 576), (3000, 1000, 4096),
])
def test_the_auto_chunk_size_follows_vocab_over_hidden(rows, vocab, hidden):
    from torchtune_kd.core.fused_output import MIN_AUTO_CHUNK_ROWS, auto_chunk_size

    size = auto_chunk_size(rows, vocab, hidden)
    assert size >= MIN_AUTO_CHUNK_ROWS and size & (size - 1) == 0  # a power of two, never below the floor
    if size > MIN_AUTO_CHUNK_ROWS:
        # Above the floor: rows / ceil(vocab / hidden) rounded up to a power of two (one chunk's logits about the
        # size of the hidden states).
        chunks = -(-vocab // hidden)
        assert size // 2 < -(-rows // chunks) <= size
    # It scales with the step: more tokens never give smaller chunks.
    assert auto_chunk_size(2 * rows, vocab, hidden) >= size


def test_the_auto_chunk_size_at_llama_3_shapes():
    from torchtune_kd.core.fused_output import auto_chunk_size

    # 1B student (2048 wide), 4 x 2048 tokens: 63 chunks of 131 rows -> 256; the logits chunk is 256 x 128,256.
    assert auto_chunk_size(8192, 128256, 2048) == 256
    assert auto_chunk_size(65536, 128256, 2048) == 2048


def test_chunk_size_none_is_the_auto_size_and_the_same_values():
    kd = kd_losses.ForwardKLLoss()
    base = inputs(4)
    a, b = clones(base), clones(base)
    auto = fused(*a, kd, 0.4, 0.6, None)
    from torchtune_kd.core.fused_output import auto_chunk_size

    explicit = fused(*b, kd, 0.4, 0.6, auto_chunk_size(ROWS, VOCAB, DIM_S))
    for key in auto:
        torch.testing.assert_close(auto[key], explicit[key], rtol=0, atol=0)
    torch.testing.assert_close(a[0].grad, b[0].grad, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["forward_kl", "jsd"])
def test_without_diagnostics_the_losses_and_gradients_are_unchanged(name):
    kd = kd_losses.DIVERGENCES[name][0](temperature=2.0)
    base = inputs(5)
    a, b = clones(base), clones(base)
    full = fused(*a, kd, 0.3, 0.7, 8)
    sums = fused_output_token_sums(*b, kd, ce_coef=0.3, kd_coef=0.7, chunk_size=8, diagnostics=False)
    sums["objective"].backward()
    assert set(sums) == {"objective", "ce", "kd"}
    for key in sums:
        torch.testing.assert_close(sums[key].detach(), full[key], rtol=0, atol=0)
    torch.testing.assert_close(b[0].grad, a[0].grad, rtol=0, atol=0)
    torch.testing.assert_close(b[1].grad, a[1].grad, rtol=0, atol=0)
