"""Divergences against a sparse (top-k + tail) teacher, :class:`kd_losses.TeacherTopK`, checked from the definitions.

The reference here is independent of the code under test: it works in float64 *probability* space. The teacher's
top-k ids come from a float64 softmax of its logits; both distributions are coarsened to ``k + 1`` outcomes (the
top-k probabilities, then one tail bucket holding the rest of the mass); each divergence is written from its
definition over those outcomes with explicit mixtures ``m = w·p + (1 − w)·q`` and ``0·log 0 = 0``, times T². The
code instead works in fp32 log space (gather, scatter, logsumexp) with hand-derived gradients.

The tail bucket is formed as the sum of the probabilities *outside* the ids, which is ``1 − Σ top-k`` without the
cancellation that would turn an empty tail (``k = vocab``, or a masked vocabulary) into ±1e-17 instead of 0.
"""

from __future__ import annotations

import math

import pytest
import torch

import kd_losses

torch.set_default_dtype(torch.float32)

NAMES = list(kd_losses.DIVERGENCES)
VOCAB = 53


# --------------------------------------------------------------------------------------------------- reference


def ref_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ p·log(p/q) per row from float64 probabilities, with 0·log(0/q) = 0 (+inf where q = 0 < p).

    The logs only ever see entries where p > 0 (the others are replaced by 1 first), so autograd through this stays
    finite wherever the divergence is.
    """
    support = p > 0
    safe_p = torch.where(support, p, torch.ones_like(p))
    safe_q = torch.where(support, q, torch.ones_like(q))
    return torch.where(support, p * (safe_p.log() - safe_q.log()), torch.zeros_like(p)).sum(-1)


def ref_divergence(name: str, pt: torch.Tensor, ps: torch.Tensor, lam: float, alpha: float) -> torch.Tensor:
    """The divergence per row between teacher ``pt`` and student ``ps`` probabilities (float64), from its definition."""
    if name == "forward_kl":
        return ref_kl(pt, ps)
    if name == "reverse_kl":
        return ref_kl(ps, pt)
    if name == "symmetric_kl":
        return (1 - lam) * ref_kl(pt, ps) + lam * ref_kl(ps, pt)
    if name == "jsd":
        m = (1 - lam) * pt + lam * ps
        return lam * ref_kl(ps, m) + (1 - lam) * ref_kl(pt, m)
    if name == "tvd":
        return 0.5 * (pt - ps).abs().sum(-1)
    if name == "gkd_jsd":  # these tests pass β as ``lam``; GKD's definition with its endpoints
        beta = lam
        if beta in (0.0, 1.0):
            return ref_kl(pt, ps) if beta == 0.0 else ref_kl(ps, pt)
        m = beta * pt + (1 - beta) * ps
        return beta * ref_kl(pt, m) + (1 - beta) * ref_kl(ps, m)
    if name == "skew_kl":
        return ref_kl(pt, alpha * pt + (1 - alpha) * ps)
    if name == "skew_reverse_kl":
        return ref_kl(ps, alpha * ps + (1 - alpha) * pt)
    raise KeyError(name)


def ref_topk(t_logits: torch.Tensor, k: int, T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k ids (from a float64 softmax at temperature T) and its full float64 probabilities."""
    pt = torch.softmax(t_logits.double() / T, dim=-1)
    return pt.topk(k, dim=-1).indices, pt


def coarsen(p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``(..., k + 1)`` probabilities: p at the ids, then the total mass outside them."""
    return torch.cat((p.gather(-1, ids), p.scatter(-1, ids, 0.0).sum(-1, keepdim=True)), dim=-1)


def ref_per_token(name: str, s_logits: torch.Tensor, t_logits: torch.Tensor, k: int, *, T: float = 1.0,
                  lam: float = 0.5, alpha: float = 0.1) -> torch.Tensor:
    """Per-token coarsened divergence × T², rows ``(num_tokens, vocab)`` (differentiable in ``s_logits``)."""
    ids, pt = ref_topk(t_logits, k, T)
    ps = torch.softmax(s_logits.double() / T, dim=-1)
    return ref_divergence(name, coarsen(pt, ids), coarsen(ps, ids), lam, alpha) * T * T


def ref_mean(name, s_logits, t_logits, labels, k, **kw) -> torch.Tensor:
    vocab = s_logits.shape[-1]
    keep = labels.reshape(-1) != -100
    per = ref_per_token(name, s_logits.reshape(-1, vocab), t_logits.reshape(-1, vocab), k, **kw)
    return per[keep].sum() / max(int(keep.sum()), 1)


# ------------------------------------------------------------------------------------------------ teacher caches


def cache_from_reference(t_logits: torch.Tensor, k: int, T: float = 1.0, dtype=torch.float32) -> kd_losses.TeacherTopK:
    """The reference's own teacher (same ids), stored at ``dtype``: what the code is compared against."""
    ids, pt = ref_topk(t_logits, k, T)
    logprobs = pt.gather(-1, ids).log()
    log_tail = pt.scatter(-1, ids, 0.0).sum(-1).log()
    return kd_losses.TeacherTopK(ids, logprobs.to(dtype), log_tail.to(dtype), T)


def cache_fp32(t_logits: torch.Tensor, k: int, T: float = 1.0) -> kd_losses.TeacherTopK:
    """What a cache builder does in fp32: log-softmax, top-k, the tail as a logsumexp of the rest (-inf if none)."""
    logp = torch.log_softmax(t_logits.float() / T, dim=-1)
    values, ids = logp.topk(k, dim=-1)
    log_tail = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1)
    return kd_losses.TeacherTopK(ids, values, log_tail, T)


def row(teacher: kd_losses.TeacherTopK, index) -> kd_losses.TeacherTopK:
    return kd_losses.TeacherTopK(
        teacher.ids[index], teacher.logprobs[index], teacher.log_tail[index], teacher.temperature
    )


# ---------------------------------------------------------------------------------------------------- helpers


def make(name: str, *, T: float = 1.0, chunked: bool = False, chunks: int = 4, lam: float = 0.5, alpha: float = 0.1):
    plain, chunked_cls = kd_losses.DIVERGENCES[name]
    kwargs = {"temperature": T}
    if name in ("symmetric_kl", "jsd"):
        kwargs["lambda_weight"] = lam
    if name == "gkd_jsd":
        kwargs["beta"] = lam
    if name.startswith("skew"):
        kwargs["alpha"] = alpha
    return chunked_cls(num_output_chunks=chunks, **kwargs) if chunked else plain(**kwargs)


def inputs(shape=(37, VOCAB), seed=0, scale=3.0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g) * scale
    t = torch.randn(*shape, generator=g) * scale
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    labels.view(-1)[::ignore_every] = -100
    return s, t, labels


def value_and_grad(loss, student: torch.Tensor, teacher, labels: torch.Tensor):
    """The loss on the training path (student requires grad: the hand-derived gradient) and its gradient."""
    leaf = student.clone().requires_grad_(True)
    value = loss(leaf, teacher, labels)
    value.backward()
    return value.detach(), leaf.grad


def per_token_values(loss, student: torch.Tensor, teacher: kd_losses.TeacherTopK) -> torch.Tensor:
    """The loss of each row of ``(num_tokens, vocab)`` on its own, through the public API (one counted token)."""
    one = torch.zeros(1, dtype=torch.long)
    return torch.stack([loss(student[i : i + 1], row(teacher, slice(i, i + 1)), one) for i in range(student.shape[0])])


def per_token_dense(loss, student: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    one = torch.zeros(1, dtype=torch.long)
    return torch.stack([loss(student[i : i + 1], teacher_logits[i : i + 1], one) for i in range(student.shape[0])])


PARAMS = [
    pytest.param({"T": 1.0}, id="T1"),
    pytest.param({"T": 2.0, "lam": 0.3, "alpha": 0.25}, id="T2-lam.3-alpha.25"),
]


# ------------------------------------------------------------------------------- 1. k = vocab is the dense loss


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kw", PARAMS)
def test_full_vocabulary_cache_equals_dense_loss(name, kw):
    s, t, labels = inputs()
    loss = make(name, **kw)
    teacher = cache_fp32(t, VOCAB, kw["T"])
    assert teacher.k == VOCAB and torch.isneginf(teacher.log_tail).all()
    dense_value, dense_grad = value_and_grad(loss, s, t, labels)
    sparse_value, sparse_grad = value_and_grad(loss, s, teacher, labels)
    torch.testing.assert_close(sparse_value, dense_value, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(sparse_grad[labels == -100], torch.zeros_like(sparse_grad[labels == -100]))
    # the value-only path (per_token over the coarsened distributions) too
    with torch.no_grad():
        torch.testing.assert_close(loss(s, teacher, labels), dense_value, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------- 2. k < vocab against the float64 reference


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [1, 7, VOCAB - 1])
@pytest.mark.parametrize("kw", PARAMS)
@pytest.mark.parametrize("shape", [(37, VOCAB), (3, 7, VOCAB)], ids=["2d", "3d"])
def test_matches_coarsened_reference_value_and_gradient(name, k, kw, shape):
    s, t, labels = inputs(shape, seed=1)
    loss = make(name, **kw)
    teacher = cache_from_reference(t, k, kw["T"])
    value, grad = value_and_grad(loss, s, teacher, labels)
    s_ref = s.double().requires_grad_(True)
    expected = ref_mean(name, s_ref, t.double(), labels, k, **kw)
    expected.backward()
    assert expected.item() > 1e-3  # a non-trivial value
    torch.testing.assert_close(value.double(), expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), s_ref.grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # the value-only path
        torch.testing.assert_close(loss(s, teacher, labels).double(), expected.detach(), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------- 3. chunked equals unchunked, 3-D input


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seq", [16, 15], ids=["even", "uneven_chunks"])
def test_chunked_equals_unchunked_with_a_cached_teacher(name, seq):
    bsz, vocab, chunks, k = 3, 29, 4, 5
    s, t, labels = inputs((bsz, seq, vocab), seed=2, ignore_every=3)
    labels[:, :4] = -100  # the whole first chunk is ignored
    labels[0, 4:9] = -100
    teacher = cache_from_reference(t, k, 2.0)
    assert teacher.shape == (bsz, seq)
    kw = {"T": 2.0, "lam": 0.3, "alpha": 0.25}
    full_value, full_grad = value_and_grad(make(name, **kw), s, teacher, labels)
    torch.testing.assert_close(full_value.double(), ref_mean(name, s, t, labels, k, **kw), rtol=1e-5, atol=1e-7)

    chunked = make(name, chunked=True, chunks=chunks, **kw)
    leaf = s.clone().requires_grad_(True)
    student_chunks = list(leaf.chunk(chunks, dim=1))
    value = chunked(student_chunks, teacher, labels)  # one TeacherTopK for the whole sequence, split like the labels
    value.backward()
    torch.testing.assert_close(value, full_value, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(leaf.grad, full_grad, rtol=1e-6, atol=1e-8)
    total, count = chunked.token_sum([c.detach() for c in student_chunks], teacher, labels)
    assert int(count) == int((labels != -100).sum())
    torch.testing.assert_close(total / count, full_value, rtol=1e-6, atol=1e-7)
    # it is the token mean, not a mean of chunk means (chunk 0 is all ignored, so such a mean would differ)
    parts = zip(s.chunk(chunks, 1), teacher.chunk(chunks, 1), labels.chunk(chunks, 1))
    chunk_means = torch.stack([make(name, **kw)(sc, tc, lc) for sc, tc, lc in parts])
    assert not torch.isclose(chunk_means.mean(), full_value)
    # a single tensor with a TeacherTopK goes through the chunked class too
    torch.testing.assert_close(chunked(s, teacher, labels), full_value, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------- 4. properties


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [1, 7, VOCAB - 1, VOCAB])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_zero_with_zero_gradient_when_the_student_is_the_teacher(name, k, T):
    s, _, labels = inputs((11, VOCAB), seed=3)
    shift = torch.randn(11, 1, generator=torch.Generator().manual_seed(4)) * 20
    loss = make(name, T=T, lam=0.3, alpha=0.25)
    for student in (s.clone(), s + shift):  # a per-row constant shift is the same distribution
        value, grad = value_and_grad(loss, student, cache_fp32(s, k, T), labels)
        assert abs(value.item()) < 1e-6
        if name != "tvd":  # TVD's gradient at equality is a subgradient: fp32 rounding picks the sign of each term
            assert grad.abs().max().item() < 1e-6
        # and a student away from the teacher is not at 0 (the check above can fail)
        assert make(name, T=T, lam=0.3, alpha=0.25)(student + torch.randn_like(s), cache_fp32(s, k, T), labels) > 1e-3


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", range(3))
def test_non_negative_per_token(name, seed):
    s, t, _ = inputs((13, 17), seed=10 + seed, scale=5.0)
    for k in (1, 4, 16):
        values = per_token_values(make(name), s, cache_fp32(t, k))
        assert (values >= -1e-6).all(), (k, values.min())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_coarsening_loses_information_monotonically(name, T):
    """Data-processing inequality per token: value(k1) ≤ value(k2) ≤ dense value for nested top-k sets k1 ⊂ k2."""
    s, t, _ = inputs((23, 31), seed=5, scale=3.0)
    loss = make(name, T=T, lam=0.3, alpha=0.25)
    dense = per_token_dense(loss, s, t)
    previous, previous_ids = torch.zeros_like(dense), torch.zeros(23, 0, dtype=torch.long)
    for k in (1, 3, 10, 30, 31):
        teacher = cache_fp32(t, k, T)
        assert torch.equal(teacher.ids[:, : previous_ids.shape[1]], previous_ids)  # nested id sets
        values = per_token_values(loss, s, teacher)
        assert (values <= dense + 1e-5 * (1 + dense)).all(), k
        assert (values >= previous - 1e-5 * (1 + previous)).all(), k
        previous, previous_ids = values, teacher.ids
    torch.testing.assert_close(previous, dense, rtol=1e-5, atol=1e-6)  # k = vocab: nothing lost
    # strictly less for most tokens at k = 1: the coarse view does lose information
    assert (per_token_values(loss, s, cache_fp32(t, 1, T)) < dense - 1e-4).float().mean() > 0.5


@pytest.mark.parametrize("name", NAMES)
def test_any_id_set_not_only_the_top(name):
    """The coarsening is valid for any set of ids (a superset of ids loses less), not only the teacher's top-k."""
    s, t, labels = inputs((19, 29), seed=6)
    g = torch.Generator().manual_seed(7)
    perm = torch.stack([torch.randperm(29, generator=g) for _ in range(19)])
    lt = torch.log_softmax(t.double(), -1)
    loss = make(name)
    previous = None
    for k in (2, 9, 20):
        ids = perm[:, :k]
        log_tail = lt.scatter(-1, ids, -math.inf).logsumexp(-1)
        teacher = kd_losses.TeacherTopK(ids, lt.gather(-1, ids).float(), log_tail.float())
        pt, ps = lt.exp(), torch.softmax(s.double(), -1)
        keep = labels != -100
        expected = ref_divergence(name, coarsen(pt, ids), coarsen(ps, ids), 0.5, 0.1)[keep].mean()
        value = loss(s, teacher, labels)
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-7)
        values = per_token_values(loss, s, teacher)
        if previous is not None:
            assert (values >= previous - 1e-6).all()
        previous = values


# -------------------------------------------------------------------------------------------------- 5. edge cases


@pytest.mark.parametrize("name", NAMES)
def test_all_ignored_gives_zero_with_zero_gradients(name):
    s, t, _ = inputs((3, 8, 11), seed=8)
    labels = torch.full((3, 8), -100)
    teacher = cache_fp32(t, 4)
    for loss in (make(name), make(name, chunked=True, chunks=4)):
        leaf = s.clone().requires_grad_(True)
        student = list(leaf.chunk(4, 1)) if isinstance(loss, kd_losses.ChunkedOutputMixin) else leaf
        value = loss(student, teacher, labels)
        value.backward()
        assert value.item() == 0.0
        assert torch.equal(leaf.grad, torch.zeros_like(s))
        total, count = loss.token_sum(s, teacher, labels)
        assert total.item() == 0.0 and int(count) == 0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [7, VOCAB - 5, VOCAB])  # tail with mass / tail only masked entries / -inf ids
def test_vocabulary_masked_in_both_models_is_finite(name, k):
    s, t, labels = inputs(seed=9)
    s[:, -5:] = float("-inf")
    t[:, -5:] = float("-inf")
    loss = make(name, T=2.0, lam=0.3, alpha=0.25)
    teacher = cache_fp32(t, k, 2.0)
    if k >= VOCAB - 5:
        assert torch.isneginf(teacher.log_tail).all()
    if k == VOCAB:
        assert torch.isneginf(teacher.logprobs[:, -5:]).all()
    value, grad = value_and_grad(loss, s, teacher, labels)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert torch.equal(grad[:, -5:], torch.zeros(37, 5))
    with torch.no_grad():
        assert torch.isfinite(loss(s, teacher, labels))
    # masked entries carry no probability: the reference over the remaining vocabulary, value and gradient
    s_ref = s[:, :-5].double().requires_grad_(True)
    expected = ref_mean(name, s_ref, t[:, :-5].double(), labels, min(k, VOCAB - 5), T=2.0, lam=0.3, alpha=0.25)
    expected.backward()
    torch.testing.assert_close(value.double(), expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad[:, :-5].double(), s_ref.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_teacher_with_an_empty_tail_and_a_student_without(name):
    """The teacher masks everything outside its ids (log_tail = -inf) but the student does not."""
    s, t, labels = inputs(seed=21)
    t[:, -5:] = float("-inf")
    teacher = cache_fp32(t, VOCAB - 5)
    assert torch.isneginf(teacher.log_tail).all()
    value, grad = value_and_grad(make(name, lam=0.3, alpha=0.25), s, teacher, labels)
    s_ref = s.double().requires_grad_(True)
    expected = ref_mean(name, s_ref, t.double(), labels, VOCAB - 5, lam=0.3, alpha=0.25)
    if name in ("reverse_kl", "symmetric_kl"):  # KL(p_s‖p_t) with p_t = 0 < p_s on the tail: +inf by definition
        assert math.isinf(expected.item()) and math.isinf(value.item()) and value.item() > 0
        return
    expected.backward()
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(value.double(), expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), s_ref.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_huge_logit_gaps_are_finite(name):
    s, t, labels = inputs((10, 15), seed=22)
    s = s * 1e4 / s.abs().max()
    t = -t * 1e4 / t.abs().max()
    loss = make(name)
    dense = loss(s, t, labels)
    for k in (1, 4, 14):
        value, grad = value_and_grad(loss, s, cache_fp32(t, k), labels)
        assert torch.isfinite(value) and torch.isfinite(grad).all(), k
        assert -1e-6 <= value.item() <= dense.item() * (1 + 1e-5) + 1e-6, k


@pytest.mark.parametrize("name", NAMES)
def test_student_masking_the_whole_tail(name):
    """A student that puts no mass outside the ids while the teacher does: KL(p_t‖p_s) is +inf, the others finite."""
    s, t, labels = inputs((9, 17), seed=10)
    teacher = cache_fp32(t, 6)
    outside = torch.ones_like(s, dtype=torch.bool).scatter(-1, teacher.ids, False)
    s = s.masked_fill(outside, float("-inf"))
    value, grad = value_and_grad(make(name), s, teacher, labels)
    expected = ref_mean(name, s.double(), t.double(), labels, 6)
    if name in ("forward_kl", "symmetric_kl"):
        assert math.isinf(expected.item()) and math.isinf(value.item()) and value.item() > 0
    else:
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_student_is_upcast(name):
    s, t, labels = inputs((3, 8, 64), seed=11)
    teacher = cache_fp32(t, 9)
    s16 = s.bfloat16()
    loss = make(name)
    value = loss(s16, teacher, labels)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, loss(s16.float(), teacher, labels), rtol=1e-6, atol=1e-7)  # an exact upcast
    torch.testing.assert_close(value, loss(s, teacher, labels), rtol=2e-2, atol=1e-3)  # bf16 rounding of the logits
    leaf = s16.clone().requires_grad_(True)
    loss(leaf, teacher, labels).backward()
    assert leaf.grad.dtype == torch.bfloat16 and torch.isfinite(leaf.grad.float()).all()
    _, grad32 = value_and_grad(loss, s16.float(), teacher, labels)
    torch.testing.assert_close(leaf.grad.float(), grad32, rtol=1e-2, atol=1e-5)  # only the final cast to bf16


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [7, VOCAB])
@pytest.mark.parametrize("dtype, rtol", [(torch.float16, 1e-3), (torch.bfloat16, 5e-3)], ids=["fp16", "bf16"])
def test_compactly_stored_teacher(name, k, dtype, rtol):
    """Caches store fp16 (or bf16) log-probabilities: close to the fp32 loss, and exactly 0 at equality."""
    s, t, labels = inputs(seed=12)
    teacher32 = cache_from_reference(t, k)
    teacher16 = cache_from_reference(t, k, dtype=dtype)
    assert teacher16.logprobs.dtype == dtype
    loss = make(name)
    value16, grad16 = value_and_grad(loss, s, teacher16, labels)
    value32, _ = value_and_grad(loss, s, teacher32, labels)
    torch.testing.assert_close(value16, value32, rtol=rtol, atol=1e-4)
    assert torch.isfinite(grad16).all()
    # The stored values are rounded: they no longer sum to one...
    stored = torch.cat((teacher16.logprobs.double(), teacher16.log_tail.double()[:, None]), -1)
    assert stored.logsumexp(-1).abs().max() > 1e-5
    # ...yet a student holding exactly the stored distribution is at 0: the teacher is renormalised first.
    renormalised = torch.log_softmax(stored, -1)
    student = torch.full((37, VOCAB), -math.inf, dtype=torch.float64)
    student.scatter_(-1, teacher16.ids, renormalised[:, :k])
    if k < VOCAB:  # spread the tail's mass evenly over the tokens outside the ids
        tail_share = renormalised[:, k:] - math.log(VOCAB - k)
        student = torch.where(torch.isneginf(student), tail_share.expand(-1, VOCAB), student)
    value, grad = value_and_grad(loss, student.float(), teacher16, labels)
    assert abs(value.item()) < 1e-6
    if name != "tvd":  # (a subgradient at equality)
        assert grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("chunked", [False, True], ids=["unchunked", "chunked"])
@pytest.mark.parametrize("nan_in", ["student", "teacher_logprobs", "teacher_tail"])
def test_nan_in_a_counted_row_gives_nan(name, requires_grad, chunked, nan_in):
    s, t, labels = inputs((2, 8, 23), seed=13)
    labels[0, 5] = 3
    teacher = cache_fp32(t, 6)
    if nan_in == "student":
        s[0, 5, 4] = float("nan")
    elif nan_in == "teacher_logprobs":
        teacher.logprobs[0, 5, 2] = float("nan")
    else:
        teacher.log_tail[0, 5] = float("nan")
    loss = make(name, chunked=chunked, chunks=4, lam=0.3, alpha=0.25)
    leaf = s.clone().requires_grad_(requires_grad)
    value = loss(list(leaf.chunk(4, 1)) if chunked else leaf, teacher, labels)
    assert math.isnan(value.item())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("chunked", [False, True], ids=["unchunked", "chunked"])
def test_ignored_rows_may_hold_anything(name, chunked):
    """Padding rows may carry nan/inf logits, nan teacher values, even repeated ids: nothing leaks."""
    s, t, labels = inputs((3, 6, 19), seed=14)
    labels[0, 2] = labels[2, 5] = labels[1, 0] = -100
    clean = cache_fp32(t, 5)
    s_bad = s.clone()
    s_bad[0, 2] = float("-inf")
    s_bad[2, 5] = float("nan")
    s_bad[1, 0, 3] = float("inf")
    ids, logprobs, log_tail = clean.ids.clone(), clean.logprobs.clone(), clean.log_tail.clone()
    logprobs[0, 2] = float("nan")
    log_tail[2, 5] = float("nan")
    logprobs[1, 0] = float("-inf")
    log_tail[1, 0] = float("-inf")
    ids[1, 0] = 0  # a padding row of a cache: every id 0
    bad = kd_losses.TeacherTopK(ids, logprobs, log_tail, clean.temperature)
    loss = make(name, chunked=chunked, chunks=3)
    results = []
    for student, teacher in ((s, clean), (s_bad, bad)):
        leaf = student.clone().requires_grad_(True)
        value = loss(list(leaf.chunk(3, 1)) if chunked else leaf, teacher, labels)
        value.backward()
        results.append((value.detach(), leaf.grad))
    assert torch.isfinite(results[0][0])
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=0)
    for index in ((0, 2), (2, 5), (1, 0)):
        assert torch.equal(results[1][1][index], torch.zeros(19))
    with torch.no_grad():
        torch.testing.assert_close(loss(list(s_bad.chunk(3, 1)) if chunked else s_bad, bad, labels), results[0][0])


@pytest.mark.parametrize("name", NAMES)
def test_int32_ids_and_teacher_helpers(name):
    s, t, labels = inputs((2, 6, 17), seed=15)
    teacher = cache_from_reference(t, 4)
    loss = make(name)
    expected = loss(s, teacher, labels)
    narrow = kd_losses.TeacherTopK(teacher.ids.int(), teacher.logprobs, teacher.log_tail, teacher.temperature)
    assert torch.equal(loss(s, narrow, labels), expected)
    assert torch.equal(value_and_grad(loss, s, narrow, labels)[1], value_and_grad(loss, s, teacher, labels)[1])
    rows = teacher.reshape_rows()
    assert rows.k == 4 and rows.shape == (12,) and rows.ids.shape == (12, 4)
    torch.testing.assert_close(loss(s.reshape(12, 17), rows, labels.reshape(12)), expected, rtol=0, atol=0)
    moved = teacher.to("cpu")
    assert torch.equal(moved.ids, teacher.ids) and moved.temperature == teacher.temperature


@pytest.mark.parametrize("k", [1, 6])
def test_parameter_extremes(k):
    s, t, labels = inputs((9, 13), seed=16)
    teacher = cache_fp32(t, k)

    def both(loss):
        return value_and_grad(loss, s, teacher, labels)

    def same(a, b):
        torch.testing.assert_close(a[0], b[0])
        torch.testing.assert_close(a[1], b[1])

    forward, reverse = both(kd_losses.ForwardKLLoss()), both(kd_losses.ReverseKLLoss())
    same(both(kd_losses.SymmetricKLLoss(lambda_weight=0.0)), forward)
    same(both(kd_losses.SymmetricKLLoss(lambda_weight=1.0)), reverse)
    same(both(kd_losses.SkewForwardKLLoss(alpha=0.0)), forward)
    same(both(kd_losses.SkewReverseKLLoss(alpha=0.0)), reverse)
    for zero in (kd_losses.JSDistanceLoss(lambda_weight=0.0), kd_losses.JSDistanceLoss(lambda_weight=1.0),
                 kd_losses.SkewForwardKLLoss(alpha=1.0), kd_losses.SkewReverseKLLoss(alpha=1.0)):
        value, grad = both(zero)
        assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    assert forward[0].item() > 1e-2


# ------------------------------------------------------------------------------------------------------- 6. errors


@pytest.mark.parametrize("chunked", [False, True], ids=["unchunked", "chunked"])
def test_temperature_mismatch_is_refused(chunked):
    s, t, labels = inputs((2, 4, 11), seed=17)
    teacher = cache_fp32(t, 3, T=1.0)
    loss = make("forward_kl", T=2.0, chunked=chunked, chunks=2)
    student = list(s.chunk(2, 1)) if chunked else s
    with pytest.raises(ValueError, match=r"temperature 1\.0.*temperature=2\.0"):
        loss(student, teacher, labels)
    with pytest.raises(ValueError, match="temperature"):
        loss(student if not chunked else [c.requires_grad_(True) for c in s.clone().chunk(2, 1)], teacher, labels)
    # the same cache at the right temperature is accepted
    right = make("forward_kl", T=2.0, chunked=chunked, chunks=2)
    assert torch.isfinite(right(student, cache_fp32(t, 3, T=2.0), labels))


def test_shape_mismatches_are_refused():
    s, t, labels = inputs((37, VOCAB), seed=18)
    teacher = cache_fp32(t, 5)
    loss = kd_losses.ForwardKLLoss()
    with pytest.raises(ValueError, match="one teacher row per student token"):
        loss(s, row(teacher, slice(0, 36)), labels)  # 36 teacher rows for 37 tokens
    with pytest.raises(ValueError, match="one teacher row per student token"):
        loss(s.requires_grad_(True), row(teacher, slice(1, 37)).reshape_rows(), labels)
    s3, t3, labels3 = inputs((3, 8, 11), seed=19)
    with pytest.raises(ValueError, match="one teacher row per student token"):
        loss(s3, cache_fp32(t3[:, :7], 4), labels3)  # (3, 7) teacher for (3, 8) tokens
    with pytest.raises(ValueError, match="one teacher row per student token"):  # a chunked loss, sequence too short
        chunked = kd_losses.ForwardKLWithChunkedOutputLoss(num_output_chunks=4)
        chunked(list(s3.chunk(4, 1)), cache_fp32(t3[:, :7], 4), labels3)
    with pytest.raises(ValueError, match="logprobs"):
        bad = cache_fp32(t3, 4)
        loss(s3, kd_losses.TeacherTopK(bad.ids, bad.logprobs[..., :3], bad.log_tail), labels3)
    with pytest.raises(ValueError, match="k=12"):
        wide = kd_losses.TeacherTopK(torch.zeros(3, 8, 12, dtype=torch.long), torch.zeros(3, 8, 12), torch.zeros(3, 8))
        loss(s3, wide, labels3)


# ------------------------------------------------------------------------------------------------- 7. pinned values


# Computed once with this file's float64 reference (ref_mean, NOT kd_losses) on inputs((37, 53), seed=123), the
# teacher's top-7 plus its tail, T = 1, default λ = 0.5 / α = 0.1. Any change to an objective shows here.
PINNED = {
    "forward_kl": 6.0856132949261, "reverse_kl": 2.4299427528091, "symmetric_kl": 4.2577780238676,
    "jsd": 0.48585372505353, "tvd": 0.85439685948232, "skew_kl": 1.6917700524579, "skew_reverse_kl": 1.5657649541725,
    "gkd_jsd": 0.48585372505353,  # β = 0.5: the symmetric JSD
}


@pytest.mark.parametrize("name", NAMES)
def test_pinned_values(name):
    s, t, labels = inputs((37, VOCAB), seed=123)
    assert ref_mean(name, s, t, labels, 7).item() == pytest.approx(PINNED[name], rel=1e-9)
    assert make(name)(s, cache_from_reference(t, 7), labels).item() == pytest.approx(PINNED[name], rel=1e-5)
    on_training_path = make(name)(s.requires_grad_(True), cache_from_reference(t, 7), labels)
    assert on_training_path.item() == pytest.approx(PINNED[name], rel=1e-5)


# ------------------------------------------------------------------------------- 8. gradient by finite differences


@pytest.mark.parametrize("name", NAMES)
def test_gradient_matches_finite_differences_of_the_reference(name):
    """Central differences of the float64 reference (no autograd) at a few coordinates, in the ids and the tail."""
    s, t, labels = inputs((5, 17), seed=20)
    kw = {"T": 2.0, "lam": 0.3, "alpha": 0.25}
    k = 4
    teacher = cache_from_reference(t, k, 2.0)
    _, grad = value_and_grad(make(name, **kw), s, teacher, labels)
    s64, t64 = s.double(), t.double()
    counted = int((labels != -100).nonzero()[0])
    ids = teacher.ids[counted].tolist()
    tail_tokens = [v for v in range(17) if v not in ids][:3]
    eps = 1e-6
    for r, v in [(counted, ids[0]), (counted, ids[-1])] + [(counted, v) for v in tail_tokens] + [(0, 2)]:
        plus, minus = s64.clone(), s64.clone()
        plus[r, v] += eps
        minus[r, v] -= eps
        numeric = (ref_mean(name, plus, t64, labels, k, **kw) - ref_mean(name, minus, t64, labels, k, **kw)) / (2 * eps)
        assert grad[r, v].item() == pytest.approx(numeric.item(), rel=1e-4, abs=1e-8), (r, v)
    assert labels[0] == -100 and grad[0].abs().max() == 0  # row 0 is ignored: numeric gradient 0, ours exactly 0
