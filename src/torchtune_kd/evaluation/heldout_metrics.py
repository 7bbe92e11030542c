"""Held-out language-model metrics for Hugging Face model folders: perplexity and top-1 agreement with a teacher.

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


@torch.no_grad()
def _logits(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [model(windows[i : i + batch_size]).logits.float() for i in range(0, len(windows), batch_size)]


def evaluate_heldout(
    model_dirs: Mapping[str, PathLike],
    text_path: PathLike,
    *,
    teacher: Optional[str] = None,
    seq_len: int = 128,
    max_windows: int = 32,
    batch_size: int = 4,
) -> dict[str, dict[str, float]]:
    """Perplexity of every model on held-out text, and its top-1 agreement with ``teacher``.

    Args:
        model_dirs (Mapping[str, PathLike]): name -> Hugging Face model folder (all with the same tokenizer).
        text_path (PathLike): held-out plain text.
        teacher (Optional[str]): name of the teacher in ``model_dirs`` (agreement is then reported).
        seq_len (int): tokens per window (including bos).
        max_windows (int): number of windows evaluated.
        batch_size (int): windows per forward pass.

    Returns:
        dict: ``{name: {"nll": mean next-token NLL (nats), "perplexity": exp(nll), "top1_agreement": ...,
        "tokens": count}}``.
    """
    from transformers import AutoModelForCausalLM

    first = next(iter(model_dirs.values()))
    windows = heldout_windows(first, Path(text_path).read_text(), seq_len, max_windows)
    targets = windows[:, 1:]
    teacher_argmax = None
    if teacher is not None:
        model = AutoModelForCausalLM.from_pretrained(str(model_dirs[teacher]), dtype=torch.float32).eval()
        teacher_argmax = torch.cat([lg[:, :-1].argmax(-1) for lg in _logits(model, windows, batch_size)])
        del model
    results: dict[str, dict[str, float]] = {}
    for name, folder in model_dirs.items():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        logits = torch.cat([lg[:, :-1] for lg in _logits(model, windows, batch_size)])
        del model
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1)).item()
        entry = {"nll": nll, "perplexity": math.exp(nll), "tokens": float(targets.numel())}
        if teacher_argmax is not None:
            entry["top1_agreement"] = (logits.argmax(-1) == teacher_argmax).float().mean().item()
        results[name] = entry
    return results
