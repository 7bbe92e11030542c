"""Deterministic local stand-in assets: a Llama 3 style tokenizer, a tiny teacher and student, alpaca data.

Tests and the CPU demo never touch the Hugging Face hub. Everything here is derived from fixed seeds and from
English prose that ships with every CPython (``pydoc_data/topics.py``), and :func:`build_all` writes it in a few
seconds::

    OUT/tokenizer/tokenizer.model        tiktoken file (``base64(token_bytes) rank`` per line) for torchtune
    OUT/tokenizer/tokenizer.json         the same BPE for transformers; Llama 3 special tokens after the BPE ids
    OUT/tokenizer/tokenizer_config.json  bos / eos / pad like Llama 3.2, for transformers and lm-eval
    OUT/teacher/                         Hugging Face Llama folder: model.safetensors, config.json,
                                         generation_config.json and the three tokenizer files
    OUT/student/                         the same, shallower and narrower
    OUT/data/alpaca_train.json           alpaca records (instruction / input / output)
    OUT/data/alpaca_eval.json            held-out alpaca records (other passages)
    OUT/data/heldout.txt                 held-out plain text, blank-line separated (perplexity)
    OUT/manifest.json                    everything below
    OUT/.torchtune_kd_outputs.json       the output-folder marker: the entries above are build_all's own

Manifest keys (stable; other tests depend on them). Paths are **absolute ``str``** (JSON has no ``Path``); wrap
them in ``pathlib.Path`` where needed:

- ``format_version`` (int), ``params`` (dict): the build parameters; a rebuild happens only when they change.
- ``root``, ``tokenizer_dir``, ``teacher_dir``, ``student_dir`` (str): absolute folders.
- ``data`` (dict of str): ``train``, ``eval`` (alpaca JSON lists), ``heldout_text`` (plain text).
- ``num_train``, ``num_eval``, ``num_heldout`` (int): record / passage counts.
- ``vocab_size`` (int, model vocabulary = ``bpe_vocab_size`` + ``num_special_tokens``), ``bpe_vocab_size``,
  ``num_special_tokens``, ``bos_id``, ``eos_id``, ``pad_id`` (int).
- ``teacher_kwargs``, ``student_kwargs`` (dict): keyword arguments for ``torchtune.models.llama3.llama3``.
- ``seeds`` (dict of int): ``teacher``, ``student``, ``data``, ``pretrain``.
- ``teacher_pretrain_steps`` (int), ``teacher_pretrain_losses`` (list of float),
  ``teacher_pretrain_final_loss`` (float or None).
- ``weights_sha256`` (dict of str): ``teacher``, ``student``: SHA-256 of each ``model.safetensors``.
- ``source_text_sha256`` (str), ``python_version`` (str): the pydoc text differs between CPython releases, so
  assets are reproducible byte for byte for a given CPython (and, with pre-training, a given thread count).

Tokenizer notes. The BPE is trained with the ``tokenizers`` library and pre-tokenised with Llama 3's (cl100k)
regex, so torchtune's tiktoken-based ``Llama3Tokenizer`` and transformers produce the same ids for ordinary text.
Strings spelling a special token (``"<|eot_id|>"``) differ by design: transformers maps them to the special id,
torchtune's ``encode`` treats them as plain text.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import math
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from torchtune_kd import output_folder

__all__ = [
    "BPE_VOCAB_SIZE",
    "DATA_SIZES",
    "FORMAT_VERSION",
    "MODEL_COMMON",
    "OWNER",
    "SEEDS",
    "STUDENT_SHAPE",
    "write_random_checkpoint",
    "TEACHER_SHAPE",
    "TOKENIZER_FILES",
    "build_all",
    "build_alpaca_data",
    "build_llama_model",
    "build_tokenizer",
    "hf_llama_config",
    "init_small_",
    "llama3_special_token_names",
    "load_manifest",
    "pretrain_causal_lm",
    "pydoc_paragraphs",
    "pydoc_text",
    "pydoc_topics",
    "read_tokenizer_info",
]

FORMAT_VERSION = 1
BPE_VOCAB_SIZE = 1024
# The owner (output_folder's marker) of a folder build_all claims, whichever command asked for it: one stand-ins
# folder serves every script (scripts/build_tiny_assets.py OUT, then scripts/experiment.py --assets OUT).
OWNER = "torchtune_kd.testing.standins"
# The top-level entries build_all writes.
_ENTRIES = ("manifest.json", "tokenizer", "data", "teacher", "student")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|finetune_right_pad_id|>"

# Model shapes: head_dim 32 (teacher) and 16 (student), SwiGLU width ~2.75x like Llama 3.2, GQA 2 queries per kv.
TEACHER_SHAPE = {"num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 128, "intermediate_dim": 352}
STUDENT_SHAPE = {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 64, "intermediate_dim": 176}
MODEL_COMMON = {"max_seq_len": 512, "rope_base": 500000, "norm_eps": 1e-5}
SEEDS = {"teacher": 1, "student": 2, "data": 1234, "pretrain": 3}
DATA_SIZES = {"num_train": 256, "num_eval": 64, "num_heldout": 64, "max_tokens": 200}

_MIN_BPE_VOCAB = 257  # the 256 byte tokens plus at least one merge
_MAX_BPE_VOCAB = 8192  # pydoc text runs out of frequent pairs well before this; keeps training ~1 s


# --------------------------------------------------------------------------------------------------- text source
def pydoc_text() -> str:
    """English prose about Python shipped with every CPython: the pydoc topic help texts, in sorted topic order.

    Returns:
        str: about 465k characters (CPython 3.11); topics joined by blank lines.
    """
    return "\n\n".join(body for _, body in pydoc_topics())


def pydoc_topics() -> list[tuple[str, str]]:
    spec = importlib.util.find_spec("pydoc_data.topics")
    if spec is None or spec.origin is None:
        raise RuntimeError("this Python has no pydoc_data.topics module; the stand-in assets need its text")
    origin = Path(spec.origin)
    # Read from the file the import system would load (one dict literal), without importing it as a module.
    namespace: dict[str, Any] = {}
    exec(compile(origin.read_text(encoding="utf-8"), str(origin), "exec"), namespace)
    topics: dict[str, str] = namespace["topics"]
    return [(key, topics[key]) for key in sorted(topics)]


_UNDERLINE = re.compile(r"^([*=\-^~\"'#+])\1{2,}$")


def pydoc_paragraphs(min_chars: int = 120, max_chars: int = 900) -> list[tuple[str, str, bool]]:
    """Prose paragraphs of the pydoc topics with the heading of the section they belong to.

    Indented blocks (grammar, code, tables) are skipped; line wraps are joined so a paragraph is one line.
    Paragraphs repeated across topics are kept once, at their first occurrence.

    Args:
        min_chars (int): shortest paragraph kept, in characters.
        max_chars (int): longest paragraph kept, in characters.

    Returns:
        list[tuple[str, str, bool]]: ``(heading, paragraph, is_first_paragraph_of_section)`` in document order.

    Raises:
        ValueError: if ``min_chars`` is not below ``max_chars`` or is negative.
    """
    if not 0 <= min_chars < max_chars:
        raise ValueError(f"min_chars={min_chars} must be >= 0 and below max_chars={max_chars}; pass e.g. 120 and 900")
    seen: set[str] = set()
    out: list[tuple[str, str, bool]] = []
    for _, body in pydoc_topics():
        heading, first = "", True
        for block in re.split(r"\n[ \t]*\n", body):
            lines = [line for line in block.split("\n") if line.strip()]
            if not lines:
                continue
            # A heading is one line underlined by a run of one punctuation character (reST style).
            if len(lines) == 2 and _UNDERLINE.match(lines[1].strip()):
                heading, first = " ".join(lines[0].split()), True
                continue
            if lines[0].startswith((" ", "\t")):
                continue  # grammar productions, code samples and tables are not prose
            text = " ".join(" ".join(lines).split())
            is_first, first = first, False
            if not min_chars <= len(text) <= max_chars or text in seen:
                continue
            seen.add(text)
            out.append((heading, text, is_first))
    return out


# ------------------------------------------------------------------------------------------------------ tokenizer
def llama3_special_token_names() -> list[str]:
    """Every special-token name torchtune's ``Llama3Tokenizer`` knows, in Llama 3's id order.

    torchtune 0.6.1 knows 256 names (ids 128000..128256 with 128011 unused); our tokenizer gives them the
    contiguous ids ``bpe_vocab_size + i`` in this order, so ``<|begin_of_text|>`` comes first and ``<|image|>`` last.

    Returns:
        list[str]: the names, ordered by their Llama 3 id.
    """
    from torchtune.models.llama3._tokenizer import LLAMA3_SPECIAL_TOKENS

    return sorted(LLAMA3_SPECIAL_TOKENS, key=lambda name: (LLAMA3_SPECIAL_TOKENS[name], name))


def _byte_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character table of byte-level BPE (as in GPT-2 and Llama 3).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...) are moved, in byte order,
    to code points from 256 upwards so that every token string is printable.
    """
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {byte: chr(byte) for byte in keep}
    shifted = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def _check_int(name: str, value: Any, low: int, high: Optional[int] = None, fix: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}={value!r} must be an int {bound}{'; ' + fix if fix else ''}")
    return value


def build_tokenizer(out_dir: Path, bpe_vocab_size: int = BPE_VOCAB_SIZE) -> dict[str, Any]:
    """Train the byte-level BPE on pydoc text and write it for torchtune and for transformers.

    Writes ``tokenizer.model`` (tiktoken ranks), ``tokenizer.json`` (BPE + every Llama 3 special token right after
    the BPE ids, post-processor prepending ``<|begin_of_text|>`` like Llama 3.2) and ``tokenizer_config.json``.

    Args:
        out_dir (Path): destination folder (created).
        bpe_vocab_size (int): BPE tokens including the 256 byte tokens.

    Returns:
        dict: ``dir`` (str), ``bpe_vocab_size``, ``num_special_tokens``, ``vocab_size`` (their sum, the model's
        vocabulary), ``bos_id``, ``eos_id``, ``pad_id``.

    Raises:
        ValueError: if ``bpe_vocab_size`` is out of range.
        RuntimeError: if the trained vocabulary does not come out as expected (a ``tokenizers`` change).
    """
    _check_int("bpe_vocab_size", bpe_vocab_size, _MIN_BPE_VOCAB, _MAX_BPE_VOCAB, "the default 1024 is a good size")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from torchtune.models.llama3._tokenizer import CL100K_PATTERN

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # ignore_merges: a pre-token that is itself in the vocabulary maps to that token directly, as tiktoken does.
    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CL100K_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tokenizer.train_from_iterator([body for _, body in pydoc_topics()], trainer)
    vocab = tokenizer.get_vocab()
    if sorted(vocab.values()) != list(range(len(vocab))) or len(vocab) != bpe_vocab_size:
        raise RuntimeError(f"BPE training gave {len(vocab)} non-contiguous or unexpected ids, wanted {bpe_vocab_size}")

    # tiktoken ranks are the BPE ids: the trainer numbers each merged token in merge order, which is the priority
    # tiktoken's lowest-rank-first merging needs.
    to_byte = {char: byte for byte, char in _byte_to_unicode().items()}
    lines = []
    for token, rank in sorted(vocab.items(), key=lambda item: item[1]):
        raw = bytes(to_byte[char] for char in token)
        lines.append(f"{base64.b64encode(raw).decode('ascii')} {rank}")
    (out_dir / "tokenizer.model").write_text("\n".join(lines) + "\n", encoding="ascii")

    names = llama3_special_token_names()
    tokenizer.add_special_tokens(names)
    ids = {name: tokenizer.token_to_id(name) for name in names}
    if [ids[name] for name in names] != list(range(len(vocab), len(vocab) + len(names))):
        raise RuntimeError("special tokens were not appended in order right after the BPE vocabulary")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, ids[BOS_TOKEN])],
    )
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=True)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        # Llama 3.2 base ships no pad token; torchtune pads with <|finetune_right_pad_id|>, and lm-eval batches
        # need one, so both sides agree on it here.
        "pad_token": PAD_TOKEN,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": MODEL_COMMON["max_seq_len"],
        # False (Llama 3.2 says True): decode must give the text back exactly, " ." and " 's" included.
        "clean_up_tokenization_spaces": False,
    }
    _write_json(out_dir / "tokenizer_config.json", config)
    return {
        "dir": str(out_dir.resolve()),
        "bpe_vocab_size": len(vocab),
        "num_special_tokens": len(names),
        "vocab_size": len(vocab) + len(names),
        "bos_id": ids[BOS_TOKEN],
        "eos_id": ids[EOS_TOKEN],
        "pad_id": ids[PAD_TOKEN],
    }


def read_tokenizer_info(tokenizer_dir: Path) -> dict[str, Any]:
    """Sizes and bos / eos / pad ids of a tokenizer folder written by :func:`build_tokenizer`.

    Args:
        tokenizer_dir (Path): folder holding ``tokenizer.model``, ``tokenizer.json`` and ``tokenizer_config.json``.

    Returns:
        dict: the same keys as :func:`build_tokenizer` returns.

    Raises:
        ValueError: if a tokenizer file is missing.
    """
    tokenizer_dir = Path(tokenizer_dir)
    missing = [name for name in TOKENIZER_FILES if not (tokenizer_dir / name).is_file()]
    if missing:
        raise ValueError(
            f"tokenizer_dir={str(tokenizer_dir)!r} lacks {missing}; build it first with build_tokenizer(tokenizer_dir)"
        )
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    specials = {token["content"]: token["id"] for token in data["added_tokens"]}
    bpe = len(data["model"]["vocab"])
    return {
        "dir": str(tokenizer_dir.resolve()),
        "bpe_vocab_size": bpe,
        "num_special_tokens": len(specials),
        "vocab_size": bpe + len(specials),
        "bos_id": specials[BOS_TOKEN],
        "eos_id": specials[EOS_TOKEN],
        "pad_id": specials[PAD_TOKEN],
    }


def _llama3_tokenizer(tokenizer_dir: Path, max_seq_len: Optional[int] = None):
    from torchtune.models.llama3 import llama3_tokenizer

    return llama3_tokenizer(
        str(Path(tokenizer_dir) / "tokenizer.model"),
        special_tokens_path=str(Path(tokenizer_dir) / "tokenizer.json"),
        max_seq_len=max_seq_len,
    )


# ----------------------------------------------------------------------------------------------------------- data
def build_alpaca_data(
    out_dir: Path,
    *,
    tokenizer_dir: Path,
    num_train: int = 256,
    num_eval: int = 64,
    num_heldout: int = 64,
    max_tokens: int = 200,
    seed: int = SEEDS["data"],
) -> dict[str, str]:
    """Alpaca-format records and held-out text from pydoc paragraphs, with disjoint train / eval / held-out text.

    The first paragraph of a section becomes ``"Explain <heading>."`` (empty input, the paragraph as output); any
    other paragraph becomes ``"Continue the text."`` with its first sentences as input and the rest as output.
    Paragraphs are shuffled with ``seed``; those whose record fits ``max_tokens`` are dealt to eval, then train;
    held-out text comes from the paragraphs left over (any length). No paragraph appears in two splits.

    Args:
        out_dir (Path): destination folder (created).
        tokenizer_dir (Path): tokenizer from :func:`build_tokenizer`, used to measure records.
        num_train (int): training records.
        num_eval (int): evaluation records.
        num_heldout (int): held-out plain-text paragraphs (``heldout.txt``).
        max_tokens (int): longest record as torchtune's ``alpaca_dataset`` tokenises it (alpaca prompt template,
            about 100 tokens with this small vocabulary, plus bos / eos included).
        seed (int): shuffling seed.

    Returns:
        dict[str, str]: absolute paths ``train``, ``eval`` (JSON lists of records) and ``heldout_text``.

    Raises:
        ValueError: if a count is not a positive int or the text does not hold enough paragraphs.
    """
    _check_int("num_train", num_train, 1)
    _check_int("num_eval", num_eval, 1)
    _check_int("num_heldout", num_heldout, 0)
    _check_int("max_tokens", max_tokens, 128, None, "the alpaca template alone takes about 100 tokens")
    _check_int("seed", seed, 0)
    from torchtune.data import AlpacaToMessages

    tokenizer = _llama3_tokenizer(tokenizer_dir)
    to_messages = AlpacaToMessages(train_on_input=False)
    paragraphs = pydoc_paragraphs(min_chars=60)
    order = torch.randperm(len(paragraphs), generator=torch.Generator().manual_seed(seed)).tolist()
    fitting: list[dict[str, str]] = []
    leftover: list[str] = []
    for index in order:
        heading, text, is_first = paragraphs[index]
        record = _make_record(heading, text, is_first)
        if len(fitting) < num_eval + num_train and record is not None:
            tokens, _ = tokenizer.tokenize_messages(to_messages(record)["messages"])
            if len(tokens) <= max_tokens:
                fitting.append(record)
                continue
        leftover.append(text)
    if len(fitting) < num_eval + num_train:
        raise ValueError(
            f"num_train + num_eval = {num_train + num_eval} exceeds the {len(fitting)} paragraphs whose records fit "
            f"max_tokens={max_tokens}; ask for fewer records or allow longer ones"
        )
    if len(leftover) < num_heldout:
        raise ValueError(f"num_heldout={num_heldout} exceeds the {len(leftover)} paragraphs left; ask for fewer")
    eval_records, train_records = fitting[:num_eval], fitting[num_eval:]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "train": out_dir / "alpaca_train.json",
        "eval": out_dir / "alpaca_eval.json",
        "heldout_text": out_dir / "heldout.txt",
    }
    _write_json(paths["train"], train_records)
    _write_json(paths["eval"], eval_records)
    paths["heldout_text"].write_text("\n\n".join(leftover[:num_heldout]) + "\n", encoding="utf-8")
    return {key: str(path.resolve()) for key, path in paths.items()}

_SENTENCE_END = re.compile(r"(?<=[.!?:])\s+(?=[A-Z\"(*])")


def _make_record(heading: str, text: str, is_first: bool) -> Optional[dict[str, str]]:
    if is_first and heading:
        return {"instruction": f"Explain {heading.rstrip('.')}.", "input": "", "output": text}
    # Cut at the sentence boundary nearest the middle so input and output are both real prose.
    cuts = [m.start() for m in _SENTENCE_END.finditer(text)]
    if not cuts:
        return None
    cut = min(cuts, key=lambda c: abs(c - len(text) / 2))
    return {"instruction": "Continue the text.", "input": text[:cut].strip(), "output": text[cut:].strip()}


# --------------------------------------------------------------------------------------------------------- models
def init_small_(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Re-initialise in place: every matrix (linear, embedding) ~ Normal(0, std), every norm scale = 1.

    torchtune's default init starts a tiny Llama at a CE loss near 90; this one starts near ``ln(vocab)``.
    Samples are drawn in float64 from a private generator (the scalar sampling path, the same on every CPU) and
    rounded to the parameter's dtype, so the weights do not depend on the machine or on the global RNG.

    Args:
        model (torch.nn.Module): the model to initialise.
        seed (int): generator seed.
        std (float): standard deviation of the matrices.

    Raises:
        ValueError: if ``std`` is not a positive finite number or the model has a 1-D parameter that is not a norm
            scale (this init would not know what to do with it).
    """
    if not (isinstance(std, (int, float)) and math.isfinite(std) and std > 0):
        raise ValueError(f"std={std!r} must be a positive finite float, e.g. 0.02")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2:
                sample = torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * std
                parameter.copy_(sample.to(parameter.dtype))
            elif name.endswith("scale"):
                parameter.fill_(1.0)
            else:
                raise ValueError(f"init_small_ does not know how to initialise parameter {name!r} of shape "
                                 f"{tuple(parameter.shape)}; only matrices and norm scales are handled")


def hf_llama_config(kwargs: dict[str, Any], tokens: dict[str, Any]) -> dict[str, Any]:
    """A transformers ``LlamaConfig`` dict for a model built with ``torchtune.models.llama3.llama3(**kwargs)``.

    Args:
        kwargs (dict): torchtune builder kwargs (``vocab_size``, ``num_layers``, ``num_heads``, ...).
        tokens (dict): ``bos_id``, ``eos_id``, ``pad_id``.

    Returns:
        dict: the ``config.json`` content (untied embeddings, no RoPE scaling, float32).
    """
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
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": "float32",
        "bos_token_id": tokens["bos_id"],
        "eos_token_id": tokens["eos_id"],
        "pad_token_id": tokens["pad_id"],
    }


def _validate_shape(num_layers: int, embed_dim: int, num_heads: int, num_kv_heads: int, intermediate_dim: int,
                    max_seq_len: int) -> None:
    _check_int("num_layers", num_layers, 1)
    _check_int("embed_dim", embed_dim, 2)
    _check_int("num_heads", num_heads, 1)
    _check_int("num_kv_heads", num_kv_heads, 1)
    _check_int("intermediate_dim", intermediate_dim, 1)
    _check_int("max_seq_len", max_seq_len, 2)
    if embed_dim % num_heads or (embed_dim // num_heads) % 2:
        raise ValueError(
            f"embed_dim={embed_dim} must split into num_heads={num_heads} heads of even size (RoPE rotates pairs); "
            f"pick embed_dim a multiple of 2*num_heads"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads} (grouped-query attention)")


def pretrain_causal_lm(
    model: torch.nn.Module,
    *,
    tokenizer_dir: Path,
    train_json: Path,
    steps: int,
    seed: int = SEEDS["pretrain"],
    batch_size: int = 8,
    lr: float = 3e-3,
    max_seq_len: int = 256,
) -> list[float]:
    """Train in place with plain next-token CE on the alpaca training records, as the KD recipe will tokenise them.

    Samples are torchtune's ``alpaca_dataset`` tokens (prompt template included, every position trained), so a
    pre-trained teacher carries real signal on exactly the sequences distillation shows it. Deterministic for a
    fixed seed and thread count (CPU reductions may round differently with other thread counts).

    Args:
        model (torch.nn.Module): a torchtune decoder; left in eval mode.
        tokenizer_dir (Path): tokenizer folder from :func:`build_tokenizer`.
        train_json (Path): alpaca JSON list from :func:`build_alpaca_data`.
        steps (int): optimiser steps (0 returns at once).
        seed (int): batch-sampling seed.
        batch_size (int): sequences per step.
        lr (float): AdamW peak learning rate (linear warm-up over 10% of the steps, cosine decay to 10%).
        max_seq_len (int): sequences are truncated to this many tokens.

    Returns:
        list[float]: the mean token loss of every step.

    Raises:
        ValueError: for a negative ``steps`` or a non-positive ``batch_size`` / ``lr`` / ``max_seq_len``.
    """
    _check_int("steps", steps, 0)
    _check_int("batch_size", batch_size, 1)
    _check_int("max_seq_len", max_seq_len, 2)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr!r} must be a positive finite float, e.g. 3e-3")
    if steps == 0:
        return []
    from torchtune.datasets import alpaca_dataset

    tokenizer = _llama3_tokenizer(tokenizer_dir, max_seq_len=max_seq_len)
    dataset = alpaca_dataset(tokenizer, source="json", data_files=str(train_json), split="train")
    sequences = [dataset[i]["tokens"] for i in range(len(dataset))]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    losses: list[float] = []
    model.train()
    for _ in range(steps):
        picks = torch.randint(len(sequences), (batch_size,), generator=generator).tolist()
        length = max(len(sequences[i]) for i in picks)
        tokens = torch.full((batch_size, length), tokenizer.pad_id, dtype=torch.long)  # (bsz, seq_len)
        for row, index in enumerate(picks):
            tokens[row, : len(sequences[index])] = torch.tensor(sequences[index])
        targets = tokens[:, 1:].masked_fill(tokens[:, 1:] == tokenizer.pad_id, -100)  # (bsz, seq_len - 1)
        logits = model(tokens)[:, :-1]  # (bsz, seq_len - 1, vocab)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _build_model(
    out_dir: Path,
    *,
    tokenizer_dir: Path,
    num_layers: int,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_dim: int,
    seed: int,
    max_seq_len: int,
    rope_base: int,
    norm_eps: float,
    init_std: float,
    pretrain_steps: int,
    pretrain_data: Optional[Path],
) -> tuple[dict[str, Any], list[float]]:
    _validate_shape(num_layers, embed_dim, num_heads, num_kv_heads, intermediate_dim, max_seq_len)
    _check_int("seed", seed, 0)
    _check_int("pretrain_steps", pretrain_steps, 0)
    if pretrain_steps > 0 and (pretrain_data is None or not Path(pretrain_data).is_file()):
        raise ValueError(
            f"pretrain_data={pretrain_data!r} must be an alpaca JSON file when pretrain_steps={pretrain_steps} > 0; "
            f"build one with build_alpaca_data"
        )
    from safetensors.torch import save_file
    from torchtune.models import convert_weights
    from torchtune.models.llama3 import llama3

    tokens = read_tokenizer_info(tokenizer_dir)
    kwargs = {
        "vocab_size": tokens["vocab_size"],
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "embed_dim": embed_dim,
        "intermediate_dim": intermediate_dim,
        "max_seq_len": max_seq_len,
        "rope_base": rope_base,
        "norm_eps": norm_eps,
    }
    # The builder's own init draws from the global RNG; fork it so building assets never shifts a caller's seeds.
    with torch.random.fork_rng(devices=[]):
        model = llama3(**kwargs)
    init_small_(model, seed=seed, std=init_std)
    losses: list[float] = []
    if pretrain_steps:
        losses = pretrain_causal_lm(
            model, tokenizer_dir=tokenizer_dir, train_json=Path(pretrain_data), steps=pretrain_steps
        )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_state = convert_weights.tune_to_hf(
        model.state_dict(), num_heads=num_heads, num_kv_heads=num_kv_heads, dim=embed_dim,
        head_dim=embed_dim // num_heads,
    )
    save_file(
        {key: value.detach().contiguous() for key, value in hf_state.items()},
        str(out_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    _write_json(out_dir / "config.json", hf_llama_config(kwargs, tokens))
    _write_json(
        out_dir / "generation_config.json",
        {"bos_token_id": tokens["bos_id"], "eos_token_id": tokens["eos_id"], "pad_token_id": tokens["pad_id"],
         "do_sample": False},
    )
    for name in TOKENIZER_FILES:
        shutil.copyfile(Path(tokenizer_dir) / name, out_dir / name)
    return kwargs, losses


def build_llama_model(
    out_dir: Path,
    *,
    tokenizer_dir: Path,
    num_layers: int,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_dim: int,
    seed: int,
    max_seq_len: int = MODEL_COMMON["max_seq_len"],
    rope_base: int = MODEL_COMMON["rope_base"],
    norm_eps: float = MODEL_COMMON["norm_eps"],
    init_std: float = 0.02,
    pretrain_steps: int = 0,
    pretrain_data: Optional[Path] = None,
) -> dict[str, Any]:
    """Build a Llama 3 architecture model with torchtune, initialise it from ``seed`` and save it in HF format.

    The folder gets ``model.safetensors`` (``convert_weights.tune_to_hf`` names), ``config.json``,
    ``generation_config.json`` and the tokenizer files, so ``FullModelHFCheckpointer(model_type="LLAMA3")``,
    transformers and lm-eval all load it.

    Args:
        out_dir (Path): destination folder (created).
        tokenizer_dir (Path): tokenizer folder from :func:`build_tokenizer` (sets ``vocab_size`` and token ids).
        num_layers (int): decoder layers.
        embed_dim (int): model width; ``embed_dim / num_heads`` must be even.
        num_heads (int): query heads.
        num_kv_heads (int): key / value heads; must divide ``num_heads``.
        intermediate_dim (int): SwiGLU hidden width.
        seed (int): initialisation seed.
        max_seq_len (int): RoPE cache length.
        rope_base (int): RoPE theta.
        norm_eps (float): RMSNorm epsilon.
        init_std (float): standard deviation of every weight matrix.
        pretrain_steps (int): next-token CE steps on ``pretrain_data`` before saving (0: save the random init).
        pretrain_data (Optional[Path]): alpaca JSON list; required when ``pretrain_steps > 0``.

    Returns:
        dict: keyword arguments for ``torchtune.models.llama3.llama3`` that rebuild this model.

    Raises:
        ValueError: for inconsistent sizes, a negative seed or step count, or a missing tokenizer / data file.
    """
    kwargs, _ = _build_model(
        out_dir, tokenizer_dir=tokenizer_dir, num_layers=num_layers, embed_dim=embed_dim, num_heads=num_heads,
        num_kv_heads=num_kv_heads, intermediate_dim=intermediate_dim, seed=seed, max_seq_len=max_seq_len,
        rope_base=rope_base, norm_eps=norm_eps, init_std=init_std, pretrain_steps=pretrain_steps,
        pretrain_data=pretrain_data,
    )
    return kwargs


def write_random_checkpoint(cfg_model: Any, out_dir: Path, *, dtype: torch.dtype, seed: int) -> None:
    """The model a config's ``model`` / ``teacher_model`` section builds, with random weights, as a Hugging Face
    folder (``model.safetensors`` and ``config.json``; a LoRA model's adapters left out, a tied output left tied).

    Real architectures on dummy weights: what a run's memory and speed depend on, without a download. Nothing is
    written when ``out_dir/config.json`` already exists. Weight matrices are N(0, 0.02), norms 1.
    """
    from safetensors.torch import save_file
    from torchtune import config, training
    from torchtune.models import convert_weights
    from torchtune.modules.peft import get_adapter_state_dict

    from torchtune_kd.core import models

    if (out_dir / "config.json").is_file():
        return
    cfg_plain, _ = models.model_config_without_flag(cfg_model)
    with training.set_default_dtype(dtype), torch.device("meta"):
        model = config.instantiate(cfg_plain)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            else:
                param.fill_(1.0)
    adapters = set(get_adapter_state_dict(model.state_dict(), device=None))
    state = {k: v for k, v in model.state_dict().items() if k not in adapters}
    sizes = preflight.builder_sizes(model)
    head_dim = sizes["embed_dim"] // sizes["num_heads"]
    hf_state = convert_weights.tune_to_hf(
        state, num_heads=sizes["num_heads"], num_kv_heads=sizes["num_kv_heads"], dim=sizes["embed_dim"], head_dim=head_dim
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf_state.items()}, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tied = "output.weight" not in state
    hf_config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": sizes["embed_dim"],
        "num_hidden_layers": sizes["num_layers"], "num_attention_heads": sizes["num_heads"],
        "num_key_value_heads": sizes["num_kv_heads"], "intermediate_size": sizes["intermediate_dim"],
        "vocab_size": sizes["vocab_size"], "head_dim": head_dim, "tie_word_embeddings": tied,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "torch_dtype": "bfloat16" if dtype == torch.bfloat16 else "float32",
    }
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))



# ------------------------------------------------------------------------------------------------------ build all
def build_all(
    out_dir: Path,
    *,
    teacher_pretrain_steps: int = 0,
    force: bool = False,
    folder: Optional[output_folder.OwnedFolder] = None,
    option: str = "out_dir",
) -> dict[str, Any]:
    """Build (or reuse) the tokenizer, teacher, student and data into ``out_dir`` and return the manifest.

    Idempotent: when ``out_dir`` holds a build of this function (its marker lists it) with the same build parameters
    and its files are present, it is reused and nothing is written. Otherwise ``out_dir`` is claimed through
    :mod:`torchtune_kd.output_folder` before anything is built (owner :data:`OWNER`; a folder holding anything else is
    refused), the entries of an earlier build there are removed and the manifest is written last, so an interrupted
    build never looks complete. A file of another name in the folder is never touched.

    Args:
        out_dir (Path): destination folder (created).
        teacher_pretrain_steps (int): CE steps pre-training the teacher on the training records (0: random teacher,
            fast, for tests; ~200 gives a demo teacher with real signal).
        force (bool): rebuild even when up to date.
        folder (Optional[OwnedFolder]): the caller's own claimed folder to build into (its path must be ``out_dir``):
            for a command that keeps the stand-ins beside its other outputs. The entries ``tokenizer``, ``data``,
            ``teacher``, ``student`` and ``manifest.json`` are claimed in it. Default: ``out_dir`` is claimed as a
            stand-ins folder.
        option (str): how the caller's user named ``out_dir`` (e.g. ``"--assets"``), quoted in a refusal.

    Returns:
        dict: the manifest (keys in the module docstring; paths are absolute ``str``).

    Raises:
        ValueError: if ``teacher_pretrain_steps`` is negative or not an int, or ``folder`` is another folder.
        output_folder.OutputFolderError: ``out_dir`` holds files this function did not write (or another command's
            outputs), or an entry it writes exists in ``folder`` and is not the caller's.
    """
    _check_int("teacher_pretrain_steps", teacher_pretrain_steps, 0)
    out_dir = Path(out_dir).resolve()
    if folder is not None and Path(folder.path).resolve() != out_dir:
        raise ValueError(f"folder={str(folder.path)!r} is not out_dir={str(out_dir)!r}: pass the folder claimed for out_dir")
    source_sha = hashlib.sha256(pydoc_text().encode("utf-8")).hexdigest()
    params = {
        "format_version": FORMAT_VERSION,
        "bpe_vocab_size": BPE_VOCAB_SIZE,
        "teacher_shape": TEACHER_SHAPE,
        "student_shape": STUDENT_SHAPE,
        "common": MODEL_COMMON,
        "seeds": SEEDS,
        "data_sizes": DATA_SIZES,
        "teacher_pretrain_steps": teacher_pretrain_steps,
        "source_text_sha256": source_sha,
    }
    manifest_path = out_dir / "manifest.json"
    # Only a build this module recorded in the folder's marker is reused: a manifest.json is never taken for one by
    # its name alone.
    ours = folder.owns("manifest.json") if folder is not None else output_folder.inspect(out_dir).owner == OWNER
    if not force and ours:
        try:
            previous = load_manifest(out_dir)
        except (OSError, ValueError):  # unreadable (e.g. a write cut short): rebuilt below
            previous = None
        # A moved or copied folder is rebuilt in place: its manifest's absolute paths point elsewhere.
        if (
            isinstance(previous, dict)
            and previous.get("params") == params
            and previous.get("root") == str(out_dir)
            and _files_present(previous)
        ):
            return previous
    # Claimed before anything is built: a folder holding a user's files is refused, not written into.
    if folder is None:
        folder = output_folder.claim_output_folder(out_dir, owner=OWNER, option=option)
    folder.claim(*_ENTRIES)
    for name in _ENTRIES:  # the manifest first: a half-removed build never looks complete
        folder.remove(name)

    tokens = build_tokenizer(out_dir / "tokenizer", BPE_VOCAB_SIZE)
    data = build_alpaca_data(out_dir / "data", tokenizer_dir=out_dir / "tokenizer", seed=SEEDS["data"], **DATA_SIZES)
    teacher_kwargs, losses = _build_model(
        out_dir / "teacher", tokenizer_dir=out_dir / "tokenizer", seed=SEEDS["teacher"], **TEACHER_SHAPE,
        **MODEL_COMMON, init_std=0.02, pretrain_steps=teacher_pretrain_steps, pretrain_data=Path(data["train"]),
    )
    student_kwargs, _ = _build_model(
        out_dir / "student", tokenizer_dir=out_dir / "tokenizer", seed=SEEDS["student"], **STUDENT_SHAPE,
        **MODEL_COMMON, init_std=0.02, pretrain_steps=0, pretrain_data=None,
    )
    counts = {key: len(json.loads(Path(data[key]).read_text(encoding="utf-8"))) for key in ("train", "eval")}
    heldout = Path(data["heldout_text"]).read_text(encoding="utf-8").strip()
    manifest = {
        "format_version": FORMAT_VERSION,
        "params": params,
        "root": str(out_dir),
        "tokenizer_dir": str(out_dir / "tokenizer"),
        "teacher_dir": str(out_dir / "teacher"),
        "student_dir": str(out_dir / "student"),
        "data": data,
        "num_train": counts["train"],
        "num_eval": counts["eval"],
        "num_heldout": len(heldout.split("\n\n")) if heldout else 0,
        "vocab_size": tokens["vocab_size"],
        "bpe_vocab_size": tokens["bpe_vocab_size"],
        "num_special_tokens": tokens["num_special_tokens"],
        "bos_id": tokens["bos_id"],
        "eos_id": tokens["eos_id"],
        "pad_id": tokens["pad_id"],
        "teacher_kwargs": teacher_kwargs,
        "student_kwargs": student_kwargs,
        "seeds": dict(SEEDS),
        "teacher_pretrain_steps": teacher_pretrain_steps,
        "teacher_pretrain_losses": losses,
        "teacher_pretrain_final_loss": losses[-1] if losses else None,
        "weights_sha256": {
            name: _sha256(out_dir / name / "model.safetensors") for name in ("teacher", "student")
        },
        "source_text_sha256": source_sha,
        "python_version": ".".join(map(str, sys.version_info[:3])),
    }
    _write_json(manifest_path, manifest)
    return manifest


def load_manifest(root: Path) -> Optional[dict[str, Any]]:
    """The manifest of an asset folder, or ``None`` when it has none (not built, or a build was interrupted).

    Args:
        root (Path): the folder given to :func:`build_all`.

    Returns:
        Optional[dict]: the manifest.
    """
    path = Path(root) / "manifest.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _files_present(manifest: dict[str, Any]) -> bool:
    folders = [Path(manifest[key]) for key in ("tokenizer_dir", "teacher_dir", "student_dir")]
    needed = [folders[0] / name for name in TOKENIZER_FILES]
    model_files = ("model.safetensors", "config.json", "generation_config.json", *TOKENIZER_FILES)
    needed += [folder / name for folder in folders[1:] for name in model_files]
    needed += [Path(path) for path in manifest["data"].values()]
    return all(path.is_file() for path in needed)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _write_json(path: Path, content: Any) -> None:
    # Fixed key order and formatting: assets must be byte-identical across builds.
    Path(path).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
