"""The stand-ins' text side: English prose from CPython's pydoc topics, a Llama 3 style BPE tokenizer trained on
it, and alpaca records with disjoint train / eval / held-out text.

Tokenizer notes. The BPE is trained with the ``tokenizers`` library and pre-tokenised with Llama 3's (cl100k)
regex, so torchtune's tiktoken-based ``Llama3Tokenizer`` and transformers produce the same ids for ordinary text.
Strings spelling a special token (``"<|eot_id|>"``) differ by design: transformers maps them to the special id,
torchtune's ``encode`` treats them as plain text.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Optional

import torch

from torchtune_kd.testing.standin_spec import (
    BOS_TOKEN,
    BPE_VOCAB_SIZE,
    EOS_TOKEN,
    MODEL_COMMON,
    PAD_TOKEN,
    SEEDS,
    TOKENIZER_FILES,
    check_int,
    write_json,
)

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
    check_int("bpe_vocab_size", bpe_vocab_size, _MIN_BPE_VOCAB, _MAX_BPE_VOCAB, "the default 1024 is a good size")
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
    write_json(out_dir / "tokenizer_config.json", config)
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


def standin_tokenizer(tokenizer_dir: Path, max_seq_len: Optional[int] = None) -> Any:
    """torchtune's ``Llama3Tokenizer`` over a folder written by :func:`build_tokenizer` (what the recipes build).

    Args:
        tokenizer_dir (Path): the tokenizer folder.
        max_seq_len (Optional[int]): truncation length of ``tokenize_messages``; None keeps everything.
    """
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
    check_int("num_train", num_train, 1)
    check_int("num_eval", num_eval, 1)
    check_int("num_heldout", num_heldout, 0)
    check_int("max_tokens", max_tokens, 128, None, "the alpaca template alone takes about 100 tokens")
    check_int("seed", seed, 0)
    from torchtune.data import AlpacaToMessages

    tokenizer = standin_tokenizer(tokenizer_dir)
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
    write_json(paths["train"], train_records)
    write_json(paths["eval"], eval_records)
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
