"""Depth pruning: a student made of a subset of the teacher's layers, chosen by measured importance or evenly.

Block influence (ShortGPT, Men et al. 2024; the depth-pruning score of NVIDIA's Minitron): for decoder layer ``i``
with input hidden states ``x_i`` and output ``x_{i+1}``,

    BI_i = 1 − E_tokens[ cos(x_i, x_{i+1}) ]

averaged over the real tokens of calibration text. A layer whose output points where its input already did changes
the residual stream little and is the first candidate to drop; :func:`most_influential` keeps the ``n`` layers with
the highest scores, in their original order. :func:`evenly_spaced` is the score-free choice (DistilBERT style).

:func:`write_pruned_student` writes the kept layers, renumbered ``0 .. n-1``, with the teacher's embeddings, final
norm and output, as a Hugging Face folder loadable by torchtune's ``FullModelHFCheckpointer`` and by transformers;
student layer ``i`` is teacher layer ``kept[i]``, so the matching ``layer_mapping`` is ``[[i, kept[i]], ...]``.
:func:`calibration_text` and :func:`calibration_windows` turn a calibration file into the scored windows.
``scripts/prune.py`` (:mod:`torchtune_kd.cli.prune`) is the command (scores printed, folder and mapping written).
The student's folder follows :mod:`torchtune_kd.output_folder`: claimed (new, empty or the writer's own) and every
file recorded before it is written, so a user's file is never replaced, whatever its name
(:func:`claim_student_folder`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from torchtune_kd import output_folder

PathLike = Union[str, Path]
_LAYER_PREFIX = "model.layers."
# Files of a Hugging Face model folder a pruned student shares with its teacher (tokenizer and generation settings).
SHARED_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "chat_template.jinja", "smollm2.tiktoken",
)
MARKER = "pruning.json"
# The command a folder claimed here is recorded as written by (torchtune_kd.output_folder), when the caller names none.
OWNER = "torchtune_kd.pruning"


@torch.no_grad()
def block_influence(
    model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4, real_tokens: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Block influence of every decoder layer of a torchtune decoder on calibration windows.

    Args:
        model (nn.Module): a torchtune ``TransformerDecoder`` (its ``layers`` are hooked; nothing is changed).
        windows (torch.Tensor): ``(num_windows, seq_len)`` token ids.
        batch_size (int): windows per forward pass.
        real_tokens (Optional[torch.Tensor]): ``(num_windows, seq_len)`` bool, the tokens to average over
            (default: all).

    Returns:
        torch.Tensor: ``(num_layers,)`` float64, ``1 − mean cos(input, output)`` per layer.
    """
    from torchtune_kd.core import alignment, fused_output

    layers = alignment.decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    current: dict[str, torch.Tensor] = {}

    def hook(index: int):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x_in = args[0].float()
            x_out = (output[0] if isinstance(output, tuple) else output).float()
            distance = 1.0 - F.cosine_similarity(x_in, x_out, dim=-1, eps=1e-8)
            sums[index] += torch.where(current["mask"], distance, torch.zeros_like(distance)).double().sum()

        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    mask = real_tokens if real_tokens is not None else torch.ones_like(windows, dtype=torch.bool)
    try:
        # The logits are not needed: skip the output projection (vocab-sized) for every window.
        with fused_output.hidden_states_out(model):
            for start in range(0, windows.shape[0], batch_size):
                batch = windows[start: start + batch_size]
                current["mask"] = mask[start: start + batch_size].to(batch.device)
                model(batch)
                count += current["mask"].sum()
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError("no real tokens in the calibration windows")
    return sums / count


def most_influential(scores: Sequence[float], num_layers: int) -> list[int]:
    """The ``num_layers`` layers with the highest scores, in increasing order (ties: the earlier layer)."""
    total = len(scores)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= total:
        raise ValueError(f"num_layers={num_layers!r} must be an integer from 1 to the teacher's depth {total}")
    ranked = sorted(range(total), key=lambda i: (-float(scores[i]), i))
    return sorted(ranked[:num_layers])


def evenly_spaced(num_teacher_layers: int, num_layers: int) -> list[int]:
    """``num_layers`` layers evenly spread over the teacher, the first and the last always included."""
    if isinstance(num_teacher_layers, bool) or not isinstance(num_teacher_layers, int) or num_teacher_layers < 1:
        raise ValueError(f"num_teacher_layers={num_teacher_layers!r} must be a positive integer")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= num_teacher_layers:
        raise ValueError(f"num_layers={num_layers!r} must be an integer from 1 to the teacher's depth {num_teacher_layers}")
    if num_layers == 1:
        return [0]
    last = num_teacher_layers - 1
    # Integer arithmetic (round half up): the choice never depends on float rounding.
    return [(2 * i * last + (num_layers - 1)) // (2 * (num_layers - 1)) for i in range(num_layers)]


def layer_mapping(kept: Sequence[int]) -> list[list[int]]:
    """Each student layer's output aligned with the teacher layer it was copied from."""
    return [[student, int(teacher)] for student, teacher in enumerate(kept)]


def calibration_text(path: Path) -> str:
    """The text the layers are scored on: a plain-text file as it is, an alpaca-style JSON list (``.json``) as its
    records' instruction / input / output text joined.

    Raises:
        ValueError: the file is missing, a folder, unreadable, not UTF-8, not a list of records, or holds no text;
            the message names ``--calibration``, the path and the fix.
    """
    shown = f"--calibration={str(path)!r}"
    if not path.exists():
        raise ValueError(f"{shown} does not exist: give a plain-text file or an alpaca-style .json list")
    if not path.is_file():
        raise ValueError(f"{shown} is a folder: give a plain-text file or an alpaca-style .json list")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{shown} is not UTF-8 text: give a plain-text file or an alpaca-style .json list") from None
    except OSError as err:
        raise ValueError(f"{shown} cannot be read ({err.strerror or err})") from None
    if path.suffix == ".json":
        try:
            records = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"{shown} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError(f"{shown} is JSON but not a list of records: give an alpaca-style list of "
                             "{instruction, input, output} records, or a plain-text file")
        if not records:
            raise ValueError(f"{shown} is an empty list ([]): give records with instruction / input / output text")
        fields = ("instruction", "input", "output")
        raw = "\n\n".join(" ".join(str(r.get(f) or "") for f in fields).strip() for r in records)
    if not raw.strip():
        raise ValueError(f"{shown} holds no text: give a file with the text to score the layers on")
    return raw


def calibration_windows(
    tokenizer: Any, text: str, seq_len: int, max_windows: int, source: Optional[Path] = None
) -> torch.Tensor:
    """Non-overlapping windows of the text, each starting with bos as in training.

    Args:
        tokenizer (Any): a torchtune tokenizer (``encode(text, add_bos, add_eos)``, ``bos_id``).
        text (str): the calibration text (:func:`calibration_text`).
        seq_len (int): tokens per window, bos included.
        max_windows (int): the most windows returned (the first ones).
        source (Optional[Path]): the calibration file, named in the error.

    Returns:
        torch.Tensor: ``(num_windows, seq_len)`` token ids, ``num_windows <= max_windows``.

    Raises:
        ValueError: the text is shorter than one window (the message names ``--calibration`` and ``--seq-len``).
    """
    ids = tokenizer.encode(text, add_bos=False, add_eos=False)
    body = seq_len - 1
    windows = [[tokenizer.bos_id, *ids[start: start + body]] for start in range(0, len(ids) - body + 1, body)]
    if not windows:
        shown = f"--calibration={str(source)!r}" if source is not None else "--calibration"
        raise ValueError(f"{shown} has {len(ids)} tokens, fewer than one window of --seq-len={seq_len}: give more "
                         "text or a smaller --seq-len")
    return torch.tensor(windows[:max_windows])


def _weight_files(teacher_dir: Path, files: Optional[Iterable[str]]) -> list[Path]:
    if files is not None:
        return [teacher_dir / name for name in files]
    index = teacher_dir / "model.safetensors.index.json"
    if index.is_file():
        return [teacher_dir / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [teacher_dir / "model.safetensors"]


def student_entries(teacher_dir: PathLike) -> list[str]:
    """The top-level names :func:`write_pruned_student` writes in the student's folder for this teacher.

    The weights, ``config.json``, the tokenizer and generation files the teacher has (:data:`SHARED_FILES`) and the
    record :data:`MARKER`, which is written last.
    """
    teacher_dir = Path(teacher_dir)
    shared = [name for name in SHARED_FILES if (teacher_dir / name).is_file()]
    return ["model.safetensors", "config.json", *shared, MARKER]


def teacher_fingerprint(teacher_dir: PathLike, files: Optional[Iterable[str]] = None) -> dict[str, list[int]]:
    """Size and modification time of the teacher's ``config.json`` and weight files.

    Cheap (no weights read), and enough to notice a teacher rebuilt in place: a student pruned from the old weights
    is then never reused.
    """
    teacher_dir = Path(teacher_dir)
    fingerprint = {}
    for path in [teacher_dir / "config.json", *_weight_files(teacher_dir, files)]:
        stat = path.stat()
        fingerprint[path.name] = [stat.st_size, stat.st_mtime_ns]
    return fingerprint


def student_folder_problems(
    out_dir: PathLike,
    teacher_dir: PathLike,
    *,
    owner: str = OWNER,
    option: str = "out_dir",
    overwrite: bool = False,
    overwrite_hint: Optional[str] = None,
) -> list[str]:
    """Why :func:`claim_student_folder` would refuse ``out_dir``, without writing anything (empty list: it would not).

    Beyond :func:`output_folder.check`: with ``overwrite`` (a foreign folder adopted), a file the student would be
    written over (e.g. a user's ``model.safetensors``) is still refused.
    """
    out_dir, teacher_dir = Path(out_dir), Path(teacher_dir)
    if out_dir.resolve() == teacher_dir.resolve():
        return [f"{option}={str(out_dir)!r} is the teacher's folder: give another folder for the student"]
    problems = output_folder.check(out_dir, owner=owner, option=option, overwrite=overwrite,
                                   overwrite_hint=overwrite_hint)
    if problems:
        return problems
    report = output_folder.inspect(out_dir)
    if not report.exists:
        return []
    ours = set(report.written) if report.owner == owner else set()
    clashes = [name for name in student_entries(teacher_dir)
               if name not in ours and os.path.lexists(out_dir / name)]
    if clashes:
        return [
            f"{option}={str(out_dir)!r} holds {', '.join(clashes)}, which {owner} did not write and never replaces: "
            "give a new or empty folder (or move those files)"
        ]
    return []


def claim_student_folder(
    out_dir: PathLike,
    teacher_dir: PathLike,
    *,
    owner: str = OWNER,
    option: str = "out_dir",
    overwrite: bool = False,
    overwrite_hint: Optional[str] = None,
) -> output_folder.OwnedFolder:
    """Claim ``out_dir`` for a pruned student and every entry the student will be written as.

    Raises:
        OutputFolderError: see :func:`student_folder_problems` (a ``ValueError``).
    """
    problems = student_folder_problems(out_dir, teacher_dir, owner=owner, option=option, overwrite=overwrite,
                                       overwrite_hint=overwrite_hint)
    if problems:
        raise output_folder.OutputFolderError(problems[0])
    folder = output_folder.claim_output_folder(out_dir, owner=owner, option=option, overwrite=overwrite,
                                               overwrite_hint=overwrite_hint)
    folder.claim(*student_entries(teacher_dir))
    return folder


def recorded_settings(out_dir: PathLike, owner: str) -> tuple[bool, Optional[dict]]:
    """Whether ``out_dir`` holds a complete student ``owner`` wrote, and the ``settings`` its record holds.

    Reads only (nothing is claimed): a command compares its settings with the earlier ones before it claims the
    folder. An unreadable record of ``owner``'s (an interrupted write) counts as no student: it is simply rewritten.
    """
    out_dir = Path(out_dir)
    report = output_folder.inspect(out_dir)
    record_path = out_dir / MARKER
    if report.owner != owner or MARKER not in report.written or not record_path.is_file():
        return False, None
    try:
        record = json.loads(record_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False, None
    return True, record.get("settings") if isinstance(record, dict) else None


def settings_change(before: Optional[dict], after: dict) -> str:
    """What differs between two recorded pruning settings, in words (e.g. ``num_layers 20 -> 22``)."""
    if not isinstance(before, dict):
        return "settings not recorded"
    changes = []
    for key, value in after.items():
        if before.get(key) != value:
            if key == "teacher_files":
                changes.append("the teacher's files changed")
            elif key == "calibration_sha256":
                changes.append("other calibration text")
            else:
                changes.append(f"{key} {before.get(key)!r} -> {value!r}")
    return ", ".join(changes)


def previous_record(folder: output_folder.OwnedFolder) -> Optional[dict[str, Any]]:
    """The record of a complete student this owner wrote in ``folder`` earlier, or ``None``.

    ``None`` also for a record this owner never claimed (a foreign ``pruning.json`` is never trusted) and for an
    unreadable one (an interrupted write of ours: it is simply rewritten).
    """
    marker = folder.path / MARKER
    if not folder.owns(MARKER) or not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def write_pruned_student(
    teacher_dir: PathLike,
    out_dir: Union[PathLike, output_folder.OwnedFolder],
    kept: Sequence[int],
    *,
    files: Optional[Iterable[str]] = None,
    info: Optional[dict[str, Any]] = None,
    force: bool = False,
    owner: str = OWNER,
) -> dict[str, Any]:
    """Write a student made of the teacher layers ``kept`` as a Hugging Face Llama-layout folder.

    Non-layer weights (embeddings, final norm, output) are copied; layer ``kept[i]`` becomes layer ``i``;
    ``config.json`` gets ``num_hidden_layers = len(kept)``; tokenizer and generation files are copied. Idempotent:
    a folder already holding the same choice from the same (unchanged) teacher is reused unless ``force``.

    The folder follows :mod:`torchtune_kd.output_folder`: it must be new, empty or this owner's, and every file is
    claimed before it is written, so a user's file is never replaced whatever its name. A student this owner wrote
    there before (another choice, or ``force``) is replaced.

    Args:
        teacher_dir (PathLike): the teacher's folder (``config.json`` and safetensors weights).
        out_dir (Union[PathLike, OwnedFolder]): the student's folder (must not be the teacher's): a path (claimed
            here for ``owner``), or a folder the caller claimed already (e.g. with :func:`claim_student_folder`).
        kept (Sequence[int]): strictly increasing teacher layer indices.
        files (Optional[Iterable[str]]): the weight files (default: the index's, or ``model.safetensors``).
        info (Optional[dict]): extra facts to record in ``pruning.json`` (scores, method, calibration).
        force (bool): rewrite even if the folder holds this choice already.
        owner (str): the command writing, when ``out_dir`` is a path.

    Returns:
        dict: ``kept_layers``, ``num_layers``, ``teacher_num_layers``, ``layer_mapping``, ``out_dir``,
        ``teacher_dir``, ``teacher_files`` and ``info``'s entries (also written to ``out_dir/pruning.json``).

    Raises:
        ValueError: a bad layer choice, a teacher folder without ``config.json`` or weights, or
            ``out_dir == teacher_dir``; ``output_folder.OutputFolderError`` (a ``ValueError``) for a folder that
            holds files this owner did not write.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    teacher_dir = Path(teacher_dir)
    folder = out_dir if isinstance(out_dir, output_folder.OwnedFolder) else None
    out_path = folder.path if folder is not None else Path(out_dir)
    weight_files = _weight_files(teacher_dir, files)
    missing = [str(p) for p in [teacher_dir / "config.json", *weight_files] if not p.is_file()]
    if missing:
        raise ValueError(f"teacher_dir={str(teacher_dir)!r} lacks {', '.join(missing)}: point it at a Hugging Face model folder")
    if out_path.resolve() == teacher_dir.resolve():
        raise ValueError(f"out_dir={str(out_path)!r} is the teacher's folder: give another folder")
    config = json.loads((teacher_dir / "config.json").read_text())
    depth = int(config["num_hidden_layers"])
    kept = [int(k) for k in kept]
    if not kept or kept != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= depth:
        raise ValueError(f"kept={kept} must be strictly increasing teacher layer indices in [0, {depth})")
    if folder is None:
        folder = claim_student_folder(out_path, teacher_dir, owner=owner)
    else:
        # A caller's folder: claim (or be refused) every file before the first byte is written.
        folder.claim(*student_entries(teacher_dir))
    record: dict[str, Any] = {
        "teacher_dir": str(teacher_dir.resolve()),
        "teacher_files": teacher_fingerprint(teacher_dir, files),
        "kept_layers": kept,
        "num_layers": len(kept),
        "teacher_num_layers": depth,
        "layer_mapping": layer_mapping(kept),
        **(info or {}),
    }
    previous = previous_record(folder)
    if previous is not None and not force and all(
        previous.get(key) == record[key] for key in ("kept_layers", "teacher_dir", "teacher_files")
    ) and all((out_path / name).is_file() for name in student_entries(teacher_dir)):
        return {**previous, "out_dir": str(out_path)}

    new_index = {teacher: student for student, teacher in enumerate(kept)}
    state: dict[str, torch.Tensor] = {}
    for path in weight_files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(_LAYER_PREFIX):
                    layer, rest = key[len(_LAYER_PREFIX):].split(".", 1)
                    if int(layer) in new_index:
                        state[f"{_LAYER_PREFIX}{new_index[int(layer)]}.{rest}"] = handle.get_tensor(key)
                else:
                    state[key] = handle.get_tensor(key)
    # The record goes first and comes back last: its presence means the folder is complete.
    folder.remove(MARKER)
    # Shared files an earlier student of ours copied from a teacher that had them, and this teacher lacks.
    entries = student_entries(teacher_dir)
    for name in SHARED_FILES:
        if name not in entries and folder.owns(name):
            folder.remove(name)
    tmp = out_path / ".model.safetensors.tmp"  # a temporary of the claimed entry: ours by the folder's rule
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, out_path / "model.safetensors")
    (out_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": len(kept)}, indent=2) + "\n")
    for name in SHARED_FILES:
        if (teacher_dir / name).is_file():
            shutil.copyfile(teacher_dir / name, out_path / name)
    (out_path / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    return {**record, "out_dir": str(out_path)}
