"""SmolLM2-135M-Instruct's builders, layer selection, students and text data, on tiny fakes (a few seconds).

The tests on the real model (conversion of the GGUF, tokenizer, logits) are in ``tests/e2e/test_smollm2_real.py``.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torchtune.models.convert_weights import tune_to_hf
from torchtune.models.llama3_2._component_builders import llama3_2
from torchtune.training import MODEL_KEY, FullModelHFCheckpointer

from torchtune_kd.data import text as text_data
from torchtune_kd.models import smollm2

# ---------------------------------------------------------------------------------------------------------------
# Fast: layer selection and students on a tiny fake teacher
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("teacher_layers", [2, 5, 12, 30])
def test_num_layers_selection_is_evenly_spread_with_both_ends(teacher_layers):
    for n in range(2, teacher_layers + 1):
        kept = smollm2.select_teacher_layers(teacher_layers, num_layers=n)
        assert len(kept) == n and kept[0] == 0 and kept[-1] == teacher_layers - 1
        assert all(a < b for a, b in zip(kept, kept[1:]))
        # Each kept layer is the nearest integer to the ideal, evenly spaced position.
        for i, layer in enumerate(kept):
            ideal = i * (teacher_layers - 1) / (n - 1)
            assert abs(layer - ideal) <= 0.5 + 1e-12
    assert smollm2.select_teacher_layers(teacher_layers, num_layers=1) == [0]
    assert smollm2.select_teacher_layers(teacher_layers, num_layers=teacher_layers) == list(range(teacher_layers))


def test_keep_every_selection():
    assert smollm2.select_teacher_layers(30, keep_every=2) == [*range(0, 30, 2), 29]
    assert smollm2.select_teacher_layers(30, keep_every=3) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29]
    assert smollm2.select_teacher_layers(9, keep_every=4) == [0, 4, 8]  # the stride already ends on the last
    assert smollm2.select_teacher_layers(30, keep_every=1) == list(range(30))
    assert smollm2.select_teacher_layers(30, keep_every=50) == [0, 29]
    assert smollm2.select_teacher_layers(1, keep_every=2) == [0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one of keep_every"),
        ({"keep_every": 2, "num_layers": 3}, "exactly one of keep_every"),
        ({"keep_every": 0}, r"keep_every=0 is invalid"),
        ({"keep_every": 1.5}, r"keep_every=1.5 is invalid"),
        ({"num_layers": 0}, r"num_layers=0 is invalid: give an integer from 1 to the teacher's depth 30"),
        ({"num_layers": 31}, r"num_layers=31 is invalid"),
        ({"num_layers": True}, r"num_layers=True is invalid"),
    ],
)
def test_layer_selection_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        smollm2.select_teacher_layers(30, **kwargs)


TINY = dict(vocab_size=64, num_heads=2, num_kv_heads=1, embed_dim=16, intermediate_dim=32)


def _tiny(num_layers: int) -> torch.nn.Module:
    return llama3_2(**TINY, num_layers=num_layers, max_seq_len=32, rope_base=100_000, scale_factor=1,
                    tie_word_embeddings=True)


@pytest.fixture
def tiny_teacher(tmp_path):
    """A 5-layer tied Llama in HF format (the layout of the converted SmolLM2), with its torchtune model."""
    torch.manual_seed(0)
    model = _tiny(5).eval()
    for p in model.parameters():  # norms start at 1; make every tensor distinct so mix-ups show
        torch.nn.init.normal_(p, std=0.2)
    state = tune_to_hf(model.state_dict(), num_heads=2, num_kv_heads=1, dim=16)
    folder = tmp_path / "teacher"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 5,
        "num_attention_heads": 2, "num_key_value_heads": 1, "hidden_size": 16, "intermediate_size": 32,
        "vocab_size": 64, "tie_word_embeddings": True, "rope_theta": 100000.0,
    }))
    (folder / smollm2.TIKTOKEN_FILENAME).write_text("dG9r 17\n")
    return folder, model


def test_student_keeps_the_chosen_teacher_layers(tiny_teacher, tmp_path):
    teacher_dir, teacher = tiny_teacher
    info = smollm2.build_student_from_teacher(teacher_dir, tmp_path / "student", num_layers=3)
    assert info["kept_layers"] == [0, 2, 4] and info["num_layers"] == 3 and info["teacher_num_layers"] == 5
    assert info["layer_mapping"] == [[0, 0], [1, 2], [2, 4]]
    assert info["builder"] == {"_component_": "torchtune_kd.models.smollm2.smollm2_135m", "num_layers": 3}
    out = Path(info["out_dir"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert (out / smollm2.TIKTOKEN_FILENAME).read_text() == "dG9r 17\n"

    # Load the student like a recipe would, and compare with the teacher run on its kept layers only.
    checkpointer = FullModelHFCheckpointer(checkpoint_dir=str(out), checkpoint_files=["model.safetensors"],
                                           model_type="LLAMA3_2", output_dir=str(tmp_path / "ckpt_out"))
    student = _tiny(3).eval()
    student.load_state_dict(checkpointer.load_checkpoint()[MODEL_KEY])
    teacher.layers = torch.nn.ModuleList([teacher.layers[i] for i in (0, 2, 4)])
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(student(tokens), teacher(tokens), rtol=0, atol=0)


def test_student_build_is_idempotent_and_validated(tiny_teacher, tmp_path):
    teacher_dir, _ = tiny_teacher
    out = tmp_path / "student"
    first = smollm2.build_student_from_teacher(teacher_dir, out, keep_every=2)
    assert first["kept_layers"] == [0, 2, 4]
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again = smollm2.build_student_from_teacher(teacher_dir, out, keep_every=2)
    assert again == first and (out / "model.safetensors").stat().st_mtime_ns == stamp
    # A different choice rebuilds.
    other = smollm2.build_student_from_teacher(teacher_dir, out, num_layers=2)
    assert other["kept_layers"] == [0, 4]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        layers = {k.split(".")[2] for k in f.keys() if k.startswith("model.layers.")}
    assert layers == {"0", "1"}
    with pytest.raises(ValueError, match="is the teacher.s folder"):
        smollm2.build_student_from_teacher(teacher_dir, teacher_dir, num_layers=2)
    with pytest.raises(ValueError, match="needs config.json and model.safetensors"):
        smollm2.build_student_from_teacher(tmp_path / "nowhere", out, num_layers=2)


def test_builders_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"num_layers=0 is invalid"):
        smollm2.smollm2_135m(num_layers=0)
    with pytest.raises(ValueError, match="apply_lora_to_output=True is not possible"):
        smollm2.lora_smollm2_135m(["q_proj"], apply_lora_to_output=True, num_layers=1)


def test_lora_builder_matches_the_full_builder():
    torch.manual_seed(0)
    full = smollm2.smollm2_135m(num_layers=1, max_seq_len=64)
    lora = smollm2.lora_smollm2_135m(["q_proj", "v_proj"], apply_lora_to_mlp=True, num_layers=1, max_seq_len=64,
                                        lora_rank=4, lora_alpha=8)
    extra = set(lora.state_dict()) - set(full.state_dict())
    assert extra and all("lora_" in k for k in extra)
    assert set(full.state_dict()) <= set(lora.state_dict())
    # Zero-initialised adapters: the LoRA model computes the full model's function.
    lora.load_state_dict(full.state_dict(), strict=False)
    tokens = torch.randint(0, 49152, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lora(tokens), full(tokens))


# ---------------------------------------------------------------------------------------------------------------
# Fast: text data (pydoc only, fake wheels; no network)
# ---------------------------------------------------------------------------------------------------------------


def test_text_data_is_deterministic_and_disjoint(tmp_path):
    kwargs = dict(use_gensim=False, max_train=None, max_validation=None, max_heldout=None)
    paths = text_data.prepare_text_data(tmp_path / "a", **kwargs)
    again = text_data.prepare_text_data(tmp_path / "b", **kwargs)
    for key in ("train", "validation", "heldout_txt", "heldout_jsonl"):
        assert paths[key].read_bytes() == again[key].read_bytes()
    train = json.loads(paths["train"].read_text())
    validation = json.loads(paths["validation"].read_text())
    heldout = paths["heldout_txt"].read_text().splitlines()
    assert len(train) > 200 and len(validation) > 5 and len(heldout) > 10
    assert set(train[0]) == {"instruction", "input", "output"}
    words = [len(f"{r['input']} {r['output']}".split()) for r in train]
    assert max(math.ceil(1.4 * w) for w in words) <= 96
    # Documents are split (and repeated text removed): no held-out sentence appears anywhere in the training text.
    train_text = " ".join(f"{r['input']} {r['output']}" for r in train + validation)
    long_sentences = [s for p in heldout for s in text_data.split_sentences(p) if len(s.split()) >= 8]
    assert long_sentences and not any(s in train_text for s in long_sentences)
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["sources"]["pydoc"]["licence"] == "PSF-2.0" and "lee" not in manifest["sources"]
    # Idempotent: same settings reuse the files.
    stamp = paths["train"].stat().st_mtime_ns
    text_data.prepare_text_data(tmp_path / "a", **kwargs)
    assert paths["train"].stat().st_mtime_ns == stamp


def test_fake_gensim_wheel_is_refused_and_recorded(tmp_path):
    wheel = tmp_path / "gensim-4.4.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for member in text_data.GENSIM_CORPORA:
            z.writestr(member, "Not the Lee corpus. It is a fake.\n")
    with pytest.raises(ValueError, match="has SHA-256"):
        text_data.fetch_gensim_corpora(tmp_path / "cache", wheel=wheel)
    paths = text_data.prepare_text_data(tmp_path / "cache", gensim_wheel=wheel, max_train=10)
    manifest = json.loads(paths["manifest"].read_text())
    assert "SHA-256" in manifest["sources"]["lee"]["skipped"]
    assert manifest["records"]["train"] == 10


def test_lee_parsing_and_passages(tmp_path):
    corpus = tmp_path / "lee.cor"
    story = b"First story. It costs \xa33,000 today.\n"
    corpus.write_bytes(story + b"Second story here.\n" + story)
    docs = text_data.lee_documents({"lee.cor": corpus})
    assert [d.paragraphs[0] for d in docs] == ["First story. It costs \u00a33,000 today.", "Second story here."]
    text = "One two three. Four five six seven. Eight nine ten eleven twelve. Thirteen."
    count = lambda s: len(s.split())  # noqa: E731
    assert text_data.make_passages(text, max_tokens=8, min_tokens=1, count_tokens=count) == [
        "One two three. Four five six seven.", "Eight nine ten eleven twelve. Thirteen."]
    # A sentence longer than the limit is dropped, not cut.
    assert text_data.make_passages("a b c d e f g h i j.", 5, 1, count) == []
    record = text_data.to_alpaca("Alpha beta gamma. Delta epsilon zeta. Eta theta iota.", "lee")
    assert record == {"instruction": text_data.INSTRUCTIONS["lee"], "input": "Alpha beta gamma.",
                      "output": "Delta epsilon zeta. Eta theta iota."}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_tokens": 4}, r"max_tokens=4 is invalid"),
        ({"min_tokens": 200}, r"min_tokens=200 exceeds max_tokens=96"),
        ({"heldout_fraction": 0.7}, r"heldout_fraction=0.7 is invalid"),
        ({"max_train": 0}, r"max_train=0 is invalid"),
    ],
)
def test_text_data_rejects_bad_settings(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        text_data.prepare_text_data(tmp_path, use_gensim=False, **kwargs)


def test_smollm2_builder_takes_a_padded_vocabulary_and_refuses_a_smaller_one():
    import torch

    from torchtune_kd.models.smollm2 import smollm2_135m

    with torch.device("meta"):
        padded = smollm2_135m(num_layers=1, vocab_size=49280)
    assert padded.tok_embeddings.num_embeddings == 49280
    with pytest.raises(ValueError, match="vocab_size=100 must be an integer >= 49152"):
        smollm2_135m(num_layers=1, vocab_size=100)
