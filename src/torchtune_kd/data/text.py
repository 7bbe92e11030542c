"""Real English text for distillation and perplexity, without the Hugging Face hub.

Two sources (provenance and licences in ``data/README.md``):

- ``pydoc_data/topics.py``, shipped with every CPython: the prose of the Python reference manual (PSF License).
  Indented code, grammar rules and heading underlines are left out.
- The Lee corpus from gensim's test data (350 short ABC news stories from 2000-2001): ``lee_background.cor``
  (300 stories) and ``lee.cor`` (50 more), taken out of the gensim 4.4.0 wheel (LGPL-2.1), which is fetched with
  ``pip download --no-deps`` at run time. gensim is never installed or imported. Without network access (or with
  ``use_gensim=False``) the data comes from pydoc alone, and the manifest says so.

:func:`prepare_text_data` cuts every document into short passages at sentence ends, then splits *documents*
(not passages) into train / validation / held-out, so no story or manual section feeds both training and the
perplexity text. Everything is deterministic for a given seed and Python version (pydoc's text changes between
CPython releases).

Outputs, in ``<cache_dir>/text/``:

- ``train.json``, ``validation.json``: alpaca records (``instruction``, ``input``, ``output``): the passage's
  first sentence(s) as input, the rest as the output to learn; for
  ``torchtune.datasets.alpaca_dataset(source="json", data_files=..., split="train")``.
- ``heldout.txt`` (one passage per line) and ``heldout.jsonl`` (``{"text", "source"}`` per line): whole passages
  from held-out documents, for perplexity.
- ``manifest.json``: sources (with SHA-256), sizes, settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchtune_kd import output_folder

GENSIM_VERSION = "4.4.0"
# One fixed wheel, whatever machine runs this, so the corpus files are always the same bytes (checked below).
_GENSIM_PIP_ARGS = [
    "--no-deps",
    "--only-binary=:all:",
    "--platform",
    "manylinux_2_28_x86_64",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--abi",
    "cp311",
]
GENSIM_CORPORA: dict[str, str] = {
    # member of the wheel -> SHA-256 of its bytes
    "gensim/test/test_data/lee_background.cor": "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
    "gensim/test/test_data/lee.cor": "a878f9a58f6743c32985c56c2f2f75988386216b38a4023a01fd3bcf7884d93e",
}

INSTRUCTIONS = {
    "pydoc": "Continue this passage from the Python documentation.",
    "lee": "Continue this news report.",
}

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_HEADING_RULE = re.compile(r"^\s*([*=\-~^\"#+])\1{2,}\s*$")


@dataclass(frozen=True)
class Document:
    """One source document: a pydoc topic or a news story."""

    source: str  # "pydoc" or "lee"
    doc_id: str
    paragraphs: tuple[str, ...]


# --------------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------------


def pydoc_documents() -> list[Document]:
    """The prose paragraphs of every topic in this Python's ``pydoc_data.topics`` (code and headings dropped)."""
    from pydoc_data.topics import topics

    documents = []
    for name in sorted(topics):
        paragraphs = []
        for block in topics[name].split("\n\n"):
            lines = [line for line in block.split("\n") if line.strip() and not _HEADING_RULE.match(line)]
            # Indented lines are code, grammar or tables; a paragraph with any is not prose we want.
            if not lines or any(line.startswith((" ", "\t")) for line in lines):
                continue
            text = " ".join(line.strip() for line in lines)
            if text.endswith(":"):
                # "... as follows:" introduces the code we dropped; the sentence means nothing without it.
                text = " ".join(split_sentences(text)[:-1])
            # A one-line title ("The "if" statement") has no sentence end; real prose does.
            if text.endswith((".", "!", "?", ":")) and len(text.split()) >= 8:
                paragraphs.append(text)
        if paragraphs:
            documents.append(Document("pydoc", name, tuple(paragraphs)))
    return documents


def _sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _decode_corpus(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # lee.cor has a stray Latin-1 pound sign (0xA3).
        return raw.decode("latin-1")


def fetch_gensim_corpora(
    cache_dir: str | Path, wheel: str | Path | None = None, timeout_s: float = 300.0
) -> dict[str, Path]:
    """Extract the Lee corpus files from the gensim wheel into ``<cache_dir>/sources/`` (reused if present).

    Args:
        cache_dir: Cache root.
        wheel: A gensim wheel already on disk; default: ``pip download`` gensim 4.4.0 into
            ``<cache_dir>/downloads/`` (about 28 MB, once).
        timeout_s: Limit for the download.

    Returns:
        ``{"lee_background.cor": path, "lee.cor": path}``.

    Raises:
        RuntimeError: if the download fails.
        ValueError: if the wheel lacks a corpus file or a file's SHA-256 differs from the pinned one.
    """
    sources = Path(cache_dir) / "sources"
    wanted = {member.rsplit("/", 1)[1]: member for member in GENSIM_CORPORA}
    out = {name: sources / name for name in wanted}
    if all(p.is_file() and _sha256(p.read_bytes()) == GENSIM_CORPORA[wanted[n]] for n, p in out.items()):
        return out
    if wheel is None:
        downloads = Path(cache_dir) / "downloads"
        found = sorted(downloads.glob(f"gensim-{GENSIM_VERSION}-*.whl"))
        if not found:
            downloads.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "pip", "download", *_GENSIM_PIP_ARGS, f"gensim=={GENSIM_VERSION}"]
            cmd += ["-d", str(downloads)]
            try:
                result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired as err:
                raise RuntimeError(f"`{' '.join(cmd)}` took over {timeout_s:.0f} s") from err
            found = sorted(downloads.glob(f"gensim-{GENSIM_VERSION}-*.whl"))
            if result.returncode != 0 or not found:
                raise RuntimeError(f"`{' '.join(cmd)}` failed: {result.stderr.strip()[-500:]}")
        wheel = found[0]
    sources.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        members = set(archive.namelist())
        for name, member in wanted.items():
            if member not in members:
                raise ValueError(f"wheel={str(wheel)!r} has no {member}; give a gensim {GENSIM_VERSION} wheel.")
            raw = archive.read(member)
            digest = _sha256(raw)
            if digest != GENSIM_CORPORA[member]:
                raise ValueError(
                    f"{member} in {wheel} has SHA-256 {digest}, expected {GENSIM_CORPORA[member]}; give the "
                    f"gensim {GENSIM_VERSION} wheel."
                )
            out[name].write_bytes(raw)
    return out


def lee_documents(corpus_files: dict[str, Path]) -> list[Document]:
    """One document per line (story) of the Lee corpus files, exact duplicates dropped."""
    documents, seen = [], set()
    for name in sorted(corpus_files):
        for line_no, line in enumerate(_decode_corpus(corpus_files[name].read_bytes()).splitlines()):
            text = " ".join(line.split())
            if text and text not in seen:
                seen.add(text)
                documents.append(Document("lee", f"{name}:{line_no}", (text,)))
    return documents


# --------------------------------------------------------------------------------------------------------------
# Passages and splits
# --------------------------------------------------------------------------------------------------------------


def _words_estimate(text: str) -> int:
    # ~1.4 SmolLM2 tokens per English word in these sources; only used when no token counter is given.
    return math.ceil(1.4 * len(text.split()))


def split_sentences(text: str) -> list[str]:
    """Sentences of a paragraph: a cut after ``.``, ``!`` or ``?`` (and closing quotes) before a capital/digit."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def make_passages(
    paragraph: str, max_tokens: int, min_tokens: int, count_tokens: Callable[[str], int]
) -> list[str]:
    """Greedily pack whole sentences into passages of at most ``max_tokens`` tokens.

    A sentence longer than ``max_tokens`` is dropped (cutting it mid-sentence would teach truncated text).
    Passages shorter than ``min_tokens`` are dropped too.
    """
    passages, current = [], ""
    for sentence in split_sentences(paragraph):
        candidate = f"{current} {sentence}" if current else sentence
        if count_tokens(candidate) <= max_tokens:
            current = candidate
            continue
        if current:
            passages.append(current)
        current = sentence if count_tokens(sentence) <= max_tokens else ""
    if current:
        passages.append(current)
    return [p for p in passages if count_tokens(p) >= min_tokens]


def to_alpaca(passage: str, source: str) -> dict[str, str] | None:
    """An alpaca record: the passage's opening as ``input``, the rest as ``output`` (None if it cannot split).

    The cut is the sentence end nearest to a third of the words; a one-sentence passage is cut at a third of
    its words.
    """
    sentences = split_sentences(passage)
    words = passage.split()
    if len(words) < 6:
        return None
    if len(sentences) >= 2:
        ends = [sum(len(s.split()) for s in sentences[: i + 1]) for i in range(len(sentences) - 1)]
        cut = min(range(len(ends)), key=lambda i: abs(ends[i] - len(words) / 3))
        prompt, rest = " ".join(sentences[: cut + 1]), " ".join(sentences[cut + 1 :])
    else:
        k = max(1, len(words) // 3)
        prompt, rest = " ".join(words[:k]), " ".join(words[k:])
    return {"instruction": INSTRUCTIONS[source], "input": prompt, "output": rest}


def _sentence_keys(passage: str) -> set[str]:
    """Sentences long enough that sharing one means sharing text, not a stock phrase like "See also."."""
    return {" ".join(s.split()) for s in split_sentences(passage) if len(s.split()) >= 6}


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 0.5:
        raise ValueError(f"{name}={value!r} is invalid: give a fraction of the documents in (0, 0.5), e.g. 0.1.")


def _check_count(name: str, value: int | None, minimum: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ValueError(f"{name}={value!r} is invalid: give an integer >= {minimum}, or None for no limit.")


def split_documents(
    documents: Sequence[Document], heldout_fraction: float, validation_fraction: float, seed: int
) -> dict[str, list[Document]]:
    """Shuffle each source's documents with ``seed`` and cut them into train / validation / heldout.

    Every source gives at least one document to each of validation and heldout when it has three or more.
    """
    by_source: dict[str, list[Document]] = {}
    for doc in documents:
        by_source.setdefault(doc.source, []).append(doc)
    splits: dict[str, list[Document]] = {"train": [], "validation": [], "heldout": []}
    for source in sorted(by_source):
        docs = sorted(by_source[source], key=lambda d: d.doc_id)
        random.Random(f"{seed}:{source}").shuffle(docs)
        n = len(docs)
        n_held = max(1, round(n * heldout_fraction)) if n >= 3 else 0
        n_val = max(1, round(n * validation_fraction)) if n >= 3 else 0
        splits["heldout"] += docs[:n_held]
        splits["validation"] += docs[n_held : n_held + n_val]
        splits["train"] += docs[n_held + n_val :]
    return splits


def prepare_text_data(
    cache_dir: str | Path | output_folder.OwnedFolder,
    *,
    max_tokens: int = 96,
    min_tokens: int = 24,
    count_tokens: Callable[[str], int] | None = None,
    heldout_fraction: float = 0.1,
    validation_fraction: float = 0.05,
    max_train: int | None = 2000,
    max_validation: int | None = 64,
    max_heldout: int | None = 64,
    seed: int = 0,
    use_gensim: bool = True,
    gensim_wheel: str | Path | None = None,
    force: bool = False,
) -> dict[str, Path]:
    """Write deterministic alpaca train/validation splits and a disjoint held-out text into ``<cache_dir>/text/``.

    Output folder (:mod:`torchtune_kd.output_folder`): given the cache as an ``OwnedFolder`` (the command claimed
    it), ``text`` (and with ``use_gensim`` ``sources`` and ``downloads``) are claimed there before anything is
    written, and refused if the folder holds them without its owner having written them. Given a plain path, a file
    already there is never overwritten: an identical earlier preparation is reused, anything else is refused.

    Args:
        cache_dir: Cache root, or the cache claimed by the calling command.
        max_tokens: Longest passage, in tokens of ``count_tokens``.
        min_tokens: Shortest passage kept.
        count_tokens: Token counter, e.g. ``lambda s: len(tok.encode(s, add_bos=False, add_eos=False))`` with
            a :class:`smollm2.SmolLM2Tokenizer`; default: an estimate of 1.4 tokens per word (so the limits
            are approximate).
        heldout_fraction: Share of each source's documents kept for perplexity only.
        validation_fraction: Share of each source's documents for the validation split.
        max_train: Cap on training records (after a seeded shuffle), None for all.
        max_validation: Cap on validation records.
        max_heldout: Cap on held-out passages.
        seed: Seed of every shuffle.
        use_gensim: Add the Lee news corpus (downloads the gensim wheel once); if that fails, the data comes from
            pydoc alone and ``manifest.json`` records why.
        gensim_wheel: A gensim 4.4.0 wheel already on disk (no download).
        force: Rebuild even if the same settings were prepared before.

    Returns:
        Paths: ``train``, ``validation`` (alpaca JSON lists), ``heldout_txt``, ``heldout_jsonl``, ``manifest``,
        ``dir``.

    Raises:
        ValueError: for out-of-range settings; ``output_folder.OutputFolderError`` (a ``ValueError``) for outputs
            that are not the caller's to write.
    """
    _check_count("max_tokens", max_tokens, 8)
    _check_count("min_tokens", min_tokens, 1)
    if min_tokens > max_tokens:
        raise ValueError(f"min_tokens={min_tokens} exceeds max_tokens={max_tokens}: lower min_tokens.")
    _check_fraction("heldout_fraction", heldout_fraction)
    _check_fraction("validation_fraction", validation_fraction)
    for name, value in (("max_train", max_train), ("max_validation", max_validation), ("max_heldout", max_heldout)):
        _check_count(name, value, 1)

    folder = cache_dir if isinstance(cache_dir, output_folder.OwnedFolder) else None
    cache = folder.path if folder is not None else Path(cache_dir)
    if folder is not None:
        # fetch_gensim_corpora writes sources/ (and downloads/ when it fetches the wheel).
        folder.claim("text", *(("sources", "downloads") if use_gensim else ()))
    out_dir = cache / "text"
    paths = {
        "train": out_dir / "train.json",
        "validation": out_dir / "validation.json",
        "heldout_txt": out_dir / "heldout.txt",
        "heldout_jsonl": out_dir / "heldout.jsonl",
        "manifest": out_dir / "manifest.json",
        "dir": out_dir,
    }
    settings: dict[str, Any] = {
        "max_tokens": max_tokens,
        "min_tokens": min_tokens,
        "token_counter": "given" if count_tokens is not None else "1.4 x words",
        "heldout_fraction": heldout_fraction,
        "validation_fraction": validation_fraction,
        "max_train": max_train,
        "max_validation": max_validation,
        "max_heldout": max_heldout,
        "seed": seed,
        "use_gensim": use_gensim,
        "python": sys.version.split()[0],
    }
    if paths["manifest"].is_file() and not force:
        try:
            previous = json.loads(paths["manifest"].read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            previous = {}  # an unreadable manifest: never a reason to reuse
        complete = all(p.is_file() for p in paths.values() if p != out_dir)
        if isinstance(previous, dict) and previous.get("settings") == settings and complete:
            return paths
    existing = [p.name for key, p in paths.items() if key != "dir" and os.path.lexists(p)]
    if folder is None and existing:
        raise output_folder.OutputFolderError(
            f"{str(out_dir)!r} holds {', '.join(existing)}, not a preparation with these settings"
            f"{' (force=True)' if force else ''}: prepare_text_data never overwrites a file it was not given to own; "
            "use another cache folder, move them, or pass the cache claimed with "
            "torchtune_kd.output_folder.claim_output_folder"
        )
    counter = count_tokens if count_tokens is not None else _words_estimate

    documents = pydoc_documents()
    import pydoc_data.topics

    sources: dict[str, Any] = {
        "pydoc": {
            "file": "pydoc_data/topics.py",
            "sha256": _sha256(Path(pydoc_data.topics.__file__).read_bytes()),
            "licence": "PSF-2.0",
        }
    }
    if use_gensim:
        try:
            corpus_files = fetch_gensim_corpora(cache, wheel=gensim_wheel)
        except (RuntimeError, ValueError, OSError, zipfile.BadZipFile) as err:
            sources["lee"] = {"skipped": f"{type(err).__name__}: {err}"}
        else:
            documents += lee_documents(corpus_files)
            sources["lee"] = {
                "files": {m: h for m, h in GENSIM_CORPORA.items()},
                "package": f"gensim=={GENSIM_VERSION} wheel (LGPL-2.1), not installed",
            }

    splits = split_documents(documents, heldout_fraction, validation_fraction, seed)
    passages: dict[str, list[tuple[str, str]]] = {}
    # pydoc repeats whole paragraphs across topics (and news stories quote each other), so splitting documents
    # is not enough: a passage is dropped when it shares a sentence with a split of higher priority.
    claimed: set[str] = set()
    dropped = 0
    for split in ("heldout", "validation", "train"):
        candidates = [
            (doc.source, passage)
            for doc in splits[split]
            for paragraph in doc.paragraphs
            for passage in make_passages(paragraph, max_tokens, min_tokens, counter)
        ]
        keys = [_sentence_keys(p) for _, p in candidates]
        passages[split] = [c for c, k in zip(candidates, keys) if not k & claimed]
        dropped += len(candidates) - len(passages[split])
        claimed.update(*keys)
        random.Random(f"{seed}:{split}").shuffle(passages[split])

    records = {}
    for split, cap in (("train", max_train), ("validation", max_validation)):
        rows = [r for r in (to_alpaca(p, s) for s, p in passages[split]) if r is not None]
        records[split] = rows[:cap] if cap is not None else rows
    heldout = passages["heldout"][:max_heldout] if max_heldout is not None else passages["heldout"]

    out_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        paths[split].write_text(json.dumps(records[split], ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    paths["heldout_txt"].write_text("".join(f"{p}\n" for _, p in heldout), encoding="utf-8")
    paths["heldout_jsonl"].write_text(
        "".join(json.dumps({"text": p, "source": s}, ensure_ascii=False) + "\n" for s, p in heldout), encoding="utf-8"
    )
    token_counts = [counter(p) for _, p in heldout]
    manifest = {
        "settings": settings,
        "sources": sources,
        "documents": {split: len(docs) for split, docs in splits.items()},
        "heldout_documents": sorted(f"{d.source}:{d.doc_id}" for d in splits["heldout"]),
        "records": {"train": len(records["train"]), "validation": len(records["validation"]), "heldout": len(heldout)},
        "records_by_source": {
            split: {src: sum(r["instruction"] == text for r in records[split]) for src, text in INSTRUCTIONS.items()}
            for split in ("train", "validation")
        },
        "heldout_tokens": sum(token_counts),
        "passages_dropped_as_shared_with_another_split": dropped,
    }
    paths["manifest"].write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return paths
