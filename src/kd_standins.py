"""Deterministic local stand-ins: a Llama 3 style tokenizer, a tiny teacher and student, alpaca-format data.

Tests and the CPU demo never touch the Hugging Face hub. :func:`build_standins` writes, into a folder it is given::

    tokenizer/tokenizer.model        tiktoken file (``base64(bytes) rank``) for torchtune's llama3_tokenizer
    tokenizer/tokenizer.json         the same BPE for transformers, Llama 3 special tokens after the BPE vocabulary
    tokenizer/tokenizer_config.json  bos / eos / pad like Llama 3.2
    teacher/, student/               Hugging Face Llama folders (model.safetensors, config.json,
                                     generation_config.json, tokenizer files) of different depth and width
    data/alpaca_train.json           alpaca records (instruction / input / output) from real English prose
    data/alpaca_eval.json            held-out records from other passages
    data/heldout.txt                 held-out plain text (perplexity)
    manifest.json                    sizes, builder kwargs, seeds and paths

Everything derives from fixed seeds and from English text that ships with CPython (``pydoc_data/topics.py``), so
two builds are byte-identical. The BPE is trained with the ``tokenizers`` library in about a second and
pre-tokenised with Llama 3's (cl100k) regex, so torchtune's tiktoken-based ``Llama3Tokenizer`` and transformers give
the same ids.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

FORMAT_VERSION = 1
BPE_VOCAB_SIZE = 1024
TEACHER = {"num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 128, "intermediate_dim": 352}
STUDENT = {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 64, "intermediate_dim": 176}
COMMON = {"max_seq_len": 512, "rope_base": 500000, "norm_eps": 1e-5}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")


def english_text() -> str:
    """English prose about Python that ships with every CPython (the pydoc topic help texts)."""
    origin = importlib.util.find_spec("pydoc_data.topics").origin
    namespace: dict[str, Any] = {}
    exec(compile(Path(origin).read_text(encoding="utf-8"), origin, "exec"), namespace)
    topics = namespace["topics"]
    return "\n\n".join(topics[key] for key in sorted(topics))


def passages(min_chars: int = 200, max_chars: int = 600) -> list[str]:
    """Paragraphs of :func:`english_text`, whitespace-normalised, of a length suited to tiny models."""
    out: dict[str, None] = {}  # ordered and de-duplicated: several topics repeat the same paragraph
    for block in english_text().split("\n\n"):
        text = " ".join(block.split())
        if min_chars < len(text) < max_chars:
            out[text] = None
    return list(out)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


def llama3_special_token_names() -> list[str]:
    """Every special-token name torchtune's Llama3Tokenizer knows, in Llama 3's id order."""
    from torchtune.models.llama3._tokenizer import LLAMA3_SPECIAL_TOKENS

    return sorted(LLAMA3_SPECIAL_TOKENS, key=lambda name: (LLAMA3_SPECIAL_TOKENS[name], name))


def build_tokenizer(out_dir: Path, bpe_vocab_size: int = BPE_VOCAB_SIZE) -> dict[str, Any]:
    """Train the byte-level BPE and write it for torchtune (tiktoken file) and transformers (tokenizer.json).

    Returns:
        dict: ``vocab_size`` (BPE + specials), ``bpe_vocab_size``, ``bos_id``, ``eos_id``, ``pad_id`` and paths.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from torchtune.models.llama3._tokenizer import CL100K_PATTERN

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CL100K_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    text = english_text()
    tokenizer.train_from_iterator((text[i : i + 4000] for i in range(0, len(text), 4000)), trainer)
    vocab = tokenizer.get_vocab()
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise RuntimeError("BPE vocabulary ids are not contiguous")

    unicode_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    lines = []
    for token, rank in sorted(vocab.items(), key=lambda item: item[1]):
        raw = bytes(unicode_to_byte[ch] for ch in token)
        lines.append(f"{base64.b64encode(raw).decode('ascii')} {rank}")
    (out_dir / "tokenizer.model").write_text("\n".join(lines) + "\n")

    names = llama3_special_token_names()
    tokenizer.add_special_tokens(names)
    special_ids = {name: tokenizer.token_to_id(name) for name in names}
    if sorted(special_ids.values()) != list(range(len(vocab), len(vocab) + len(names))):
        raise RuntimeError("special tokens were not appended right after the BPE vocabulary")
    bos, eos, pad = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"
    # Like Llama 3.2's tokenizer.json: transformers prepends <|begin_of_text|> (torchtune adds it via add_bos).
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, special_ids[bos])]
    )
    tokenizer.save(str(out_dir / "tokenizer.json"))

    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": bos,
                "eos_token": eos,
                "pad_token": pad,
                "add_bos_token": True,
                "add_eos_token": False,
                "model_max_length": COMMON["max_seq_len"],
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
    )
    return {
        "bpe_vocab_size": len(vocab),
        "vocab_size": len(vocab) + len(names),
        "bos_id": special_ids[bos],
        "eos_id": special_ids[eos],
        "pad_id": special_ids[pad],
        "dir": str(out_dir),
    }


def builder_kwargs(shape: dict[str, int], vocab_size: int) -> dict[str, Any]:
    """Keyword arguments for ``torchtune.models.llama3.llama3`` (the plain component builder)."""
    return {"vocab_size": vocab_size, **shape, **COMMON}


def hf_config(kwargs: dict[str, Any], tokens: dict[str, Any]) -> dict[str, Any]:
    """A transformers ``LlamaConfig`` dict matching torchtune's builder kwargs."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": kwargs["vocab_size"],
        "hidden_size": kwargs["embed_dim"],
        "intermediate_size": kwargs["intermediate_dim"],
        "num_hidden_layers": kwargs["num_layers"],
        "num_attention_heads": kwargs["num_heads"],
        "num_key_value_heads": kwargs["num_kv_heads"],
        "head_dim": kwargs["embed_dim"] // kwargs["num_heads"],
        "max_position_embeddings": kwargs["max_seq_len"],
        "rms_norm_eps": kwargs["norm_eps"],
        "rope_theta": float(kwargs["rope_base"]),
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": tokens["bos_id"],
        "eos_token_id": tokens["eos_id"],
        "pad_token_id": tokens["pad_id"],
    }


def init_small_(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Normal(0, std) weights, unit norms: torchtune's default init starts a fresh model at a loss near 90."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
            elif name.endswith("scale"):
                parameter.fill_(1.0)


def save_hf_model(model: torch.nn.Module, kwargs: dict[str, Any], tokens: dict[str, Any], out_dir: Path) -> None:
    """Write a torchtune Llama as a Hugging Face folder (weights, config, generation config, tokenizer files)."""
    from safetensors.torch import save_file
    from torchtune.models import convert_weights

    out_dir.mkdir(parents=True, exist_ok=True)
    hf_state = convert_weights.tune_to_hf(
        model.state_dict(), num_heads=kwargs["num_heads"], num_kv_heads=kwargs["num_kv_heads"], dim=kwargs["embed_dim"]
    )
    save_file({k: v.contiguous() for k, v in sorted(hf_state.items())}, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config(kwargs, tokens), indent=2))
    (out_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": tokens["bos_id"], "eos_token_id": tokens["eos_id"], "pad_token_id": tokens["pad_id"]}, indent=2)
    )
    for name in TOKENIZER_FILES:
        shutil.copyfile(Path(tokens["dir"]) / name, out_dir / name)


def build_alpaca_data(out_dir: Path, num_train: int = 256, num_eval: int = 64) -> dict[str, str]:
    """Alpaca records from pydoc passages: continue a passage from its first half; disjoint eval and held-out text."""
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = passages()
    generator = torch.Generator().manual_seed(1234)
    order = torch.randperm(len(texts), generator=generator).tolist()
    shuffled = [texts[i] for i in order]

    def record(text: str) -> dict[str, str]:
        words = text.split(" ")
        cut = max(1, len(words) // 2)
        return {"instruction": "Continue the text.", "input": " ".join(words[:cut]), "output": " ".join(words[cut:])}

    train = [record(t) for t in shuffled[:num_train]]
    held = shuffled[num_train : num_train + num_eval]
    paths = {
        "train": out_dir / "alpaca_train.json",
        "eval": out_dir / "alpaca_eval.json",
        "heldout_text": out_dir / "heldout.txt",
    }
    paths["train"].write_text(json.dumps(train, indent=1))
    paths["eval"].write_text(json.dumps([record(t) for t in held], indent=1))
    paths["heldout_text"].write_text("\n\n".join(shuffled[num_train + num_eval : num_train + 2 * num_eval]) + "\n")
    return {k: str(v) for k, v in paths.items()}


def pretrain_teacher(model: torch.nn.Module, tokenizer_dir: Path, train_json: Path, steps: int, seed: int) -> list[float]:
    """Plain next-token CE on the training text, so a tiny teacher carries real signal for demos.

    Returns:
        list[float]: the loss of every step.
    """
    from torchtune.models.llama3 import llama3_tokenizer

    tokenizer = llama3_tokenizer(str(tokenizer_dir / "tokenizer.model"), special_tokens_path=str(tokenizer_dir / "tokenizer.json"))
    records = json.loads(Path(train_json).read_text())
    sequences = [tokenizer.encode(f"{r['input']} {r['output']}", add_bos=True, add_eos=True)[:128] for r in records]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    model.train()
    for _ in range(steps):
        batch_ids = torch.randint(0, len(sequences), (8,), generator=generator).tolist()
        length = max(len(sequences[i]) for i in batch_ids)
        tokens = torch.full((8, length), tokenizer.pad_id)
        for row, i in enumerate(batch_ids):
            tokens[row, : len(sequences[i])] = torch.tensor(sequences[i])
        labels = tokens.masked_fill(tokens == tokenizer.pad_id, -100)
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    model.eval()
    return losses


def build_standins(out_dir: Path, *, teacher_pretrain_steps: int = 0, force: bool = False) -> dict[str, Any]:
    """Build (or reuse) every stand-in into ``out_dir`` and return the manifest.

    Args:
        out_dir (Path): destination folder.
        teacher_pretrain_steps (int): CE steps to pre-train the teacher on the training text (0 = random teacher).
        force (bool): rebuild even if a manifest with the same parameters exists.

    Returns:
        dict: the manifest (also written to ``out_dir/manifest.json``): ``root``, ``tokenizer_dir``, ``teacher_dir``,
        ``student_dir``, ``data`` (paths), ``vocab_size``, ``teacher_kwargs`` / ``student_kwargs`` (torchtune builder
        kwargs), token ids, and the build parameters.
    """
    from torchtune.models.llama3 import llama3

    out_dir = Path(out_dir).resolve()
    params = {"format": FORMAT_VERSION, "teacher_pretrain_steps": int(teacher_pretrain_steps)}
    manifest_path = out_dir / "manifest.json"
    if manifest_path.is_file() and not force:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("params") == params and all(Path(manifest[k]).exists() for k in ("teacher_dir", "student_dir")):
            return manifest

    tokens = build_tokenizer(out_dir / "tokenizer")
    data = build_alpaca_data(out_dir / "data")
    teacher_kwargs = builder_kwargs(TEACHER, tokens["vocab_size"])
    student_kwargs = builder_kwargs(STUDENT, tokens["vocab_size"])

    torch.manual_seed(0)
    teacher = llama3(**teacher_kwargs)
    init_small_(teacher, seed=1)
    pretrain_losses = []
    if teacher_pretrain_steps > 0:
        pretrain_losses = pretrain_teacher(teacher, out_dir / "tokenizer", Path(data["train"]), teacher_pretrain_steps, seed=3)
    save_hf_model(teacher, teacher_kwargs, tokens, out_dir / "teacher")

    student = llama3(**student_kwargs)
    init_small_(student, seed=2)
    save_hf_model(student, student_kwargs, tokens, out_dir / "student")

    manifest = {
        "params": params,
        "root": str(out_dir),
        "tokenizer_dir": str(out_dir / "tokenizer"),
        "teacher_dir": str(out_dir / "teacher"),
        "student_dir": str(out_dir / "student"),
        "data": data,
        "vocab_size": tokens["vocab_size"],
        "bpe_vocab_size": tokens["bpe_vocab_size"],
        "bos_id": tokens["bos_id"],
        "eos_id": tokens["eos_id"],
        "pad_id": tokens["pad_id"],
        "teacher_kwargs": teacher_kwargs,
        "student_kwargs": student_kwargs,
        "teacher_pretrain_final_loss": pretrain_losses[-1] if pretrain_losses else None,
        "weights_sha256": {
            name: hashlib.sha256((out_dir / name / "model.safetensors").read_bytes()).hexdigest()
            for name in ("teacher", "student")
        },
    }
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest


def load_manifest(root: Path) -> Optional[dict[str, Any]]:
    path = Path(root) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None
