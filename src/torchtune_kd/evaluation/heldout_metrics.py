"""Held-out language-model metrics for Hugging Face model folders: perplexity and bits per byte (comparable across
tokenizers), and top-1 agreement and forward KL
against a teacher; and on the student's own samples from held-out prompts, its per-token KL to the teacher and the
teacher's NLL of them (:func:`evaluate_on_policy`).

Used by the demo and the experiment to compare teacher, undistilled student, CE-only student and distilled
students on text none of them trained on. Every model is loaded the same way (transformers, fp32), from the folder
lm-eval would load, so the numbers describe exactly the exported checkpoints.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

PathLike = Union[str, Path]


def heldout_windows(tokenizer_dir: PathLike, text: str, seq_len: int, max_windows: int) -> torch.Tensor:
    """Tokenise ``text`` with the folder's tokenizer into non-overlapping windows ``(num_windows, seq_len)``.

    Each window starts with the tokenizer's bos token (as in training), followed by ``seq_len - 1`` text tokens.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    body = seq_len - 1 if tokenizer.bos_token_id is not None else seq_len
    windows = []
    for start in range(0, len(ids) - body + 1, body):
        window = ids[start : start + body]
        if tokenizer.bos_token_id is not None:
            window = [tokenizer.bos_token_id] + window
        windows.append(window)
        if len(windows) == max_windows:
            break
    if not windows:
        raise ValueError(f"held-out text has only {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(windows)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (printable stand-ins for the 256 bytes) back to the bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


def token_byte_lengths(tokenizer_dir: PathLike) -> list[int]:
    """The UTF-8 bytes of text each id of the folder's tokenizer stands for (0 for special tokens).

    A byte-level BPE token (GPT-2, Llama 3, SmolLM2, Qwen) is read through the byte alphabet, so a token holding half
    of a multi-byte character counts its own bytes; any other token counts the bytes of its decoded text.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    alphabet = _byte_decoder()
    special = set(tokenizer.all_special_ids) | {int(i) for i in tokenizer.added_tokens_decoder}
    lengths = []
    for token_id in range(len(tokenizer)):
        if token_id in special:
            lengths.append(0)
            continue
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if piece is not None and all(ch in alphabet for ch in piece):
            lengths.append(len(piece))
        else:
            lengths.append(len(tokenizer.decode([token_id]).encode("utf-8")))
    return lengths


def _load(folder: PathLike) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def kl_sum(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
    """Σ over tokens of KL(p_teacher ‖ p_student) (nats) from ``(..., vocab)`` logits; 0·log 0 = 0."""
    t_logp = torch.log_softmax(teacher_logits.float(), dim=-1)
    s_logp = torch.log_softmax(student_logits.float(), dim=-1)
    p_t = t_logp.exp()
    terms = torch.where(p_t > 0, p_t * (t_logp - s_logp), torch.zeros_like(p_t))
    return float(terms.sum(-1).double().sum())


@torch.no_grad()
def evaluate_heldout(
    model_dirs: Mapping[str, PathLike],
    text_path: PathLike,
    *,
    teacher: Optional[str] = None,
    seq_len: int = 128,
    max_windows: int = 32,
    batch_size: int = 4,
    keep_teacher_logits_bytes: int = 2**30,
) -> dict[str, dict[str, float]]:
    """Perplexity of every model on held-out text and, against ``teacher``, top-1 agreement and forward KL.

    Args:
        model_dirs (Mapping[str, PathLike]): name -> Hugging Face model folder, each with its tokenizer's files.
        text_path (PathLike): held-out plain text.
        teacher (Optional[str]): name of the teacher in ``model_dirs`` (agreement and KL are then reported).
        seq_len (int): tokens per window (including bos).
        max_windows (int): number of windows evaluated.
        batch_size (int): windows per forward pass.
        keep_teacher_logits_bytes (int): keep the teacher's logits for the whole text in memory (so the teacher runs
            once) when they take at most this many bytes; above it they are recomputed for every model. The results
            are the same either way.

    Returns:
        dict: ``{name: {"nll": mean next-token NLL (nats), "perplexity": exp(nll), "tokens": count, "bytes": the
        UTF-8 bytes those tokens stand for, "bits_per_byte": the summed NLL in bits over those bytes (independent of
        the tokenizer: models with different tokenizers compare on it), and, with a teacher and for the models that
        tokenise the text as the teacher does, "top1_agreement" (share of tokens whose argmax matches the teacher's)
        and "kl_to_teacher" (mean KL(p_teacher ‖ p_model) per token, nats: what forward-KL distillation
        minimises)}}``. Models with another tokenizer read the text in their own windows; give ``max_windows``
        enough to cover all of it when comparing their bits per byte (otherwise each covers its own prefix).
    """
    text = Path(text_path).read_text()
    # Each model reads the text through its own tokenizer; agreement and KL need the teacher's token positions, so
    # they are reported for the models whose windows are the teacher's (the same tokenization of this text).
    windows_of = {name: heldout_windows(folder, text, seq_len, max_windows) for name, folder in model_dirs.items()}
    windows = windows_of[teacher] if teacher is not None else next(iter(windows_of.values()))
    teacher_model = _load(model_dirs[teacher]) if teacher is not None else None
    # The teacher's logits for the whole text are kept when they fit `keep_teacher_logits_bytes` (then the teacher
    # runs once, not once per model); otherwise it stays loaded and recomputes them batch by batch (the whole text
    # takes windows × seq_len × vocab floats: 0.9 GB for SmolLM2's 49,152 tokens and 48 windows).
    kept: Optional[dict[int, torch.Tensor]] = None
    if teacher_model is not None:
        vocab = int(teacher_model.get_output_embeddings().weight.shape[0])
        kept = {} if windows.shape[0] * (windows.shape[1] - 1) * vocab * 4 <= keep_teacher_logits_bytes else None

    def teacher_logits(start: int, batch: torch.Tensor) -> torch.Tensor:
        if kept is not None and start in kept:
            return kept[start]
        logits = teacher_model(batch).logits.float()[:, :-1]
        if kept is not None:
            kept[start] = logits
        return logits

    results: dict[str, dict[str, float]] = {}
    byte_lengths: dict[str, torch.Tensor] = {}
    for name, folder in model_dirs.items():
        model = teacher_model if name == teacher else _load(folder)
        own = windows_of[name]
        same_tokens = teacher_model is not None and own.shape == windows.shape and torch.equal(own, windows)
        nll = agree = kl = 0.0
        count = 0
        for start in range(0, len(own), batch_size):
            batch = own[start: start + batch_size]
            logits = teacher_logits(start, batch) if model is teacher_model else model(batch).logits.float()[:, :-1]
            targets = batch[:, 1:]
            nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
            ).item()
            count += targets.numel()
            if same_tokens:
                t_logits = logits if model is teacher_model else teacher_logits(start, batch)
                agree += (logits.argmax(-1) == t_logits.argmax(-1)).sum().item()
                kl += kl_sum(t_logits, logits)
        key = str(Path(folder).resolve())
        if key not in byte_lengths:
            byte_lengths[key] = torch.tensor(token_byte_lengths(folder))
        text_bytes = int(byte_lengths[key][own[:, 1:]].sum())
        entry = {"nll": nll / count, "perplexity": math.exp(nll / count), "tokens": float(count),
                 "bytes": float(text_bytes), "bits_per_byte": nll / (math.log(2) * max(text_bytes, 1))}
        if same_tokens:
            entry["top1_agreement"] = agree / count
            entry["kl_to_teacher"] = kl / count
        results[name] = entry
        if model is not teacher_model:
            del model
    return results


def dataset_prompts(cfg: Any, data_file: PathLike, count: int, ignore_index: int = -100) -> list[list[int]]:
    """The prompt parts (tokens before the first counted label) of the first ``count`` samples of ``data_file``,
    built with the config's own tokenizer and dataset builder (``train_on_input`` off), as the recipe's on-policy
    steps take them.

    Args:
        cfg (Any): a recipe config (its ``tokenizer`` and a single ``dataset`` section).
        data_file (PathLike): a data file of the dataset's format (e.g. the demo's ``text/validation.json``).
        count (int): how many prompts.
        ignore_index (int): label value of the prompt tokens.
    """
    from omegaconf import OmegaConf

    from torchtune_kd.core import data

    section = OmegaConf.merge(cfg.dataset, {"data_files": str(data_file), "split": "train", "train_on_input": False})
    section.pop("packed", None)
    tokenizer = data.build_tokenizer(cfg.tokenizer)
    dataset = data.build_dataset(section, tokenizer)
    prompts = []
    for index in range(min(count, len(dataset))):
        sample = dataset[index]
        labels = [int(x) for x in sample["labels"]]
        end = next((i for i, label in enumerate(labels) if label != ignore_index), len(labels))
        prompts.append([int(x) for x in sample["tokens"][: max(end, 1)]])
    if not prompts:
        raise ValueError(f"{data_file} has no sample to take a prompt from")
    return prompts


@torch.no_grad()
def evaluate_on_policy(
    student_dir: PathLike,
    teacher_dir: PathLike,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 48,
    seed: int = 0,
    batch_size: int = 8,
) -> dict[str, float]:
    """The on-policy held-out metrics: the student samples a continuation of each prompt (temperature 1, no top-k or
    top-p, a fixed seed per batch), and on its sampled tokens (up to and including the first end-of-sequence token)
    the mean per-token KL(p_student ‖ p_teacher) and the teacher's mean per-token NLL are reported.

    Args:
        student_dir (PathLike): the student's Hugging Face folder.
        teacher_dir (PathLike): the teacher's (same tokenizer).
        prompts (Sequence[Sequence[int]]): prompt token ids (:func:`dataset_prompts`).
        max_new_tokens (int): the longest continuation.
        seed (int): the sampling seed (the same samples for the same student).
        batch_size (int): prompts per batch.

    Returns:
        dict[str, float]: ``onpolicy_kl``, ``onpolicy_teacher_nll``, ``onpolicy_tokens`` (sampled tokens scored),
        ``onpolicy_mean_length`` and ``onpolicy_eos_fraction``.
    """
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    student, teacher = _load(student_dir), _load(teacher_dir)
    # Explicit settings: the folder's generation_config.json (SmolLM2's has temperature 0.2, top_p 0.9) is not used.
    sampling = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                                eos_token_id=eos, pad_token_id=pad)
    kl = nll = 0.0
    tokens = stopped = sequences = 0
    for start in range(0, len(prompts), batch_size):
        rows = prompts[start: start + batch_size]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left-padded
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        torch.manual_seed(seed * 1_000_003 + start)
        out = student.generate(input_ids=ids, attention_mask=mask, generation_config=sampling)
        generated = out[:, width:]
        counted = torch.ones_like(generated, dtype=torch.bool)
        for i in range(len(rows)):
            ends = (generated[i] == eos).nonzero()
            if len(ends):
                counted[i, int(ends[0]) + 1:] = False
                stopped += 1
        full_mask = torch.cat((mask, counted.long()), dim=1)
        s_logp = torch.log_softmax(student(out, attention_mask=full_mask).logits.float(), -1)[:, width - 1: -1]
        t_logp = torch.log_softmax(teacher(out, attention_mask=full_mask).logits.float(), -1)[:, width - 1: -1]
        per_token_kl = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
        teacher_nll = -t_logp.gather(-1, generated.unsqueeze(-1)).squeeze(-1)
        kl += float(per_token_kl[counted].double().sum())
        nll += float(teacher_nll[counted].double().sum())
        tokens += int(counted.sum())
        sequences += len(rows)
    return {"onpolicy_kl": kl / max(tokens, 1), "onpolicy_teacher_nll": nll / max(tokens, 1),
            "onpolicy_tokens": float(tokens), "onpolicy_mean_length": tokens / max(sequences, 1),
            "onpolicy_eos_fraction": stopped / max(sequences, 1)}
