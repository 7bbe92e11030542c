"""The local stand-ins: tokenizer parity with transformers, HF round trips, determinism, data."""

import json
from pathlib import Path

import pytest
import torch

import kd_standins

TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and\ttabs\n\nnew lines   ",
    "Numbers 1234567 and 3.14159, 42nd, 1e-5.",
    "Unicode: café, naïve, Zürich, 日本語, emoji 🙂!",
    "def f(x):\n    return x ** 2  # comment",
    "don't won't I'll we've they're it's",
    "",
    "a",
    "!!!???...,,,",
]


@pytest.fixture(scope="module")
def tokenizers(tiny_assets):
    from torchtune.models.llama3 import llama3_tokenizer
    from transformers import AutoTokenizer

    tok_dir = Path(tiny_assets["tokenizer_dir"])
    ours = llama3_tokenizer(str(tok_dir / "tokenizer.model"), special_tokens_path=str(tok_dir / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(tiny_assets["student_dir"])
    return ours, hf


def test_tiktoken_and_transformers_give_identical_ids(tokenizers, tiny_assets):
    ours, hf = tokenizers
    texts = TEXTS + kd_standins.passages()[:30]
    for text in texts:
        expected = hf.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_bos=False, add_eos=False) == expected, text
        assert hf.decode(expected) == text
    assert ours.encode("hi", add_bos=True, add_eos=True)[0] == tiny_assets["bos_id"] == hf.bos_token_id
    assert ours.encode("hi", add_bos=True, add_eos=True)[-1] == tiny_assets["eos_id"] == hf.eos_token_id
    assert ours.pad_id == tiny_assets["pad_id"] == hf.pad_token_id
    assert hf.encode("hi")[0] == hf.bos_token_id  # transformers adds bos like Llama 3.2


def test_vocab_has_every_llama3_special_token_after_bpe(tiny_assets, tokenizers):
    ours, hf = tokenizers
    names = kd_standins.llama3_special_token_names()
    assert tiny_assets["vocab_size"] == tiny_assets["bpe_vocab_size"] + len(names)
    ids = [hf.convert_tokens_to_ids(n) for n in names]
    assert ids == list(range(tiny_assets["bpe_vocab_size"], tiny_assets["vocab_size"]))
    assert set(ours.special_tokens) == set(names)


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_checkpointer_and_transformers_agree(tiny_assets, tmp_path, which):
    from torchtune import training
    from torchtune.models.llama3 import llama3
    from transformers import AutoModelForCausalLM

    folder = tiny_assets[f"{which}_dir"]
    checkpointer = training.FullModelHFCheckpointer(
        checkpoint_dir=folder, checkpoint_files=["model.safetensors"], model_type="LLAMA3", output_dir=str(tmp_path)
    )
    model = llama3(**tiny_assets[f"{which}_kwargs"])
    model.load_state_dict(checkpointer.load_checkpoint()[training.MODEL_KEY])
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = torch.randint(0, tiny_assets["vocab_size"], (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model.eval()(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-4


def test_teacher_and_student_differ(tiny_assets):
    assert tiny_assets["teacher_kwargs"]["num_layers"] > tiny_assets["student_kwargs"]["num_layers"]
    assert tiny_assets["teacher_kwargs"]["embed_dim"] != tiny_assets["student_kwargs"]["embed_dim"]
    assert tiny_assets["weights_sha256"]["teacher"] != tiny_assets["weights_sha256"]["student"]


def test_build_is_deterministic_and_idempotent(tiny_assets, tmp_path):
    again = kd_standins.build_standins(tmp_path / "again")
    assert again["weights_sha256"] == tiny_assets["weights_sha256"]
    for name in ("tokenizer/tokenizer.model", "tokenizer/tokenizer.json", "data/alpaca_train.json"):
        assert (Path(again["root"]) / name).read_bytes() == (Path(tiny_assets["root"]) / name).read_bytes()
    stamp = (tmp_path / "again" / "manifest.json").stat().st_mtime_ns
    kd_standins.build_standins(tmp_path / "again")
    assert (tmp_path / "again" / "manifest.json").stat().st_mtime_ns == stamp


def test_alpaca_dataset_loads_the_data(tiny_assets):
    from torchtune.datasets import alpaca_dataset
    from torchtune.models.llama3 import llama3_tokenizer

    tok_dir = Path(tiny_assets["tokenizer_dir"])
    tokenizer = llama3_tokenizer(str(tok_dir / "tokenizer.model"), special_tokens_path=str(tok_dir / "tokenizer.json"), max_seq_len=256)
    ds = alpaca_dataset(tokenizer, source="json", data_files=tiny_assets["data"]["train"], split="train")
    assert len(ds) == 256
    sample = ds[0]
    assert len(sample["tokens"]) == len(sample["labels"]) <= 256
    assert any(label == -100 for label in sample["labels"]) and any(label != -100 for label in sample["labels"])
    train = {json.dumps(r) for r in json.loads(Path(tiny_assets["data"]["train"]).read_text())}
    held = {json.dumps(r) for r in json.loads(Path(tiny_assets["data"]["eval"]).read_text())}
    assert not train & held
