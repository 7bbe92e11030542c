"""``tokenizer`` and ``dataset``: their files, ``tokenizer.max_seq_len`` against the models, and the data built.

The tokenizer and dataset are built by ``core.data`` (as the recipes use them); this module explains what goes
wrong in words that name the key and the file: a tokenizer path of the wrong kind, malformed JSON, a column the
message transform needs and the data lacks, a dataset too small for one optimiser step.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from torchtune_kd.core import data
from torchtune_kd.core.config_checks.common import Findings, show, short
from torchtune_kd.core.config_checks.components import locate
from torchtune_kd.core.config_checks.files import describe_file, is_blank, is_local, json_problem

# Tokenizer builder (a substring of its dotted path) -> the kind of file its `path` must be, and how to describe it.
TOKENIZER_FILES = (
    ("smollm2", "tiktoken", "a tiktoken BPE file (smollm2.tiktoken, written by smollm2)"),
    ("llama3", "tiktoken", "a tiktoken BPE file (one base64 token and its rank per line, e.g. original/tokenizer.model "
                           "of a Llama 3 download)"),
    ("llama2", "binary", "a SentencePiece model (tokenizer.model)"),
    ("mistral", "binary", "a SentencePiece model (tokenizer.model)"),
    ("gemma", "binary", "a SentencePiece model (tokenizer.model)"),
    ("phi3", "binary", "a SentencePiece model (tokenizer.model)"),
    ("qwen2", "json", "a vocab.json (with tokenizer.merges_file)"),
)
# torchtune message transforms -> the columns they read (before column_map); optional ones (alpaca's input) omitted.
REQUIRED_COLUMNS = {
    "AlpacaToMessages": ("instruction", "output"),
    "InputOutputToMessages": ("input", "output"),
    "ShareGPTToMessages": ("conversations",),
    "OpenAIToMessages": ("messages",),
}
TOKENIZER_FILE_KEYS = ("path", "special_tokens_path", "merges_file")


@dataclass
class BuiltData(Findings):
    """The problems found building the data, and the tokenizer and dataset (``None`` when a problem was found)."""

    tokenizer: Any = None
    dataset: Any = None


def _data_files(ds: Any) -> list[str]:
    """The ``data_files`` values of one dataset section (a string, a list or a split -> file mapping)."""
    data_files = ds.get("data_files") if isinstance(ds, DictConfig) else None
    if data_files is None:
        return []
    if isinstance(data_files, DictConfig):
        values = list(data_files.values())
    elif isinstance(data_files, ListConfig):
        values = list(data_files)
    else:
        values = [data_files]
    return [str(value) for value in values]


# ----------------------------------------------------------------------------------------------------- files


def check_files(cfg: DictConfig) -> Findings:
    """The tokenizer's files exist; each local data file exists, is a file and is not blank."""
    found = Findings()
    tokenizer = cfg.get("tokenizer")
    if isinstance(tokenizer, DictConfig):
        for key in TOKENIZER_FILE_KEYS:
            value = tokenizer.get(key)
            if value is not None and not Path(str(value)).exists():
                found.problems.append(f"tokenizer.{key}={str(value)!r} does not exist")
    for where, ds in data.dataset_sections(cfg.get("dataset", None)):
        for value in _data_files(ds):
            if not is_local(value):
                continue
            path = Path(value)
            if not path.exists():
                found.problems.append(f"{where}.data_files={value!r} does not exist")
            elif path.is_dir():
                names = sorted(p.name for p in path.iterdir() if p.is_file())
                held = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "") if names else "no files"
                found.problems.append(
                    f"{where}.data_files={value!r} is a folder: point it at the data file itself (it holds {held})"
                )
            elif is_blank(path):
                found.problems.append(
                    f"{where}.data_files={value!r} is empty: put the samples in it or point {where}.data_files at the "
                    "right file"
                )
    return found


def check_seq_len(cfg: DictConfig, models: dict[str, Optional[nn.Module]]) -> Findings:
    """Token sequences are cut at ``tokenizer.max_seq_len``; both models must accept that many positions, and
    packing needs it (the length of each pack)."""
    found = Findings()
    tokenizer = cfg.get("tokenizer", None)
    if not isinstance(tokenizer, DictConfig):
        return found
    length = tokenizer.get("max_seq_len", None)
    if length is None:
        for where, ds in data.dataset_sections(cfg.get("dataset", None)):
            if isinstance(ds, DictConfig) and ds.get("packed", False):
                found.problems.append(
                    f"{where}.packed=True needs tokenizer.max_seq_len (the length of each pack): set "
                    f"tokenizer.max_seq_len, e.g. 2048, or {where}.packed=False"
                )
        return found
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        found.problems.append(f"tokenizer.max_seq_len={show(length)} must be an integer >= 1 or null")
        return found
    for key, model in models.items():
        limit = getattr(model, "max_seq_len", None)
        if isinstance(limit, int) and length > limit:
            found.problems.append(
                f"tokenizer.max_seq_len={length} is larger than {key}.max_seq_len={limit}: lower tokenizer.max_seq_len "
                f"or raise {key}.max_seq_len"
            )
    return found


# ------------------------------------------------------------------------------------- explaining a failed build


def _tokenizer_problem(tokenizer: DictConfig, err: Exception) -> str:
    """Turn a tokenizer builder's error into a line naming the key, what the file is and what the builder reads."""
    name = str(tokenizer.get("_component_"))
    path = tokenizer.get("path", None)
    try:
        kind, description = describe_file(Path(str(path))) if path is not None else ("", "")
    except OSError:
        kind = description = ""
    if not description:
        return f"tokenizer: could not build {name!r}: {short(err)}: check the tokenizer section"
    for builder, expected_kind, expected in TOKENIZER_FILES:
        if builder in name.lower():
            if kind != expected_kind:
                # The builder's own error adds nothing here (tiktoken quotes the file's first bytes back).
                return (
                    f"tokenizer.path={str(path)!r} is {description}, but {name} expects {expected}: point "
                    "tokenizer.path at it"
                )
            break
    files = [f"tokenizer.path={str(path)!r} ({description})"]
    for key in ("special_tokens_path", "merges_file"):
        value = tokenizer.get(key, None)
        if value is not None and Path(str(value)).exists():
            try:
                files.append(f"tokenizer.{key}={str(value)!r} ({describe_file(Path(str(value)))[1]})")
            except OSError:
                files.append(f"tokenizer.{key}={str(value)!r}")
    return f"tokenizer: could not build {name!r}: {short(err)}: check {' and '.join(files)}"


def _data_source(where: str, ds: DictConfig) -> str:
    """How the message names the data: its file(s), or the source."""
    files = _data_files(ds)
    if len(files) == 1:
        return f"{where}.data_files={files[0]!r}"
    if files:
        return f"{where}.data_files={files!r}"
    return f"{where}.source={ds.get('source', None)!r}"


def _column_fix(where: str, name: str) -> str:
    """How to supply missing columns: rename them, or the dataset builder's own mapping keyword when it has one."""
    fix = "rename them in the file"
    try:
        # The builder already ran, so its path imports; builtins may have no readable signature.
        parameters = inspect.signature(locate(name)).parameters
    except (TypeError, ValueError):
        return fix
    if "column_map" in parameters:
        fix += f" or map them with {where}.column_map"
    elif "conversation_column" in parameters:
        fix += f" or set {where}.conversation_column"
    return fix


def _column_problem(where: str, ds_cfg: DictConfig, dataset: Any, *, try_sample: bool) -> Optional[str]:
    """The columns the dataset's message transform reads that its data lacks, named with the columns present.

    Args:
        where (str): the dataset's config key.
        ds_cfg (DictConfig): its section.
        dataset (Any): the built, unpacked dataset (torchtune's ``SFTDataset``).
        try_sample (bool): also build sample 0 and catch the ``KeyError`` of a column the table does not know.
    """
    table = getattr(dataset, "_data", None)
    columns = list(getattr(table, "column_names", None) or [])
    transform = getattr(dataset, "_message_transform", None)
    column_map = getattr(transform, "column_map", None) or getattr(transform, "_column_map", None) or {}
    required = [column_map.get(c, c) for c in REQUIRED_COLUMNS.get(type(transform).__name__, ())]
    missing = [c for c in required if columns and c not in columns]
    if not missing and try_sample and len(dataset) > 0:
        try:
            dataset[0]
        except KeyError as err:
            column = str(err.args[0]) if err.args else ""
            if column and column not in columns:
                missing = [column]
        except Exception as err:  # the user's transform and tokenizer run here and may raise anything: said below
            return (
                f"{_data_source(where, ds_cfg)}: sample 0 cannot be tokenized by {ds_cfg.get('_component_')}: "
                f"{short(err)}: check the data and the {where} section's column settings"
            )
    if not missing:
        return None
    name = str(ds_cfg.get("_component_"))
    return (
        f"{_data_source(where, ds_cfg)} lacks column(s) {missing} that {name} needs (columns present: "
        f"{sorted(columns)}): {_column_fix(where, name)}"
    )


def _dataset_problem(where: str, ds_cfg: DictConfig, tokenizer: Any, err: Exception) -> str:
    """Explain why a dataset failed to build: malformed JSON, a missing column (also when packing), or the error."""
    source = ds_cfg.get("source", None)
    for value in _data_files(ds_cfg):
        if is_local(value) and Path(value).is_file() and (source == "json" or value.endswith((".json", ".jsonl"))):
            reason = json_problem(Path(value))
            if reason == "it is empty":
                return (
                    f"{where}.data_files={value!r} holds no samples: put the samples in it (a JSON list of records, or "
                    f"one JSON record per line) or point {where}.data_files at the right file"
                )
            if reason is not None:
                return (
                    f"{where}.data_files={value!r} is not valid JSON ({reason}): fix the file (a JSON list of records, or "
                    "one JSON record per line)"
                )
    if isinstance(err, KeyError) and ds_cfg.get("packed", False):
        # Packing reads every sample while building; the unpacked dataset shows which column is missing.
        try:
            unpacked = data.build_dataset(OmegaConf.merge(ds_cfg, {"packed": False}), tokenizer)
        except Exception:  # the user's builder again: if it fails unpacked too, the packed error below explains it
            unpacked = None
        problem = _column_problem(where, ds_cfg, unpacked, try_sample=True) if unpacked is not None else None
        if problem is not None:
            return problem
    return f"{where}: could not build {ds_cfg.get('_component_')!r}: {short(err)}: check the {where} section"


# ----------------------------------------------------------------------------------------------------- build


def build(cfg: DictConfig) -> BuiltData:
    """Build the tokenizer and the dataset(s) as the recipe uses them, naming what goes wrong.

    Args:
        cfg (DictConfig): the config; ``tokenizer`` and ``dataset`` are present and their files were checked.
    """
    from torchtune.datasets import PackedDataset

    found = BuiltData()
    try:
        tokenizer = data.build_tokenizer(cfg.tokenizer)
    except Exception as err:  # the user's tokenizer builder may raise anything; its message rarely names the file
        found.problems.append(_tokenizer_problem(cfg.tokenizer, err))
        return found
    sections = data.dataset_sections(cfg.dataset)
    built = []
    for where, ds_cfg in sections:
        if not isinstance(ds_cfg, DictConfig):
            found.problems.append(
                f"{where}={show(ds_cfg)} must be a mapping with a _component_, e.g. torchtune.datasets.alpaca_dataset"
            )
            continue
        try:
            dataset = data.build_dataset(ds_cfg, tokenizer)
        except Exception as err:  # the user's dataset builder (and `datasets`) may raise anything: explained
            found.problems.append(_dataset_problem(where, ds_cfg, tokenizer, err))
            continue
        packed = isinstance(dataset, PackedDataset)
        # A packed dataset has read every sample already; an unpacked one is checked on its first sample.
        problem = _column_problem(where, ds_cfg, dataset.ds if packed else dataset, try_sample=not packed)
        if problem is not None:
            found.problems.append(problem)
            continue
        built.append(dataset)
    if len(built) != len(sections):
        return found
    try:
        found.dataset = data.combine_datasets(cfg.dataset, built)
    except ValueError as err:  # packed and unpacked datasets mixed
        found.problems.append(f"dataset: the datasets cannot be concatenated: {short(err)}: pack all of them or none")
        return found
    found.tokenizer = tokenizer
    return found


def check_sample_count(cfg: DictConfig, dataset: Any, world_size: int = 1) -> Findings:
    """The dataloader drops the last partial batch: fewer samples than one optimiser step means no step at all
    (with data parallelism each rank gets ``ceil(samples / world_size)``)."""
    found = Findings()
    batch_size, accumulation = cfg.get("batch_size", None), cfg.get("gradient_accumulation_steps", 1)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in (batch_size, accumulation)):
        return found  # reported by the integer checks
    count = len(dataset)
    per_rank = -(-count // world_size)
    if per_rank < batch_size * accumulation:
        unit = "samples (packed)" if getattr(dataset, "packed", False) or type(dataset).__name__ == "PackedDataset" else "samples"
        where = f" on each of {world_size} ranks ({per_rank} of them per rank)" if world_size > 1 else ""
        found.problems.append(
            f"batch_size={batch_size} x gradient_accumulation_steps={accumulation} = {batch_size * accumulation} "
            f"samples per optimiser step{where}, but the dataset has {count} {unit} (the last partial batch is "
            "dropped, so an epoch has no step): lower batch_size or gradient_accumulation_steps, or use more data"
        )
    return found
