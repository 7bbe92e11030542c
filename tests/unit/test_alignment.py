"""Layer mapping validation, hidden-state capture and projections."""

import pytest
import torch
from torchtune import modules, training
from torchtune.models.llama3 import llama3, lora_llama3

from torchtune_kd.core import alignment
import kd_losses


def tiny_decoder(num_layers: int = 3, dim: int = 32, lora: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = dict(vocab_size=97, num_layers=num_layers, num_heads=4, num_kv_heads=2, embed_dim=dim, max_seq_len=64,
                  intermediate_dim=64)
    if lora:
        model = lora_llama3(lora_attn_modules=["q_proj", "v_proj"], lora_rank=4, lora_alpha=8, **kwargs)
        for name, p in model.named_parameters():
            if "lora_b" in name:  # non-zero adapters, so the LoRA path really contributes
                torch.nn.init.normal_(p, std=0.02)
        return model
    return llama3(**kwargs)


@pytest.mark.parametrize(
    "mapping, expected",
    [
        ([[0, 15], [1, 20], [2, 25]], [(0, 15), [1, 20], (2, 25)]),
        ([[-1, -1], [0, 0]], [(2, 27), (0, 0)]),
        (None, []),
        ([], []),
    ],
)
def test_resolve_valid(mapping, expected):
    assert alignment.resolve_layer_mapping(mapping, 3, 28) == [tuple(p) for p in expected]


def test_auto_mapping_spreads_uniformly_and_ends_at_last_layers():
    pairs = alignment.resolve_layer_mapping("auto", 16, 28)
    assert len(pairs) == 16 and pairs[-1] == (15, 27)
    teacher = [t for _, t in pairs]
    assert teacher == sorted(teacher) and len(set(teacher)) == 16
    gaps = {b - a for a, b in zip(teacher, teacher[1:])}
    assert gaps <= {1, 2}
    assert alignment.auto_layer_mapping(2, 4) == [(0, 1), (1, 3)]
    assert alignment.auto_layer_mapping(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]


@pytest.mark.parametrize(
    "mapping, match",
    [
        ([[0, 28]], r"teacher layer 28 is out of range; the teacher has 28 layers, so valid indices are 0\.\.27"),
        ([[16, 3]], r"student layer 16 is out of range; the student has 16 layers"),
        ([[-17, 3]], r"student layer -17 is out of range"),
        ([[0, 1], [0, 2]], r"student layer 0 is already mapped by layer_mapping\[0\]"),
        ([[0, 1], [-16, 2]], r"student layer 0 is already mapped"),
        ([[0.5, 1]], r"must hold integers"),
        ([[True, 1]], r"must hold integers"),
        ([["0", 1]], r"must hold integers"),
        ([[0, 1, 2]], r"must be a pair"),
        ([3], r"must be a pair"),
        ("everything", r"use 'auto'"),
    ],
)
def test_resolve_rejects_bad_mappings(mapping, match):
    with pytest.raises(ValueError, match=match):
        alignment.resolve_layer_mapping(mapping, 16, 28)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as info:
        alignment.resolve_layer_mapping([[0, 99], [99, 0], [1.5, 2]], 16, 28)
    message = str(info.value)
    assert "teacher layer 99" in message and "student layer 99" in message and "integers" in message


def manual_layer_outputs(model: torch.nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Reference: run the decoder layer by layer, by hand."""
    outputs = []
    h = model.tok_embeddings(tokens)
    for layer in model.layers:
        h = layer(h)
        outputs.append(h)
    return outputs


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("chunks", [0, 4])
def test_capture_records_exactly_the_mapped_layer_outputs(lora, checkpointing, chunks):
    model = tiny_decoder(lora=lora)
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = manual_layer_outputs(model, tokens)
    if checkpointing:
        training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    if chunks:
        model.set_num_output_chunks(chunks)
    with alignment.LayerOutputCapture(model.layers, [2, 0]) as capture:
        out = model(tokens)
        captured = capture.pop()
        assert sorted(captured) == [0, 2]
        for index in (0, 2):
            torch.testing.assert_close(captured[index], expected[index], rtol=0, atol=0)
        # gradients flow through the captured student states (and recomputation does not re-fire the hooks)
        loss = captured[0].square().mean() + (sum(c.sum() for c in out) if chunks else out.sum()) * 0
        loss.backward()
        assert capture.pop() == {}
    assert all(len(layer._forward_hooks) == 0 for layer in model.layers)


def test_detached_capture_for_teacher():
    model = tiny_decoder()
    tokens = torch.randint(0, 97, (1, 5))
    capture = alignment.LayerOutputCapture(model.layers, [1], detach=True)
    model(tokens)
    assert not capture.pop()[1].requires_grad
    capture.remove()


def test_aligner_sizes_projections_from_dims_and_computes_ir():
    aligner = alignment.HiddenStateAligner([(0, 3), (1, 5)], student_dim=8, teacher_dim=12, ir_loss=kd_losses.CosineIRLoss())
    assert set(aligner.projections) == {"0-3", "1-5"}
    for projection in aligner.projections.values():
        assert isinstance(projection, torch.nn.Linear)
        assert tuple(projection.weight.shape) == (12, 8)
    same = alignment.HiddenStateAligner([(0, 0)], 8, 8, kd_losses.CosineIRLoss())
    assert isinstance(same.projections["0-0"], torch.nn.Identity)

    g = torch.Generator().manual_seed(0)
    student = {0: torch.randn(2, 4, 8, generator=g), 1: torch.randn(2, 4, 8, generator=g)}
    teacher = {3: torch.randn(2, 4, 12, generator=g), 5: torch.randn(2, 4, 12, generator=g)}
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    sums, count = aligner.token_sums(student, teacher, mask)
    assert int(count) == 5
    # reference: 1 - cosine of layer-normed vectors, float64, real positions only
    for (s, t), name in (((0, 3), "0-3"), ((1, 5), "1-5")):
        proj = aligner.projections[name].weight.double()
        a = torch.nn.functional.layer_norm(student[s].double() @ proj.T, (12,))
        b = torch.nn.functional.layer_norm(teacher[t].double(), (12,))
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        expected = ((1 - cos) * mask).sum()
        torch.testing.assert_close(sums[name].double(), expected, rtol=1e-5, atol=1e-6)


def test_model_dims_on_meta_device():
    with torch.device("meta"):
        model = tiny_decoder(num_layers=5, dim=48)
    assert alignment.model_embed_dim(model) == 48
    assert alignment.model_vocab_size(model) == 97
    assert len(alignment.decoder_layers(model)) == 5
    with pytest.raises(ValueError, match="no `layers`"):
        alignment.decoder_layers(torch.nn.Linear(2, 2))
