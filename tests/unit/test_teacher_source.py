"""One teacher-source interface and one loss-step path: live and cached teachers, fused and unfused passes.

Every sum is checked against a float64 reference written from the definitions (cross-entropy, KL, the coarsened KL
of a top-k teacher, entropy, top-1 agreement by argmax), and the fused pass against the unfused one.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torchtune.models.llama2 import llama2

import kd_losses
from torchtune_kd.core import fused_output, loss_step, loss_weighting, output_pass, teacher_source
from torchtune_kd.testing.host_sync import host_reads

VOCAB, DIM, BSZ, SEQ, K, CHUNKS = 37, 16, 2, 12, 5, 3
IGNORE = -100


def decoder(seed: int, like: torch.nn.Module | None = None) -> torch.nn.Module:
    """A one-layer torchtune decoder; with ``like``, a copy of it with every weight perturbed (a student that
    resembles its teacher, so that they agree on some tokens and not on others)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = llama2(vocab_size=VOCAB, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=DIM, max_seq_len=SEQ,
                       intermediate_dim=2 * DIM)
        # Larger output weights than the init's: distributions far from uniform.
        torch.nn.init.normal_(model.output.weight, std=1.0)
        if like is not None:
            with torch.no_grad():
                for mine, theirs in zip(model.parameters(), like.parameters()):
                    mine.copy_(theirs + 0.5 * theirs.abs().mean() * torch.randn_like(theirs))
    return model


def make_batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BSZ, SEQ), generator=g)
    labels = tokens.clone()
    labels[0, :3] = IGNORE  # a prompt
    labels[1, 7:] = IGNORE  # padding
    real = torch.ones(BSZ, SEQ, dtype=torch.bool)
    real[1, 7:] = False
    return {"tokens": tokens, "labels": labels, loss_step.REAL_TOKENS_KEY: real, "sample_id": torch.tensor([4, 1])}


def teacher_logits(teacher: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return teacher(batch["tokens"])


class FakeCache:
    """A teacher cache's lookup from the teacher's own logits, built in float64: its top-k at temperature ``T``,
    the tail's exact mass and the entropy at T = 1, with the cache's placeholders at ignored positions."""

    def __init__(self, logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> None:
        z = logits.double()
        logp = torch.log_softmax(z / temperature, -1)
        values, ids = logp.topk(K, dim=-1)
        log_tail = torch.log1p(-values.exp().sum(-1).clamp(max=1.0))
        p1 = torch.softmax(z, -1)
        entropy = -(p1 * torch.log_softmax(z, -1)).sum(-1)
        ignored = labels == IGNORE
        ids[ignored] = torch.arange(K)
        self.teacher = kd_losses.TeacherTopK(
            ids.int(), values.masked_fill(ignored[..., None], 0.0).float(), log_tail.masked_fill(ignored, 0.0).float(),
            temperature,
        )
        self.entropy = entropy.masked_fill(ignored, 0.0).float()
        self.calls = []

    def lookup(self, sample_ids, labels, tokens, real_tokens, unshifted_labels):
        self.calls.append((sample_ids, labels, tokens, real_tokens, unshifted_labels))
        return self.teacher, self.entropy


def reference(student_logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float,
              cached: bool) -> dict[str, float]:
    """CE, forward KL (× T²; over the top-k + tail outcomes when cached), agreement and entropy in float64."""
    s, t = student_logits.double(), teacher.double()
    keep = labels != IGNORE
    s_logp = torch.log_softmax(s, -1)
    ce = -s_logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0][keep].sum()
    s_logp_t, t_logp_t = torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1)
    if cached:
        top, ids = t_logp_t.topk(K, dim=-1)
        t_coarse = torch.cat([top, torch.log1p(-top.exp().sum(-1, keepdim=True))], -1)
        s_top = s_logp_t.gather(-1, ids)
        s_coarse = torch.cat([s_top, torch.log1p(-s_top.exp().sum(-1, keepdim=True))], -1)
        s_logp_t, t_logp_t = s_coarse, t_coarse
    p_t = t_logp_t.exp()
    kl = torch.where(p_t > 0, p_t * (t_logp_t - s_logp_t), torch.zeros_like(p_t)).sum(-1)
    p1 = torch.softmax(t, -1)
    entropy = -torch.where(p1 > 0, p1 * p1.log(), torch.zeros_like(p1)).sum(-1)
    return {
        "ce": float(ce), "kd": float(kl[keep].sum() * temperature**2),
        "agree": float((s.argmax(-1) == t.argmax(-1))[keep].sum()), "teacher_entropy": float(entropy[keep].sum()),
    }


def setup(source_kind: str, fused: bool, temperature: float, chunks: int = 0):
    """A student, the source of the given kind, the pass, the batch and the reference's inputs."""
    teacher = decoder(1).requires_grad_(False)
    student = decoder(0, like=teacher)
    batch = make_batch(2)
    labels = loss_step.shift_labels(batch["labels"], IGNORE)
    t_logits = teacher_logits(teacher, batch)
    kd = (kd_losses.ForwardKLWithChunkedOutputLoss(num_output_chunks=chunks, temperature=temperature) if chunks
          else kd_losses.ForwardKLLoss(temperature=temperature))
    if source_kind == "live":
        source = teacher_source.LiveTeacher(teacher, output_weight=lambda: fused_output.output_weight(teacher))
    else:
        source = teacher_source.CachedTeacher(FakeCache(t_logits, labels, temperature))
    if fused:
        step_pass = output_pass.FusedPass(kd, student_weight=lambda: fused_output.output_weight(student), chunk_size=7)
    else:
        for model in (student, teacher):
            model.set_num_output_chunks(chunks)
        losses = loss_step.StepLosses(
            lambda logits, lab: loss_step.ce_token_sum(logits, lab, IGNORE), kd.token_sum, kd, IGNORE, chunks
        )
        step_pass = output_pass.UnfusedPass(losses)
    return student, source, step_pass, batch, labels, t_logits


def student_logits(student: torch.nn.Module, batch: dict) -> torch.Tensor:
    chunks = student.num_output_chunks
    student.set_num_output_chunks(0)
    with torch.no_grad():
        logits = student(batch["tokens"])
    student.set_num_output_chunks(chunks)
    return logits


COEFFICIENTS = {"ce": torch.tensor(0.3 / 15), "kd": torch.tensor(0.7 / 15)}


@pytest.mark.parametrize("source_kind", ["live", "cached"])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_every_source_and_pass_give_the_float64_reference_sums(source_kind, fused, temperature):
    student, source, step_pass, batch, labels, t_logits = setup(source_kind, fused, temperature, CHUNKS * (not fused))
    sums = output_pass.micro_batch_sums(
        student, source, step_pass, batch, IGNORE, COEFFICIENTS if fused else None
    )
    expected = reference(student_logits(student, batch), t_logits, labels, temperature, cached=source_kind == "cached")
    assert sums.keys() >= expected.keys() and ("objective" in sums) == fused
    for key, value in expected.items():
        assert float(sums[key].detach()) == pytest.approx(value, rel=2e-5, abs=1e-6), key
    assert 0 < expected["agree"] < int((labels != IGNORE).sum())  # neither none nor every token agrees
    if source_kind == "cached":
        sample_ids, looked_up_labels, tokens, real, unshifted = source.cache.calls[0]
        assert torch.equal(sample_ids, batch["sample_id"]) and torch.equal(looked_up_labels, labels)
        assert tokens is batch["tokens"] and real is batch["real_tokens"] and unshifted is batch["labels"]


@pytest.mark.parametrize("source_kind", ["live", "cached"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_fused_and_unfused_passes_give_the_same_sums_and_gradients(source_kind, temperature):
    grads, all_sums = {}, {}
    for fused in (False, True):
        student, source, step_pass, batch, _, _ = setup(source_kind, fused, temperature, chunks=0)
        sums = output_pass.micro_batch_sums(student, source, step_pass, batch, IGNORE, COEFFICIENTS)
        weighted = COEFFICIENTS["ce"] * sums["ce"] + COEFFICIENTS["kd"] * sums["kd"]
        objective = sums.pop("objective") if fused else weighted
        objective.backward()
        grads[fused] = {name: p.grad for name, p in student.named_parameters()}
        all_sums[fused] = {k: v.detach() for k, v in sums.items()}
    for key, value in all_sums[False].items():
        torch.testing.assert_close(all_sums[True][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def masked_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(20, 13, generator=g) * 3
    t = s + torch.randn(20, 13, generator=g) * 2  # a teacher the student agrees with on some tokens
    t[:, -3:] = float("-inf")  # a vocabulary the teacher masks
    s[:, :2] = float("-inf")  # and one the student masks
    t[4] = float("-inf")  # an ignored padding row of -inf logits (nan log-probabilities)
    labels = torch.randint(0, 13, (20,), generator=g)
    labels[[1, 4, 9]] = IGNORE
    return s, t, labels


def diagnostics_reference(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    keep = labels != IGNORE
    p = torch.softmax(t.double()[keep], -1)
    entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum()
    return float((s.double().argmax(-1) == t.double().argmax(-1))[keep].sum()), float(entropy)


def test_diagnostics_equal_a_float64_reference_with_masked_vocabulary():
    s, t, labels = masked_inputs(3)
    agree_ref, entropy_ref = diagnostics_reference(s, t, labels)
    keep = labels != IGNORE
    assert 0 < agree_ref < int(keep.sum())
    agree, entropy = kd_losses.diagnostics(torch.log_softmax(s, -1), torch.log_softmax(t, -1), keep)
    assert float(agree) == agree_ref and float(entropy) == pytest.approx(entropy_ref, rel=1e-6)
    assert agree.dtype == entropy.dtype == torch.float32 and math.isfinite(float(entropy))
    # The same helper from logits (any KD loss) and from a cached teacher's stored top-1 and entropy.
    agree2, entropy2 = loss_step.kd_health_sums(s[None], t[None], labels[None], IGNORE)
    assert float(agree2) == agree_ref and float(entropy2) == pytest.approx(entropy_ref, rel=1e-6)
    ids = t.double().topk(K, dim=-1).indices
    stored = torch.special.entr(torch.softmax(t.double(), -1)).sum(-1).float()
    cached = kd_losses.TeacherTopK(ids, torch.zeros(20, K), torch.zeros(20), entropy=stored)
    agree3, entropy3 = kd_losses.diagnostics(s, cached, keep)
    assert float(agree3) == agree_ref and float(entropy3) == pytest.approx(entropy_ref, rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "no_grad"])
def test_a_divergence_reads_the_diagnostics_from_its_own_blocks(temperature, requires_grad):
    """token_sum_and_diagnostics (blocks, chunked or not, with or without the hand-derived gradient) and the
    fused chunk give the reference diagnostics; at T ≠ 1 the entropy is still the teacher's at T = 1."""
    s, t, labels = masked_inputs(4)
    agree_ref, entropy_ref = diagnostics_reference(s, t, labels)
    s3, t3, labels3 = s.reshape(2, 10, 13), t.reshape(2, 10, 13), labels.reshape(2, 10)
    loss = kd_losses.JSDistanceLoss(temperature=temperature)
    chunked = kd_losses.JSDistanceWithChunkedOutputLoss(num_output_chunks=2, temperature=temperature)
    leaf = s3.clone().requires_grad_(requires_grad)
    results = [loss.token_sum_and_diagnostics(leaf, t3, labels3)[1:],
               chunked.token_sum_and_diagnostics(list(leaf.chunk(2, 1)), list(t3.chunk(2, 1)), labels3)[1:],
               fused_output.chunk_sums_and_grad(s.clone(), t.clone(), labels, loss, 1.0, 1.0)[2:4]]
    for agree, entropy in results:
        assert float(agree) == agree_ref and float(entropy) == pytest.approx(entropy_ref, rel=1e-6)
        assert not agree.requires_grad and not entropy.requires_grad


@pytest.mark.parametrize("name", sorted(kd_losses.DIVERGENCES))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "topk"])
def test_the_divergence_value_and_gradient_are_bitwise_those_of_token_sum(name, temperature, sparse):
    """Reading the diagnostics changes nothing in the divergence's own computation."""
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 9, 17, generator=g) * 2, torch.randn(2, 9, 17, generator=g) * 2
    labels = torch.randint(0, 17, (2, 9), generator=g)
    labels[0, 4] = IGNORE
    teacher: object = list(t.chunk(3, 1))
    if sparse:
        logp = torch.log_softmax(t / temperature, -1)
        values, ids = logp.topk(4, dim=-1)
        tail = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), -1)
        teacher = kd_losses.TeacherTopK(ids, values, tail, temperature, entropy=torch.rand(2, 9, generator=g))
    loss = kd_losses.DIVERGENCES[name][1](num_output_chunks=3, temperature=temperature)
    outputs = []
    for with_diagnostics in (False, True):
        leaf = s.clone().requires_grad_(True)
        student = list(leaf.chunk(3, 1))
        if with_diagnostics:
            value = loss.token_sum_and_diagnostics(student, teacher, labels)[0]
        else:
            value = loss.token_sum(student, teacher, labels)[0]
        value.backward()
        outputs.append((value.detach(), leaf.grad))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])


@pytest.mark.parametrize("source_kind", ["live", "cached"])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_a_step_makes_no_host_sync(source_kind, fused):
    """Reading a tensor on the host (item/float/int/bool/tolist) is a device sync: none in a step's loss path, for
    every source and pass (the fake cache's lookup reads nothing; the real one's reads are its I/O)."""
    student, source, step_pass, _, _, _ = setup(source_kind, fused, 2.0, CHUNKS * (not fused))
    batches = [make_batch(2), make_batch(2)]
    weighting = loss_weighting.LossWeighting.from_config(
        {"enabled": True, "method": "dynamic", "manual_scales": {"ce": 0.5, "kd": 0.5}}, kd_ratio=0.5
    )

    def step(batch, coefficients=None):
        return output_pass.micro_batch_sums(student, source, step_pass, batch, IGNORE, coefficients)

    with host_reads() as reads:
        totals, _ = loss_step.accumulate_gradients(
            batches, step, weighting, IGNORE, fused_components=["ce", "kd"] if step_pass.fused else None
        )
    assert reads == []
    assert {"ce", "kd", "agree", "teacher_entropy", "loss"} <= totals.keys()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


class HellingerLoss(torch.nn.Module):
    """A user's KD loss with the token-sum contract and nothing else (README's example)."""

    ignore_index = IGNORE

    def token_sum(self, student_logits, teacher_logits, labels):
        s_logp = torch.log_softmax(student_logits.float(), dim=-1)
        t_logp = torch.log_softmax(teacher_logits.float(), dim=-1)
        per_token = 1.0 - torch.exp(0.5 * (s_logp + t_logp)).sum(-1)
        counted = labels != self.ignore_index
        return torch.where(counted, per_token, torch.zeros_like(per_token)).sum(), counted.sum()


def test_a_kd_loss_that_is_not_a_divergence_gets_the_same_diagnostics():
    student, source, _, batch, labels, t_logits = setup("live", False, 1.0)
    kd = HellingerLoss()
    losses = loss_step.StepLosses(lambda lg, lb: loss_step.ce_token_sum(lg, lb, IGNORE), kd.token_sum, kd, IGNORE, 0)
    assert not kd_losses.is_divergence(kd) and not kd_losses.is_divergence(HellingerLoss)
    sums = output_pass.micro_batch_sums(student, source, output_pass.UnfusedPass(losses), batch, IGNORE)
    expected = reference(student_logits(student, batch), t_logits, labels, 1.0, cached=False)
    assert float(sums["agree"]) == expected["agree"]
    assert float(sums["teacher_entropy"]) == pytest.approx(expected["teacher_entropy"], rel=1e-5)
    alone, _ = kd.token_sum(student_logits(student, batch), t_logits, labels)
    assert float(sums["kd"].detach()) == pytest.approx(float(alone))


class ReplacingSource(teacher_source.LiveTeacher):
    """A stand-in for an on-policy source: the student trains on the sequences ``prepare`` returns."""

    def __init__(self, model, output_weight, replacement: dict) -> None:
        super().__init__(model, output_weight)
        self.replacement = replacement

    def prepare(self, batch: dict) -> dict:
        return self.replacement


def test_a_source_that_replaces_the_batch_is_what_the_student_and_teacher_see():
    student, live, step_pass, batch, _, _ = setup("live", False, 1.0)
    other = make_batch(7)
    source = ReplacingSource(live.model, live._output_weight, other)
    kind, prepared = teacher_source.prepare_step(source, 1, [batch, batch])
    assert kind == teacher_source.DATA and all(p is other for p in prepared)
    sums = output_pass.micro_batch_sums(student, source, step_pass, prepared[0], IGNORE)
    direct = output_pass.micro_batch_sums(student, live, step_pass, other, IGNORE)
    for key in ("ce", "kd", "agree", "teacher_entropy"):
        assert torch.equal(sums[key], direct[key]), key


def test_the_live_teachers_hidden_form_gives_its_logits_through_its_output_weight():
    teacher = decoder(1).requires_grad_(False)
    batch = make_batch(2)
    source = teacher_source.LiveTeacher(teacher, output_weight=lambda: fused_output.output_weight(teacher))
    signal = source.signal(batch, batch["labels"], form=teacher_source.HIDDEN)
    assert isinstance(signal, teacher_source.TeacherHidden) and signal.hidden.shape == (BSZ, SEQ, DIM)
    torch.testing.assert_close(signal.hidden @ signal.weight.t(), teacher_logits(teacher, batch), rtol=1e-5, atol=1e-5)
    assert isinstance(teacher.output, torch.nn.Linear)  # the output projection is back
    logits = source.signal(batch, batch["labels"], form=teacher_source.LOGITS)
    assert torch.equal(logits.logits, teacher_logits(teacher, batch))
    with pytest.raises(ValueError, match="form='topk'"):
        source.signal(batch, batch["labels"], form="topk")


def test_passes_refuse_what_they_cannot_use():
    student, _, unfused, batch, labels, _ = setup("live", False, 1.0)
    hidden = teacher_source.TeacherHidden(torch.zeros(BSZ, SEQ, DIM), torch.zeros(VOCAB, DIM))
    with pytest.raises(TypeError, match="takes TeacherLogits or kd_losses.TeacherTopK, got TeacherHidden"):
        unfused.token_sums(torch.zeros(BSZ, SEQ, VOCAB), hidden, labels)
    with pytest.raises(ValueError, match="needs a kd_losses divergence, got HellingerLoss"):
        output_pass.FusedPass(HellingerLoss(), student_weight=lambda: torch.zeros(VOCAB, DIM), chunk_size=4)
    fused = output_pass.FusedPass(kd_losses.ForwardKLLoss(), student_weight=lambda: torch.zeros(VOCAB, DIM),
                                  chunk_size=4)
    with pytest.raises(ValueError, match="needs the step's coefficients"):
        fused.token_sums(torch.zeros(BSZ, SEQ, DIM), hidden, labels)
    with pytest.raises(TypeError, match="takes TeacherHidden or kd_losses.TeacherTopK, got TeacherLogits"):
        fused.token_sums(torch.zeros(BSZ, SEQ, DIM), teacher_source.TeacherLogits(torch.zeros(1)), labels, COEFFICIENTS)


def test_a_cached_teacher_without_entropy_or_with_a_misshapen_one_is_refused():
    g = torch.Generator().manual_seed(8)
    s = torch.randn(2, 4, 9, generator=g)
    labels = torch.randint(0, 9, (2, 4), generator=g)
    bare = kd_losses.TeacherTopK(torch.arange(3).expand(2, 4, 3), torch.full((2, 4, 3), -2.0), torch.full((2, 4), -0.5))
    loss = kd_losses.ForwardKLLoss()
    with pytest.raises(ValueError, match="need the cached teacher's entropy"):
        loss.token_sum_and_diagnostics(s, bare, labels)
    loss.token_sum(s, bare, labels)  # the loss alone needs no entropy
    with pytest.raises(ValueError, match=r"teacher entropy \(2, 3\) != its tail \(2, 4\)"):
        loss.token_sum(s, dataclasses.replace(bare, entropy=torch.zeros(2, 3)), labels)
    with pytest.raises(ValueError, match="needs its entropy"):
        fused_output.fused_output_token_sums(torch.zeros(2, 4, 3), torch.zeros(9, 3), bare, None, labels, loss,
                                             ce_coef=1.0, kd_coef=1.0)


def test_teacher_topk_split_chunk_and_rows_carry_the_entropy():
    entropy = torch.arange(12.0).reshape(2, 6)
    teacher = kd_losses.TeacherTopK(torch.zeros(2, 6, 3, dtype=torch.long), torch.zeros(2, 6, 3), torch.zeros(2, 6),
                                    1.5, entropy)
    rows = teacher.reshape_rows()
    assert torch.equal(rows.entropy, entropy.reshape(-1)) and rows.temperature == 1.5
    assert [part.entropy.tolist() for part in rows.split(5)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    chunks = [part.entropy.tolist() for part in teacher.chunk(3)]
    assert chunks == [[[0, 1], [6, 7]], [[2, 3], [8, 9]], [[4, 5], [10, 11]]]
    assert all(part.entropy is None for part in dataclasses.replace(teacher, entropy=None).chunk(2))
