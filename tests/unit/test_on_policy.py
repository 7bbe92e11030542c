"""On-policy distillation's pieces (``core.on_policy``): settings, the step's kind, prompts, sampling against an
independent reference loop without KV cache, the generated batch's labels and the gradient they let through."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torchtune.models.llama3 import llama3, lora_llama3

import kd_losses
from torchtune_kd.core import loss_step, on_policy, teacher_source
from torchtune_kd.core.teacher_source import DATA, STUDENT, TEACHER

IGNORE = -100
VOCAB = 24
PAD = 0
STOP = 3


def tiny(kind: str, seed: int, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=64,
                  intermediate_dim=64)
    if kind == "lora":
        model = lora_llama3(lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=4,
                            lora_alpha=8, lora_dropout=dropout, **common)
        for name, param in model.named_parameters():
            if "lora_b" in name:  # non-zero adapters, so that they change the samples
                torch.nn.init.normal_(param, std=0.3)
    else:
        model = llama3(attn_dropout=dropout, **common)
    return model


# ------------------------------------------------------------------------------------------------- settings


def test_defaults_are_off_and_a_fraction_turns_generation_on():
    assert not on_policy.settings(None).active
    assert not on_policy.settings({"fraction": 0}).active
    assert on_policy.settings({"fraction": 0.5}).active
    assert on_policy.settings({"teacher_generated": True}).active
    assert on_policy.section_problems(dict(on_policy.DEFAULTS)) == []


@pytest.mark.parametrize("key, value, fix", [
    ("fraction", 1.5, r"on_policy\.fraction=1\.5 must be a number in \[0, 1\]"),
    ("fraction", "half", r"on_policy\.fraction='half'"),
    ("max_new_tokens", 0, r"on_policy\.max_new_tokens=0 must be an integer >= 1"),
    ("max_new_tokens", 2.5, r"on_policy\.max_new_tokens=2\.5"),
    ("temperature", 0, r"on_policy\.temperature=0 must be a finite number > 0 .*top_k=1"),
    ("temperature", float("inf"), r"on_policy\.temperature=inf"),
    ("top_k", 0, r"on_policy\.top_k=0 must be null \(all tokens\) or an integer >= 1"),
    ("top_p", 0.0, r"on_policy\.top_p=0\.0 must be a number in \(0, 1\]"),
    ("top_p", 1.2, r"on_policy\.top_p=1\.2"),
    ("prompt_tokens", 0, r"on_policy\.prompt_tokens=0 must be null"),
    ("teacher_generated", "yes", r"on_policy\.teacher_generated='yes' must be true or false"),
    ("lmbda", 0.5, r"on_policy\.lmbda is not a key of on_policy: the keys are"),
])
def test_each_bad_setting_is_named_with_its_fix(key, value, fix):
    problems = on_policy.section_problems({key: value})
    assert len(problems) == 1 and re.search(fix, problems[0]), problems


# ------------------------------------------------------------------------------------------- the step's kind


def test_step_kind_is_a_seeded_draw_with_the_configured_share():
    half = on_policy.OnPolicySettings(fraction=0.5)
    kinds = [on_policy.step_kind(half, 7, step) for step in range(1, 2001)]
    assert kinds == [on_policy.step_kind(half, 7, step) for step in range(1, 2001)]  # any process, any resume
    share = kinds.count(STUDENT) / len(kinds)
    assert abs(share - 0.5) < 4 * math.sqrt(0.25 / len(kinds)) and set(kinds) == {STUDENT, DATA}
    assert kinds != [on_policy.step_kind(half, 8, step) for step in range(1, 2001)]  # another seed, other steps
    assert {on_policy.step_kind(on_policy.OnPolicySettings(fraction=0.0), 7, s) for s in range(1, 100)} == {DATA}
    assert {on_policy.step_kind(on_policy.OnPolicySettings(fraction=1.0), 7, s) for s in range(1, 100)} == {STUDENT}
    seq_kd = on_policy.OnPolicySettings(fraction=0.3, teacher_generated=True)
    assert {on_policy.step_kind(seq_kd, 7, s) for s in range(1, 200)} == {STUDENT, TEACHER}


def test_sampling_generators_depend_on_the_place_in_the_run_only():
    draw = lambda **k: torch.rand(4, generator=on_policy.sampling_generator(torch.device("cpu"), **k))  # noqa: E731
    place = dict(seed=1, step=5, rank=0, micro_batch=1)
    assert torch.equal(draw(**place), draw(**place))
    for key in place:
        assert not torch.equal(draw(**place), draw(**{**place, key: place[key] + 1})), key


# ------------------------------------------------------------------------------------------------- prompts


def test_prompts_are_the_part_before_the_first_label_or_a_fixed_prefix():
    labels = torch.tensor([
        [IGNORE, IGNORE, IGNORE, 5, 6, IGNORE],      # prompt of 3, then the response, then padding
        [IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE],  # nothing counted: the whole real sequence
        [4, 5, 6, 7, 8, 9],                          # every token a label (train_on_input): its first token
        [IGNORE, 7, 8, IGNORE, IGNORE, IGNORE],
    ])
    real = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]).bool()
    starts, ends = on_policy.prompt_lengths(labels, real, IGNORE, None, max_prompt=100)
    assert (starts, ends) == ([0, 0, 0, 0], [3, 4, 1, 1])
    starts, ends = on_policy.prompt_lengths(labels, real, IGNORE, None, max_prompt=2)  # keeps the last tokens
    assert (starts, ends) == ([1, 2, 0, 0], [3, 4, 1, 1])
    starts, ends = on_policy.prompt_lengths(labels, real, IGNORE, 4, max_prompt=100)  # plain text: a prefix
    assert (starts, ends) == ([0, 0, 0, 0], [4, 4, 4, 3])


# ------------------------------------------------------------------------------------------------ sampling


def reference_filter(logits: torch.Tensor, temperature: float, top_k, top_p: float) -> torch.Tensor:
    """Probabilities (float64) of one row, from the definitions: top-k by rank, then the smallest prefix of the
    sorted distribution whose mass reaches top_p."""
    z = logits.double() / temperature
    order = sorted(range(len(z)), key=lambda i: -float(z[i]))
    keep = set(order[:top_k] if top_k else order)
    p = torch.softmax(torch.where(torch.tensor([i in keep for i in range(len(z))]), z, -math.inf), -1)
    if top_p < 1.0:
        kept, mass = set(), 0.0
        for i in order:
            if mass >= top_p:
                break
            kept.add(i)
            mass += float(p[i])
        p = torch.where(torch.tensor([i in kept for i in range(len(z))]), p, torch.zeros_like(p))
        p = p / p.sum()
    return p


@pytest.mark.parametrize("top_k, top_p", [(None, 1.0), (5, 1.0), (None, 0.6), (7, 0.8)])
def test_filtered_distribution_matches_the_definitions(top_k, top_p):
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(3)) * 2
    filtered = on_policy.filter_logits(logits, temperature=0.7, top_k=top_k, top_p=top_p)
    for row in range(6):
        expected = reference_filter(logits[row], 0.7, top_k, top_p)
        torch.testing.assert_close(torch.softmax(filtered[row].double(), -1), expected, rtol=1e-5, atol=1e-7)


def reference_samples(model, prompts, *, max_new_tokens, temperature, top_k, top_p, stop_tokens, generator):
    """A sampling loop written without KV caches or padding: each step runs the whole sequence so far, one row at a
    time, and samples from :func:`reference_filter` with the same Exp(1) noise (one ``(bsz, vocab)`` draw a step)."""
    model.eval()
    rows = [list(map(int, p)) for p in prompts]
    out, done = [[] for _ in prompts], [False] * len(prompts)
    for _ in range(max_new_tokens):
        noise = torch.empty(len(prompts), VOCAB).exponential_(1, generator=generator)
        for i, row in enumerate(rows):
            if done[i]:
                continue
            with torch.no_grad():
                logits = model(torch.tensor([row + out[i]]))[0, -1]
            p = reference_filter(logits, temperature, top_k, top_p)
            token = int(torch.argmax(p / noise[i].double()))
            out[i].append(token)
            done[i] = token in stop_tokens
        if all(done):
            break
    return out


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("top_k, top_p, temperature", [(None, 1.0, 1.0), (6, 0.9, 0.8), (1, 1.0, 1.0)])
def test_batched_kv_cache_sampling_equals_the_reference_loop(kind, top_k, top_p, temperature):
    model = tiny(kind, seed=2, dropout=0.5)  # dropout on: sampling must switch it off
    model.train()
    prompts = [torch.tensor(p) for p in ([1, 5, 9, 4, 7, 2, 8], [1, 6], [1, 11, 12, 13], [1])]
    settings = dict(max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p)
    samples = on_policy.sample_continuations(
        model, prompts, **settings, stop_tokens=[STOP], pad_id=PAD,
        generator=torch.Generator().manual_seed(11), dtype=torch.float32,
    )
    assert model.training and not model.caches_are_setup()  # training mode restored, caches freed
    expected = reference_samples(model, prompts, **settings, stop_tokens=[STOP], generator=torch.Generator().manual_seed(11))
    got = [samples.tokens[i, : int(samples.lengths[i])].tolist() for i in range(len(prompts))]
    assert got == expected
    assert samples.stopped.tolist() == [bool(row) and row[-1] == STOP for row in expected]
    for i, row in enumerate(expected):  # padding after the end
        assert samples.tokens[i, len(row):].eq(PAD).all()
    if top_k is None:  # sampling, not argmax: some sequence differs under another seed
        again = on_policy.sample_continuations(
            model, prompts, **settings, stop_tokens=[STOP], pad_id=PAD,
            generator=torch.Generator().manual_seed(12), dtype=torch.float32,
        )
        assert not torch.equal(again.tokens, samples.tokens)


def test_sampling_stops_early_when_every_sequence_has_stopped():
    model = tiny("full", seed=2)
    calls = []
    forward = model.forward
    model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)  # noqa: E731
    greedy = dict(max_new_tokens=12, temperature=1.0, top_k=1, top_p=1.0, pad_id=PAD, dtype=torch.float32)
    prompts = [torch.tensor([1, 5, 9]), torch.tensor([1, 6])]
    first = on_policy.sample_continuations(model, prompts, stop_tokens=[], generator=torch.Generator(), **greedy)
    assert len(calls) == 12 and first.lengths.tolist() == [12, 12] and not first.stopped.any()
    # Stop at each row's own greedy tokens: both end at their first step.
    calls.clear()
    stop = first.tokens[:, 0].tolist()
    ended = on_policy.sample_continuations(model, prompts, stop_tokens=stop, generator=torch.Generator(), **greedy)
    assert ended.lengths.tolist() == [1, 1] and ended.stopped.all() and len(calls) == 1


# ------------------------------------------------------------------------------------- the generated batch


def test_generated_batch_counts_the_samples_only_and_the_stop_token():
    prompts = [torch.tensor([1, 5, 9]), torch.tensor([1])]
    samples = on_policy.Samples(
        tokens=torch.tensor([[7, STOP, PAD, PAD], [8, 9, 10, 11]]), lengths=torch.tensor([2, 4]),
        stopped=torch.tensor([True, False]),
    )
    batch = on_policy.generated_batch(prompts, samples, pad_id=PAD, ignore_index=IGNORE)
    assert batch["tokens"].tolist() == [[1, 5, 9, 7, STOP], [1, 8, 9, 10, 11]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, IGNORE, 7, STOP], [IGNORE, 8, 9, 10, 11]]
    assert batch["real_tokens"].tolist() == [[True] * 5, [True] * 5]
    samples = on_policy.Samples(tokens=torch.tensor([[STOP, PAD], [8, 9]]), lengths=torch.tensor([1, 2]),
                                stopped=torch.tensor([True, False]))
    batch = on_policy.generated_batch([torch.tensor([1, 5, 9]), torch.tensor([1])], samples, pad_id=PAD, ignore_index=IGNORE)
    assert batch["tokens"].tolist() == [[1, 5, 9, STOP], [1, 8, 9, PAD]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, IGNORE, STOP], [IGNORE, 8, 9, IGNORE]]
    assert batch["real_tokens"].tolist() == [[True] * 4, [True, True, True, False]]


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("divergence", ["reverse_kl", "gkd_jsd"])
def test_prompt_padding_and_after_stop_positions_get_exactly_zero_gradient(kind, divergence):
    student, teacher = tiny(kind, seed=4), tiny("full", seed=5)
    source = on_policy.GeneratingTeacher(
        teacher_source.LiveTeacher(teacher, output_weight=lambda: teacher.output.weight),
        student, on_policy.OnPolicySettings(fraction=1.0, max_new_tokens=6), seed=0, rank=0, ignore_index=IGNORE,
        pad_id=PAD, stop_tokens=[STOP, 4, 5, 6], max_seq_len=64, dtype=torch.float32,
    )
    data = {
        "tokens": torch.tensor([[1, 5, 9, 4, 7, 2, 8, 8, 8], [1, 6, 7, 8, 9, 10, 11, 0, 0]]),
        "labels": torch.tensor([[IGNORE] * 4 + [7, 2, 8, 8, 8], [IGNORE] * 2 + [7, 8, 9, 10, 11, IGNORE, IGNORE]]),
        "real_tokens": torch.tensor([[1] * 9, [1] * 7 + [0, 0]]).bool(),
    }
    kind_of_step, (batch,) = teacher_source.prepare_step(source, 1, [data])
    assert kind_of_step == STUDENT and source.stats.sequences == 2
    assert batch["tokens"][0, :4].tolist() == [1, 5, 9, 4] and batch["tokens"][1, :2].tolist() == [1, 6]
    labels = loss_step.shift_labels(batch["labels"], IGNORE)
    assert (labels != IGNORE).any() and (labels == IGNORE).any()
    student.set_num_output_chunks(0)
    logits = student(batch["tokens"]).detach().requires_grad_(True)
    teacher_logits = source.signal(batch, labels, form=teacher_source.LOGITS).logits
    loss = kd_losses.DIVERGENCES[divergence][0]()
    total, _ = loss.token_sum(logits, teacher_logits, labels)
    total.backward()
    grad_norms = logits.grad.abs().sum(-1)
    assert torch.equal(grad_norms[labels == IGNORE], torch.zeros_like(grad_norms[labels == IGNORE]))
    assert (grad_norms[labels != IGNORE] > 0).all()
    # The counted positions are exactly the sampled ones: from the last prompt token to the stop token.
    prompt_lengths = [4, 2]
    for row in range(2):
        counted = (labels[row] != IGNORE).nonzero().flatten().tolist()
        assert counted[0] == prompt_lengths[row] - 1
        assert counted == list(range(counted[0], counted[-1] + 1))
        last = int(batch["tokens"][row, counted[-1] + 1])
        assert counted[-1] + 2 == int(batch["real_tokens"][row].sum())
        assert len(counted) == 6 or last in (STOP, 4, 5, 6)


def test_data_steps_pass_the_batch_through_untouched():
    student, teacher = tiny("full", seed=4), tiny("full", seed=5)
    source = on_policy.GeneratingTeacher(
        teacher_source.LiveTeacher(teacher, output_weight=lambda: teacher.output.weight), student,
        on_policy.OnPolicySettings(fraction=0.0, teacher_generated=False), seed=0, rank=0, ignore_index=IGNORE,
        pad_id=PAD, stop_tokens=[STOP], max_seq_len=64, dtype=torch.float32,
    )
    data = {"tokens": torch.tensor([[1, 5, 9]]), "labels": torch.tensor([[IGNORE, 5, 9]]),
            "real_tokens": torch.tensor([[True] * 3])}
    kind, (batch,) = teacher_source.prepare_step(source, 1, [data])
    assert kind == DATA and batch is data and source.stats.sequences == 0
    assert on_policy.step_metrics(kind, source.step_counts().tolist(), source.stats, 1.0) == {
        "on_policy/student_generated": 0.0, "on_policy/teacher_generated": 0.0,
    }


def test_teacher_generated_steps_sample_from_the_teacher():
    student, teacher = tiny("full", seed=4), tiny("full", seed=5)
    settings = on_policy.OnPolicySettings(fraction=0.0, teacher_generated=True, max_new_tokens=5, top_k=1)
    source = on_policy.GeneratingTeacher(
        teacher_source.LiveTeacher(teacher, output_weight=lambda: teacher.output.weight), student, settings,
        seed=0, rank=0, ignore_index=IGNORE, pad_id=PAD, stop_tokens=[], max_seq_len=64, dtype=torch.float32,
    )
    data = {"tokens": torch.tensor([[1, 5, 9, 4]]), "labels": torch.tensor([[IGNORE, IGNORE, 9, 4]]),
            "real_tokens": torch.tensor([[True] * 4])}
    kind, (batch,) = teacher_source.prepare_step(source, 1, [data])
    greedy = dict(max_new_tokens=5, temperature=1.0, top_k=1, top_p=1.0, stop_tokens=[], pad_id=PAD,
                  generator=torch.Generator(), dtype=torch.float32)
    from_teacher = on_policy.sample_continuations(teacher, [torch.tensor([1, 5])], **greedy)
    from_student = on_policy.sample_continuations(student, [torch.tensor([1, 5])], **greedy)
    assert kind == TEACHER and batch["tokens"][0, 2:].tolist() == from_teacher.tokens[0].tolist()
    assert from_teacher.tokens[0].tolist() != from_student.tokens[0].tolist()
    metrics = on_policy.step_metrics(kind, source.step_counts().tolist(), source.stats, 10.0)
    assert metrics["on_policy/teacher_generated"] == 1.0 and metrics["on_policy/mean_generated_tokens"] == 5.0
    assert metrics["on_policy/eos_fraction"] == 0.0 and metrics["on_policy/generated_tokens_per_second"] > 0
