"""Held-out language-model metrics for Hugging Face model folders: perplexity, and top-1 agreement and forward KL
against a teacher.

Used by the demo and the experiment to compare teacher, undistilled student, CE-only student and distilled
students on text none of them trained on. Every model is loaded the same way (transformers, fp32), from the folder
lm-eval would load, so the numbers describe exactly the exported checkpoints.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional, Union

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
        model_dirs (Mapping[str, PathLike]): name -> Hugging Face model folder (all with the same tokenizer).
        text_path (PathLike): held-out plain text.
        teacher (Optional[str]): name of the teacher in ``model_dirs`` (agreement and KL are then reported).
        seq_len (int): tokens per window (including bos).
        max_windows (int): number of windows evaluated.
        batch_size (int): windows per forward pass.
        keep_teacher_logits_bytes (int): keep the teacher's logits for the whole text in memory (so the teacher runs
            once) when they take at most this many bytes; above it they are recomputed for every model. The results
            are the same either way.

    Returns:
        dict: ``{name: {"nll": mean next-token NLL (nats), "perplexity": exp(nll), "tokens": count, and with a
        teacher "top1_agreement" (share of tokens whose argmax matches the teacher's) and "kl_to_teacher" (mean
        KL(p_teacher ‖ p_model) per token, nats: what forward-KL distillation minimises)}}``.
    """
    first = next(iter(model_dirs.values()))
    windows = heldout_windows(first, Path(text_path).read_text(), seq_len, max_windows)
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
    for name, folder in model_dirs.items():
        model = teacher_model if name == teacher else _load(folder)
        nll = agree = kl = 0.0
        count = 0
        for start in range(0, len(windows), batch_size):
            batch = windows[start: start + batch_size]
            logits = teacher_logits(start, batch) if model is teacher_model else model(batch).logits.float()[:, :-1]
            targets = batch[:, 1:]
            nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
            ).item()
            count += targets.numel()
            if teacher_model is not None:
                t_logits = logits if model is teacher_model else teacher_logits(start, batch)
                agree += (logits.argmax(-1) == t_logits.argmax(-1)).sum().item()
                kl += kl_sum(t_logits, logits)
        entry = {"nll": nll / count, "perplexity": math.exp(nll / count), "tokens": float(count)}
        if teacher_model is not None:
            entry["top1_agreement"] = agree / count
            entry["kl_to_teacher"] = kl / count
        results[name] = entry
        if model is not teacher_model:
            del model
    return results
