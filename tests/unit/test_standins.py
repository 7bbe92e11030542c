"""The local stand-in assets: tokenizer parity, Hugging Face round trips, small init, determinism, data, errors.

References are independent of ``standins``: token ids are checked between two separate implementations
(tiktoken via torchtune, ``tokenizers`` via transformers) and against the raw bytes of the ``tokenizer.model``
file; logits between torchtune (through its checkpointer) and transformers; the loss from its definition in
float64.
"""

from __future__ import annotations

import base64
import inspect
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from torchtune_kd.testing import standins

TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\t\ttabs, CRLF\r\nline\rreturns",
    "runs of whitespace:        eight spaces\n\n\n\nfour new lines \n \n",
    "Numbers 1234567 and 3.14159, 42nd, 1e-5, 0x1F, -7, 1,000,000.",
    "Unicode: café, naïve, Zürich, Ærøskøbing, straße, ﬁ ligature",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "Emoji 🙂👍🏽 and flags 🇫🇷, ZWJ 👩‍💻",
    "RTL: مرحبا بالعالم, שלום עולם",
    "combining: e\u0301 a\u0308 n\u0303; NBSP\u00a0here; zero\u200bwidth",
    "def f(x):\n    return x ** 2  # comment\n",
    "don't won't I'll we've they're it's HE'S SHE'D",
    '{"json": [1, 2, 3], "nested": {"a": null}}',
    "<html><body class='x'>text &amp; more</body></html>",
    "",
    "a",
    " ",
    "\n",
    "!!!???...,,,;;;",
    "URL https://example.com/path?q=1&r=two#frag and e-mail a.b@c.org",
    "Mixed CASE WoRdS and snake_case and camelCase and SCREAMING_CASE",
    "Control \x00\x01\x07 bytes and DEL \x7f",
    "A very long word: " + "pneumonoultramicroscopicsilicovolcanoconiosis" * 3,
]


def _torchtune_tokenizer(tokenizer_dir: str, max_seq_len: int | None = None):
    from torchtune.models.llama3 import llama3_tokenizer

    root = Path(tokenizer_dir)
    return llama3_tokenizer(
        str(root / "tokenizer.model"), special_tokens_path=str(root / "tokenizer.json"), max_seq_len=max_seq_len
    )


@pytest.fixture(scope="module")
def tokenizers(tiny_assets: dict[str, Any]):
    from transformers import AutoTokenizer

    ours = _torchtune_tokenizer(tiny_assets["tokenizer_dir"])
    hf = AutoTokenizer.from_pretrained(tiny_assets["student_dir"])
    return ours, hf


def test_tiktoken_and_transformers_give_identical_ids(tokenizers, tiny_assets):
    ours, hf = tokenizers
    # Whole topics too: each is far below the 400k characters at which torchtune's tiktoken wrapper cuts its input.
    topics = [body for _, body in standins.pydoc_topics()]
    texts = TEXTS + [p for _, p, _ in standins.pydoc_paragraphs()[:40]] + topics
    for text in texts:
        plain = hf.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_bos=False, add_eos=False) == plain, text[:80]
        # transformers prepends <|begin_of_text|> like Llama 3.2; torchtune's add_bos does the same.
        assert hf.encode(text, add_special_tokens=True) == [tiny_assets["bos_id"], *plain]
        if text:  # torchtune returns [] for "" whatever add_bos / add_eos say
            assert ours.encode(text, add_bos=True, add_eos=False) == [tiny_assets["bos_id"], *plain]
            assert ours.encode(text, add_bos=True, add_eos=True) == [
                tiny_assets["bos_id"], *plain, tiny_assets["eos_id"]
            ]
        assert hf.decode(plain) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
        tiny_assets["bos_id"], tiny_assets["eos_id"], tiny_assets["pad_id"]
    )


def test_ids_spell_the_text_bytes(tokenizers, tiny_assets):
    """Reference decoder from the tiktoken file's definition: id -> base64 bytes, concatenated = UTF-8 text."""
    ours, _ = tokenizers
    table: dict[int, bytes] = {}
    for line in (Path(tiny_assets["tokenizer_dir"]) / "tokenizer.model").read_text().splitlines():
        token, rank = line.split()
        table[int(rank)] = base64.b64decode(token)
    assert sorted(table) == list(range(tiny_assets["bpe_vocab_size"]))
    assert len(set(table.values())) == len(table), "two ranks share the same bytes"
    assert {value for value in table.values() if len(value) == 1} == {bytes([b]) for b in range(256)}
    for text in TEXTS:
        ids = ours.encode(text, add_bos=False, add_eos=False)
        assert b"".join(table[i] for i in ids) == text.encode("utf-8")
    # A small BPE still compresses its own training text well below one token per character.
    paragraph = standins.pydoc_paragraphs()[0][1]
    assert len(ours.encode(paragraph, add_bos=False, add_eos=False)) < 0.5 * len(paragraph)


def test_every_llama3_special_token_follows_the_bpe(tokenizers, tiny_assets):
    from torchtune.models.llama3._tokenizer import LLAMA3_SPECIAL_TOKENS

    ours, hf = tokenizers
    bpe = tiny_assets["bpe_vocab_size"]
    assert bpe == standins.BPE_VOCAB_SIZE == 1024
    assert tiny_assets["vocab_size"] == bpe + len(LLAMA3_SPECIAL_TOKENS) == 1280
    names_by_llama_id = sorted(LLAMA3_SPECIAL_TOKENS, key=LLAMA3_SPECIAL_TOKENS.get)
    expected = {name: bpe + i for i, name in enumerate(names_by_llama_id)}
    assert ours.special_tokens == expected
    assert {name: hf.convert_tokens_to_ids(name) for name in expected} == expected
    for name in ("<|image|>", "<|step_id|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_244|>"):
        assert name in expected
    assert hf.convert_ids_to_tokens(tiny_assets["bos_id"]) == "<|begin_of_text|>"
    assert hf.convert_ids_to_tokens(tiny_assets["eos_id"]) == "<|end_of_text|>"
    assert len(hf) == tiny_assets["vocab_size"]
    config = json.loads((Path(tiny_assets["tokenizer_dir"]) / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"
    )


def test_model_folders_are_complete(tiny_assets):
    for which in ("teacher", "student"):
        folder = Path(tiny_assets[f"{which}_dir"])
        for name in ("model.safetensors", "config.json", "generation_config.json", *standins.TOKENIZER_FILES):
            assert (folder / name).is_file(), f"{which} lacks {name}"
        for name in standins.TOKENIZER_FILES:
            assert (folder / name).read_bytes() == (Path(tiny_assets["tokenizer_dir"]) / name).read_bytes()
        config = json.loads((folder / "config.json").read_text())
        kwargs = tiny_assets[f"{which}_kwargs"]
        assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
        assert config["rope_scaling"] is None and config["tie_word_embeddings"] is False
        assert config["torch_dtype"] == "float32"
        assert (config["bos_token_id"], config["eos_token_id"]) == (tiny_assets["bos_id"], tiny_assets["eos_id"])
        assert (config["num_hidden_layers"], config["hidden_size"]) == (kwargs["num_layers"], kwargs["embed_dim"])
        assert config["rope_theta"] == kwargs["rope_base"] == 500000
        assert config["vocab_size"] == kwargs["vocab_size"] == tiny_assets["vocab_size"]


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_checkpointer_and_transformers_give_the_same_logits(tiny_assets, tmp_path, which):
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
    # 48 positions: a wrong rope_theta (10000) shows up as ~1e-2 here, far above the tolerance.
    tokens = torch.randint(0, tiny_assets["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.eval()(tokens)  # (bsz, seq_len, vocab)
        theirs = hf(tokens).logits
    assert ours.shape == theirs.shape == (2, 48, tiny_assets["vocab_size"])
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_small_init_starts_near_uniform_loss(tiny_assets, which):
    from safetensors.torch import load_file
    from torchtune.models import convert_weights
    from torchtune.models.llama3 import llama3

    weights = load_file(str(Path(tiny_assets[f"{which}_dir"]) / "model.safetensors"))
    for name, tensor in weights.items():
        assert tensor.dtype == torch.float32
        if name.endswith("norm.weight"):
            assert torch.equal(tensor, torch.ones_like(tensor)), name
        else:
            assert abs(tensor.double().std().item() - 0.02) < 0.002, name
            assert abs(tensor.double().mean().item()) < 0.002, name
    assert not torch.equal(weights["model.embed_tokens.weight"], weights["lm_head.weight"])  # untied

    model = llama3(**tiny_assets[f"{which}_kwargs"])
    kwargs = tiny_assets[f"{which}_kwargs"]
    model.load_state_dict(
        convert_weights.hf_to_tune(
            weights, num_heads=kwargs["num_heads"], num_kv_heads=kwargs["num_kv_heads"], dim=kwargs["embed_dim"]
        )
    )
    tokens = torch.randint(0, tiny_assets["bpe_vocab_size"], (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model.eval()(tokens).double()  # (bsz, seq_len, vocab)
    # CE from its definition: -log softmax(logits)[next token], averaged over predicted positions.
    shifted, targets = logits[:, :-1], tokens[:, 1:]
    log_z = torch.log(torch.exp(shifted - shifted.max(-1, keepdim=True).values).sum(-1)) + shifted.max(-1).values
    loss = (log_z - shifted.gather(-1, targets.unsqueeze(-1)).squeeze(-1)).mean().item()
    assert abs(loss - math.log(tiny_assets["vocab_size"])) < 0.1  # torchtune's default init would give ~90


def test_teacher_and_student_differ(tiny_assets):
    teacher, student = tiny_assets["teacher_kwargs"], tiny_assets["student_kwargs"]
    assert (teacher["num_layers"], teacher["embed_dim"]) == (4, 128)
    assert (student["num_layers"], student["embed_dim"]) == (2, 64)
    assert teacher["vocab_size"] == student["vocab_size"] == tiny_assets["vocab_size"]
    assert tiny_assets["weights_sha256"]["teacher"] != tiny_assets["weights_sha256"]["student"]
    from torchtune.models.llama3 import llama3

    for which in ("teacher", "student"):
        # The builder kwargs are exactly torchtune's llama3 signature: configs can pass them through.
        assert set(tiny_assets[f"{which}_kwargs"]) <= set(inspect.signature(llama3).parameters)


class RebuildStarted(Exception):
    """Raised by a stubbed first build step: proves build_all started a rebuild without paying for one."""


def test_build_is_deterministic_and_idempotent(tiny_assets, tmp_path, monkeypatch):
    again = standins.build_all(tmp_path / "again")
    first_root, second_root = Path(tiny_assets["root"]), Path(again["root"])

    def asset_files(root: Path) -> list[Path]:
        return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.name != "manifest.json")

    files = asset_files(first_root)
    assert files == asset_files(second_root)
    for relative in files:
        assert (first_root / relative).read_bytes() == (second_root / relative).read_bytes(), relative
    assert again["weights_sha256"] == tiny_assets["weights_sha256"]
    located = ("root", "tokenizer_dir", "teacher_dir", "student_dir", "data")
    assert {k: v for k, v in again.items() if k not in located} == {
        k: v for k, v in tiny_assets.items() if k not in located
    }

    manifest = second_root / "manifest.json"
    stamps = {p: p.stat().st_mtime_ns for p in second_root.rglob("*") if p.is_file()}
    assert standins.build_all(second_root) == again
    assert {p: p.stat().st_mtime_ns for p in second_root.rglob("*") if p.is_file()} == stamps  # nothing rewritten

    # From here on a rebuild stops at its first step: the build above already showed what one writes.
    def first_step(*args: Any, **kwargs: Any) -> None:
        raise RebuildStarted

    monkeypatch.setattr(standins, "build_tokenizer", first_step)
    with pytest.raises(RebuildStarted):
        standins.build_all(second_root, force=True)
    # The manifest goes first, so the build cut short here is never mistaken for a complete one.
    assert not manifest.exists() and standins.load_manifest(second_root) is None
    with pytest.raises(RebuildStarted):
        standins.build_all(second_root)


def test_alpaca_dataset_loads_train_and_eval(tiny_assets):
    from torchtune.datasets import alpaca_dataset

    tokenizer = _torchtune_tokenizer(tiny_assets["tokenizer_dir"], max_seq_len=256)
    sizes = {"train": 256, "eval": 64}
    for split, size in sizes.items():
        records = json.loads(Path(tiny_assets["data"][split]).read_text())
        assert len(records) == size == tiny_assets[f"num_{split}"]
        assert all(set(r) == {"instruction", "input", "output"} and r["output"] for r in records)
        dataset = alpaca_dataset(tokenizer, source="json", data_files=tiny_assets["data"][split], split="train")
        assert len(dataset) == size
        lengths = []
        for i in range(len(dataset)):
            sample = dataset[i]
            assert len(sample["tokens"]) == len(sample["labels"])
            assert sample["tokens"][0] == tiny_assets["bos_id"] and sample["tokens"][-1] == tiny_assets["eos_id"]
            masked = [label == -100 for label in sample["labels"]]
            assert masked[0] and not all(masked)  # prompt masked, response trained
            lengths.append(len(sample["tokens"]))
        assert max(lengths) <= 200  # untruncated: the limit above (256) never bites
    instructions = {r["instruction"] for r in json.loads(Path(tiny_assets["data"]["train"]).read_text())}
    assert "Continue the text." in instructions and any(i.startswith("Explain ") for i in instructions)


def test_splits_share_no_text(tiny_assets):
    def paragraphs(split: str) -> set[str]:
        records = json.loads(Path(tiny_assets["data"][split]).read_text())
        return {f"{r['input']} {r['output']}".strip() for r in records}

    train, evaluation = paragraphs("train"), paragraphs("eval")
    heldout = set(Path(tiny_assets["data"]["heldout_text"]).read_text().strip().split("\n\n"))
    assert len(heldout) == tiny_assets["num_heldout"] == 64
    assert not train & evaluation and not train & heldout and not evaluation & heldout


def test_pretraining_lowers_the_loss_deterministically(tiny_assets):
    from torchtune.models.llama3 import llama3

    def run() -> tuple[list[float], torch.Tensor]:
        model = llama3(**tiny_assets["student_kwargs"])
        standins.init_small_(model, seed=5)
        losses = standins.pretrain_causal_lm(
            model, tokenizer_dir=tiny_assets["tokenizer_dir"], train_json=tiny_assets["data"]["train"], steps=6,
            batch_size=2, max_seq_len=64, lr=1e-2,
        )
        return losses, model.output.weight.detach().clone()

    losses, weight = run()
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.3
    again, weight_again = run()
    assert again == losses and torch.equal(weight, weight_again)


def test_build_llama_model_returns_builder_kwargs(tiny_assets, tmp_path):
    from torchtune.models.llama3 import llama3

    kwargs = standins.build_llama_model(
        tmp_path / "m", tokenizer_dir=tiny_assets["tokenizer_dir"], num_layers=1, embed_dim=32, num_heads=2,
        num_kv_heads=1, intermediate_dim=48, seed=7,
    )
    assert kwargs == {
        "vocab_size": 1280, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "embed_dim": 32,
        "intermediate_dim": 48, "max_seq_len": 512, "rope_base": 500000, "norm_eps": 1e-5,
    }
    llama3(**kwargs)  # the kwargs build
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_global_rng_is_left_alone(tiny_assets, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    standins.build_llama_model(
        tmp_path / "m", tokenizer_dir=tiny_assets["tokenizer_dir"], num_layers=1, embed_dim=32, num_heads=2,
        num_kv_heads=1, intermediate_dim=48, seed=7,
    )
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda d, t: standins.build_tokenizer(d, bpe_vocab_size=100), "bpe_vocab_size=100"),
        (lambda d, t: standins.build_all(d, teacher_pretrain_steps=-1), "teacher_pretrain_steps=-1"),
        (lambda d, t: standins.build_llama_model(
            d, tokenizer_dir=t, num_layers=1, embed_dim=30, num_heads=4, num_kv_heads=2, intermediate_dim=8, seed=0
        ), "embed_dim=30"),
        (lambda d, t: standins.build_llama_model(
            d, tokenizer_dir=t, num_layers=1, embed_dim=32, num_heads=4, num_kv_heads=3, intermediate_dim=8, seed=0
        ), "num_kv_heads=3"),
        (lambda d, t: standins.build_llama_model(
            d, tokenizer_dir=t, num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=1, intermediate_dim=8, seed=0,
            pretrain_steps=2,
        ), "pretrain_data=None"),
        (lambda d, t: standins.build_llama_model(
            d, tokenizer_dir=d, num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=1, intermediate_dim=8, seed=0
        ), "tokenizer_dir="),
        (lambda d, t: standins.build_alpaca_data(d, tokenizer_dir=t, num_train=5000), "num_train \\+ num_eval"),
        (lambda d, t: standins.build_alpaca_data(d, tokenizer_dir=t, num_eval=0), "num_eval=0"),
    ],
)
def test_bad_input_is_a_clear_value_error(tiny_assets, tmp_path, call, match):
    with pytest.raises(ValueError, match=match):
        call(tmp_path / "out", tiny_assets["tokenizer_dir"])


def test_cli_reuses_an_up_to_date_folder(tiny_assets, tmp_path, capsys):
    from torchtune_kd.cli import build_tiny_assets as module

    manifest = Path(tiny_assets["root"]) / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert module.main([tiny_assets["root"]]) == 0
    assert json.loads(capsys.readouterr().out)["weights_sha256"] == tiny_assets["weights_sha256"]
    assert manifest.stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit):
        module.parse_args([str(tmp_path), "--teacher-pretrain-steps", "-3"])


def test_offline_environment_is_set():
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        assert os.environ[name] == "1"
    assert os.environ["WANDB_MODE"] == "offline"
