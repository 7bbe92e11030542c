"""Config pre-flight for the distillation recipes: validate the whole config once, up front.

:func:`validate_config` runs before any weights load. It reports every problem together in one
:class:`ConfigError` (a ``ValueError``), each naming the key, the value and the fix: unknown keys, bad numbers,
missing files, inconsistent loss/chunk settings, loss and optimiser arguments (the losses are built, the optimiser
class is imported and its keywords checked against its signature), bad layer mappings and scales, a
student/teacher vocabulary mismatch, a tokenizer longer than the models, and, with files, truncated safetensors,
checkpoint folders whose ``config.json`` does not match the builder and an output folder that cannot be written.
With ``build_data=True`` it also builds the tokenizer and the dataset (and hands them back for the recipe to reuse)
and names empty, malformed or mis-columned data files and a dataset too small for one optimiser step.

Models are instantiated on the ``meta`` device to read their depths and sizes, so a real Llama 3.2 1B/3B pair costs
no memory.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from torchtune_kd.core import alignment, checkpointing, loss_weighting, teacher_cache
from torchtune_kd.core.models import HIDDEN_STATES_FLAG, model_config_without_flag
from torchtune_kd.errors import ConfigError  # noqa: F401  (raised here; re-exported for callers)

KNOWN_TOP_LEVEL_KEYS = frozenset(
    {
        # torchtune 0.6.1 knowledge_distillation_single_device keys
        "output_dir", "model", "teacher_model", "tokenizer", "checkpointer", "teacher_checkpointer",
        "resume_from_checkpoint", "save_adapter_weights_only", "dataset", "seed", "shuffle", "batch_size",
        "optimizer", "lr_scheduler", "loss", "kd_loss", "kd_ratio", "epochs", "max_steps_per_epoch",
        "gradient_accumulation_steps", "clip_grad_norm", "compile", "metric_logger", "log_every_n_steps",
        "log_peak_memory_stats", "device", "dtype", "enable_activation_checkpointing",
        "enable_activation_offloading", "profiler", "low_cpu_ram", "cudnn_deterministic_mode",
        # torchtune-kd additions
        "layer_mapping", "ir_loss", "loss_scaling", "projection_lr_multiplier", "save_projections",
        "save_every_n_steps", "keep_last_n", "overwrite_output_dir", "max_nonfinite_steps", "fused_output",
        "teacher_cache",
        # the distributed recipe (torchtune's distributed recipes' names)
        *("fsdp_cpu_offload", "fsdp_reshard_after_forward", "custom_sharded_layers"),
    }
)
FSDP_KEYS = ("fsdp_cpu_offload", "fsdp_reshard_after_forward", "custom_sharded_layers")
REQUIRED_KEYS = (
    "output_dir", "model", "teacher_model", "tokenizer", "checkpointer", "teacher_checkpointer", "dataset",
    "optimizer", "loss", "kd_loss", "epochs", "batch_size", "device", "dtype", "metric_logger",
)
LOSS_SCALING_KEYS = frozenset({"enabled", "method", "manual_scales", "dynamic"})
CHUNKED_CE = "torchtune.modules.loss.CEWithChunkedOutputLoss"
CE_LOSSES = (CHUNKED_CE, "torch.nn.CrossEntropyLoss")
# The recipe runs this one and reads its (profiler, config) return value; other profilers return something else.
PROFILER_COMPONENT = "torchtune.training.setup_torch_profiler"
# Arguments the recipe passes itself when it builds the component; the config must not set them.
RECIPE_SUPPLIED_ARGS = {"optimizer": ("params",)}
# The safetensors format caps its JSON header at 100 MB; a larger length is corruption, not a big model.
SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024
# Hugging Face config.json key -> torchtune builder keyword, compared against the meta-device model.
HF_TO_BUILDER = (
    ("hidden_size", "embed_dim"),
    ("num_hidden_layers", "num_layers"),
    ("vocab_size", "vocab_size"),
    ("num_attention_heads", "num_heads"),
    ("num_key_value_heads", "num_kv_heads"),
    ("intermediate_size", "intermediate_dim"),
)
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
# Problems about these keys stop the tokenizer and data from being built (the build would only fail again).
DATA_KEYS = ("tokenizer", "dataset")


# Optional sections a null ``_component_`` switches off (see disable_null_components).
OPTIONAL_COMPONENTS = ("lr_scheduler", "ir_loss", "profiler")


@dataclass
class ModelFacts:
    """What pre-flight learned about the two models (read from ``meta``-device instances) and, with
    ``build_data=True``, the tokenizer and dataset it built.

    Attributes:
        student_depth (int), teacher_depth (int): number of decoder layers.
        student_dim (int), teacher_dim (int): hidden sizes.
        student_vocab (int), teacher_vocab (int): vocabulary sizes.
        student_is_lora (bool): the student has LoRA adapters.
        student_max_seq_len (Optional[int]), teacher_max_seq_len (Optional[int]): the models' ``max_seq_len``.
        layer_pairs (list[tuple[int, int]]): the resolved layer mapping (empty: no IR loss).
        notices (list[str]): things the user should know that are not errors.
        tokenizer (Any): the built tokenizer (``build_data=True``), else ``None``.
        dataset (Any): the built dataset (a ``ConcatDataset`` for a list of datasets; ``build_data=True``), else
            ``None``.
        num_samples (Optional[int]): ``len(dataset)`` (packs when packed; ``build_data=True``), else ``None``.
    """

    student_depth: int
    teacher_depth: int
    student_dim: int
    teacher_dim: int
    student_vocab: int
    teacher_vocab: int
    student_is_lora: bool
    student_max_seq_len: Optional[int] = None
    teacher_max_seq_len: Optional[int] = None
    layer_pairs: list[tuple[int, int]] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    tokenizer: Any = field(default=None, repr=False, compare=False)
    dataset: Any = field(default=None, repr=False, compare=False)
    num_samples: Optional[int] = None


# ----------------------------------------------------------------------------------------------------- helpers


def _component(cfg: Any) -> Optional[str]:
    return cfg.get("_component_") if isinstance(cfg, DictConfig) else None


def _show(value: Any) -> str:
    """``repr`` of a config value, with OmegaConf containers shown as plain lists and dicts."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    return repr(value)


def _short(err: BaseException, limit: int = 200) -> str:
    """A library error on one short line: some (tiktoken's) quote a whole binary file back."""
    text = " ".join(str(err).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _as_number(value: Any, *, strings: bool = True) -> Optional[float]:
    """``value`` as a finite float, or ``None``. Booleans are not numbers here (YAML's ``yes`` would pass)."""
    if isinstance(value, bool) or (isinstance(value, str) and not strings):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _concerns(problems: list[str], keys: Iterable[str]) -> bool:
    """Whether any problem line is about one of the top-level ``keys`` (each line starts with its key)."""
    pattern = re.compile(rf"^(?:missing required key ')?(?:{'|'.join(map(re.escape, keys))})\b")
    return any(pattern.match(problem) for problem in problems)


def _check_int(cfg: DictConfig, key: str, problems: list[str], *, minimum: int, optional: bool = False) -> None:
    value = cfg.get(key, None)
    if value is None:
        if not optional and key in cfg:
            problems.append(f"{key}=None must be an integer >= {minimum}")
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        problems.append(f"{key}={value!r} must be an integer >= {minimum}")


def _resolve_component(key: str, section: Any, problems: list[str], *, example: str) -> Optional[Any]:
    """Import ``section._component_`` without calling it; name an unknown one with a did-you-mean.

    Args:
        key (str): the config key of the section (for the message).
        section (Any): the section's config.
        problems (list[str]): where problems are added.
        example (str): a valid component, shown when the section is not a mapping or has none.

    Returns:
        Optional[Any]: the class or function, or ``None`` (a problem was added).
    """
    from torchtune.config._utils import _get_component_from_path

    if not isinstance(section, DictConfig):
        problems.append(f"{key}={_show(section)} must be a mapping with a _component_, e.g. {key}: {{_component_: {example}}}")
        return None
    path = section.get("_component_", None)
    if not isinstance(path, str) or not path:
        problems.append(f"{key}._component_={path!r} is missing: name the class or function to build, e.g. {example}")
        return None
    try:
        return _get_component_from_path(path)
    except Exception:  # torchtune wraps every import failure in InstantiationError; the fix is the same
        module_name, _, name = path.rpartition(".")
        try:
            module = importlib.import_module(module_name) if module_name else None
        except Exception:
            module = None
        if module is None:
            fix = f"module {module_name or path!r} cannot be imported: check the spelling, e.g. {example}"
        else:
            # A module's __all__ (kd_losses has one) is its menu; otherwise its public names.
            names = list(getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")])
            close = difflib.get_close_matches(name, names, n=1)
            fix = f"did you mean '{module_name}.{close[0]}'?" if close else f"{module_name!r} has no {name!r}, e.g. {example}"
        problems.append(f"{key}._component_={path!r} cannot be imported: {fix}")
        return None


def _accepted_kwargs(target: Any) -> Optional[list[str]]:
    """Keyword names ``target`` accepts, following ``**kwargs`` up a class hierarchy.

    Returns:
        Optional[list[str]]: sorted names, or ``None`` when the set is open (a function taking ``**kwargs``, or a
        signature that cannot be read), so that nothing is wrongly rejected.
    """
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    functions = (
        [klass.__dict__["__init__"] for klass in target.__mro__ if "__init__" in klass.__dict__ and klass is not object]
        if inspect.isclass(target)
        else [target]
    )
    names: set[str] = set()
    for function in functions:
        try:
            parameters = inspect.signature(function).parameters
        except (TypeError, ValueError):
            return None
        names |= {n for n, p in parameters.items() if n != "self" and p.kind in named}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return sorted(names)
    return None


def _check_kwargs(
    key: str, section: DictConfig, target: Any, problems: list[str], *, skip: Iterable[str] = ()
) -> bool:
    """Every key of ``section`` is a keyword of ``target``; each stranger is named with a did-you-mean.

    Args:
        key (str): the section's config key.
        section (DictConfig): the section.
        target (Any): the resolved ``_component_``.
        problems (list[str]): where problems are added.
        skip (Iterable[str]): keys already reported another way.

    Returns:
        bool: True when every key is accepted (or the signature is open).
    """
    accepted = _accepted_kwargs(target)
    if accepted is None:
        return True
    supplied = RECIPE_SUPPLIED_ARGS.get(key, ())
    accepted = [name for name in accepted if name not in supplied]
    ok = True
    for name in section.keys():
        if name == "_component_" or name in accepted:
            continue
        ok = False  # a skipped key is still wrong: the section must not be built with it
        if name in skip:
            continue
        value = _show(section.get(name))
        if name in supplied:
            problems.append(f"{key}.{name}={value} is passed by the recipe itself: remove it")
            continue
        close = difflib.get_close_matches(str(name), accepted, n=1)
        fix = f"did you mean {close[0]!r}?" if close else "remove it"
        problems.append(
            f"{key}.{name}={value} is not an argument of {section._component_}: {fix} (accepted: {', '.join(accepted)})"
        )
    return ok


# ------------------------------------------------------------------------------------------------------ losses


def _check_loss_numbers(key: str, section: DictConfig, problems: list[str]) -> bool:
    """The numeric loss arguments, checked here so that the message names the config key and a valid value."""
    ok = True
    if "temperature" in section:
        value = section.get("temperature")
        number = _as_number(value)
        if number is None or not number > 0:
            problems.append(
                f"{key}.temperature={_show(value)} must be a finite number > 0 (both logits are divided by it): "
                f"e.g. {key}.temperature=1.0"
            )
            ok = False
    for name, example in (("lambda_weight", 0.5), ("alpha", 0.1)):
        if name in section:
            value = section.get(name)
            number = _as_number(value)
            if number is None or not 0.0 <= number <= 1.0:
                problems.append(f"{key}.{name}={_show(value)} must be a number in [0, 1]: e.g. {key}.{name}={example}")
                ok = False
    if "num_output_chunks" in section:
        value = section.get("num_output_chunks")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(
                f"{key}.num_output_chunks={_show(value)} must be an integer >= 1: e.g. 8, the same for loss and kd_loss"
            )
            ok = False
    return ok


def _check_ce_keys(loss: DictConfig, problems: list[str], *, skip: Iterable[str] = ()) -> bool:
    """The recipe computes the cross-entropy itself (``loss_step.ce_token_sum``): reject what it would ignore.

    Returns:
        bool: True when every key is one the recipe reads (``skip``: keys reported another way, still not built).
    """
    honoured = ["_component_", "ignore_index"] + (["num_output_chunks"] if _component(loss) == CHUNKED_CE else [])
    ok = True
    for name in loss.keys():
        if name in honoured:
            continue
        ok = False
        if name in skip:
            continue
        value = _show(loss.get(name))
        if name == "num_output_chunks":
            problems.append(
                f"loss.num_output_chunks={value} is not applied: the model's output is chunked only with {CHUNKED_CE}: "
                "remove it, or use that loss with a chunked kd_loss"
            )
            continue
        close = difflib.get_close_matches(str(name), honoured[1:], n=1)
        fix = f"did you mean {close[0]!r}?" if close else "remove it"
        problems.append(
            f"loss.{name}={value} is not applied: the recipe computes the cross-entropy itself (a mean over the "
            f"tokens whose label is not ignore_index) and reads only {', '.join('loss.' + k for k in honoured)}: {fix}"
        )
    return ok


def _build_loss(key: str, section: DictConfig, target: Any, problems: list[str], *, skip: Iterable[str] = ()) -> None:
    """Check the section's keywords and numbers, then build it (cheap: losses hold no weights)."""
    from torchtune import config as tt_config

    keywords_ok = _check_kwargs(key, section, target, problems, skip=skip)
    if not (_check_loss_numbers(key, section, problems) and keywords_ok):
        return
    try:
        tt_config.instantiate(section)
    except Exception as err:  # whatever the class rejects, said by the class, under the config key
        problems.append(f"{key}: could not build {section._component_!r}: {_short(err)}: fix the {key} section")


def _check_losses(cfg: DictConfig, problems: list[str]) -> None:
    """``loss``, ``kd_loss`` and ``ir_loss``: supported classes, consistent chunking, then each one built."""
    loss, kd_loss, ir_loss = cfg.get("loss"), cfg.get("kd_loss"), cfg.get("ir_loss", None)
    ce_name, kd_name = _component(loss), _component(kd_loss)
    ce_target = kd_target = None
    if ce_name is not None and ce_name not in CE_LOSSES:
        close = difflib.get_close_matches(ce_name, CE_LOSSES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        problems.append(f"loss._component_={ce_name!r} is not supported: {hint}use one of {list(CE_LOSSES)}")
    elif loss is not None:
        ce_target = _resolve_component("loss", loss, problems, example=CHUNKED_CE)
    if kd_name is not None and kd_name.startswith("torchtune.modules.loss."):
        problems.append(
            f"kd_loss._component_={kd_name!r}: torchtune's KD losses return the soft cross-entropy, not a KL; use the "
            "kd_losses class of the same name (the exact divergence), e.g. kd_losses.ForwardKLWithChunkedOutputLoss"
        )
    elif kd_loss is not None:
        kd_target = _resolve_component("kd_loss", kd_loss, problems, example="kd_losses.ForwardKLWithChunkedOutputLoss")
        if kd_target is not None and not callable(getattr(kd_target, "token_sum", None)):
            problems.append(
                f"kd_loss._component_={kd_name!r} has no token_sum(student_logits, teacher_logits, labels) -> (sum, "
                "count): the recipe sums every KD loss over tokens itself; use a kd_losses class or add token_sum "
                "(see the README's 'Writing your own divergence')"
            )
            kd_target = None

    chunk_mismatch = False
    if ce_target is not None and kd_target is not None:
        ce_chunked = ce_name.endswith("CEWithChunkedOutputLoss")
        # Chunked KD losses take the list of logit chunks; the contract says so with a num_output_chunks argument.
        kd_chunked = kd_name.endswith("WithChunkedOutputLoss") or "num_output_chunks" in (_accepted_kwargs(kd_target) or [])
        if ce_chunked != kd_chunked:
            chunk_mismatch = True
            problems.append(
                f"loss ({ce_name}) and kd_loss ({kd_name}) must both be chunked or both unchunked: the model produces "
                "one kind of output for both"
            )
        elif ce_chunked:
            ce_chunks = loss.get("num_output_chunks", 8)
            kd_chunks = kd_loss.get("num_output_chunks", 8)
            if ce_chunks != kd_chunks:
                problems.append(
                    f"loss.num_output_chunks={ce_chunks} differs from kd_loss.num_output_chunks={kd_chunks}: set both "
                    "to the same value"
                )
    # With a chunked/unchunked mismatch the fix is the class, not removing num_output_chunks: say it once.
    skip = ("num_output_chunks",) if chunk_mismatch else ()
    if ce_target is not None and _check_ce_keys(loss, problems, skip=skip):
        _build_loss("loss", loss, ce_target, problems, skip=skip)
    if kd_target is not None:
        _build_loss("kd_loss", kd_loss, kd_target, problems, skip=skip)
    if ir_loss is not None:
        ir_target = _resolve_component("ir_loss", ir_loss, problems, example="kd_losses.CosineIRLoss")
        if ir_target is not None:
            _build_loss("ir_loss", ir_loss, ir_target, problems)


def _check_kd_ratio(cfg: DictConfig, blend: bool, problems: list[str]) -> float:
    """``kd_ratio`` is a number in [0, 1]; returns it, or the default 0.5 when it is absent or wrong.

    Checked whether or not the blend uses it: a wrong value is wrong either way, and ``float('abc')``'s own message
    names neither the key nor the fix.
    """
    value = cfg.get("kd_ratio", None)
    if value is None and not ("kd_ratio" in cfg and blend):
        return 0.5
    number = _as_number(value)
    if number is None or not 0.0 <= number <= 1.0:
        problems.append(
            f"kd_ratio={_show(value)} must be a number in [0, 1]: the blend is (1 - kd_ratio) * CE + kd_ratio * KD "
            "(used when loss_scaling.enabled is false)"
        )
        return 0.5
    return number


# ----------------------------------------------------------------------------------------- optimiser, profiler


def _check_optimizer(cfg: DictConfig, problems: list[str]) -> None:
    """The optimiser class imports, its keywords exist and ``lr`` is a number >= 0 (no parameters needed)."""
    section = cfg.get("optimizer", None)
    if section is None:
        return  # reported as a missing required key
    target = _resolve_component("optimizer", section, problems, example="torch.optim.AdamW")
    if not isinstance(section, DictConfig):
        return
    if "lr" in section:
        lr = section.get("lr")
        # Strictly a number: torch compares it with floats, so even the string "3e-4" fails there.
        number = _as_number(lr, strings=False)
        if number is None or number < 0:
            problems.append(f"optimizer.lr={_show(lr)} must be a number >= 0: e.g. optimizer.lr=3e-4")
    if target is not None:
        _check_kwargs("optimizer", section, target, problems)


def _check_profiler(cfg: DictConfig, problems: list[str]) -> None:
    """The recipe unpacks ``setup_torch_profiler``'s (profiler, config) result: no other component fits."""
    section = cfg.get("profiler", None)
    if section is None:
        return
    if not isinstance(section, DictConfig):
        problems.append(
            f"profiler={_show(section)} must be a mapping, e.g. profiler: {{_component_: {PROFILER_COMPONENT}, "
            "enabled: false}, or null"
        )
        return
    name = section.get("_component_", None)
    if name is not None and name != PROFILER_COMPONENT:
        problems.append(
            f"profiler._component_={name!r} is not supported: set profiler._component_={PROFILER_COMPONENT} (the only "
            "profiler the recipe runs) or remove the profiler section"
        )


# ------------------------------------------------------------------------------------------------------- files


def _dataset_entries(cfg: DictConfig) -> list[tuple[str, Any]]:
    """(config key, section) for each dataset: ``dataset`` or ``dataset[i]`` for a list."""
    datasets = cfg.get("dataset", None)
    if isinstance(datasets, ListConfig):
        return [(f"dataset[{index}]", ds) for index, ds in enumerate(datasets)]
    return [("dataset", datasets)] if datasets is not None else []


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


def _is_local(value: str) -> bool:
    """A plain local path (not a URL or a glob, which ``datasets`` resolves itself)."""
    return "://" not in value and not any(ch in value for ch in "*?[")


def _safetensors_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a complete safetensors file, from its header alone (no weights are read).

    The format is an 8-byte little-endian header length, a JSON header whose tensors' ``data_offsets`` index the
    data that follows, and nothing after the last tensor: so the file size must be 8 + header length + the largest
    offset.
    """
    size = path.stat().st_size
    if size < 8:
        return f"{size} bytes, too short for the safetensors header length"
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > size - 8 or length > SAFETENSORS_MAX_HEADER:
            return f"its header length {length} exceeds the file ({size} bytes)"
        raw = handle.read(length)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        return "its header is not valid JSON"
    try:
        end = max((int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"), default=0)
    except (KeyError, TypeError, IndexError, ValueError):
        return "its header has a tensor without valid data_offsets"
    expected = 8 + length + end
    if size != expected:
        return f"{size} bytes, but its header describes {expected}"
    return None


def _check_paths(cfg: DictConfig, problems: list[str], *, teacher_optional: bool = False) -> None:
    """Input files exist and look whole. ``teacher_optional``: a run from a teacher cache never loads the teacher,
    so its files are checked only where they exist (the cache check then verifies them)."""
    for key in ("checkpointer", "teacher_checkpointer"):
        ckpt = cfg.get(key)
        if not isinstance(ckpt, DictConfig):
            continue
        if key == "teacher_checkpointer" and teacher_optional and not Path(str(ckpt.get("checkpoint_dir", ""))).is_dir():
            continue
        directory = Path(str(ckpt.get("checkpoint_dir", "")))
        if not directory.is_dir():
            problems.append(
                f"{key}.checkpoint_dir={str(directory)!r} does not exist: download the model there (see the "
                "config's header) or point the key at it"
            )
            continue
        if _component(ckpt) and _component(ckpt).endswith("FullModelHFCheckpointer") and not (directory / "config.json").is_file():
            problems.append(f"{key}.checkpoint_dir={str(directory)!r} has no config.json: not a Hugging Face model folder")
        for name in checkpointing.checkpoint_file_names(key, ckpt.get("checkpoint_files", []), problems):
            path = directory / name
            if not path.is_file():
                if not (key == "teacher_checkpointer" and teacher_optional):
                    problems.append(f"{key}.checkpoint_files: {name!r} is not in {str(directory)!r}")
                continue
            if name.endswith(".safetensors"):
                try:
                    reason = _safetensors_problem(path)
                except OSError as err:  # e.g. no read permission: the checkpointer would fail the same way
                    reason = f"it cannot be read ({_short(err)})"
                if reason is not None:
                    problems.append(
                        f"{key}.checkpoint_files: {str(path)!r} is truncated or corrupt: {reason}: download or copy it "
                        "again"
                    )
    tokenizer = cfg.get("tokenizer")
    if isinstance(tokenizer, DictConfig):
        for key in ("path", "special_tokens_path", "merges_file"):
            value = tokenizer.get(key)
            if value is not None and not Path(str(value)).exists():
                problems.append(f"tokenizer.{key}={str(value)!r} does not exist")
    for where, ds in _dataset_entries(cfg):
        for value in _data_files(ds):
            if not _is_local(value):
                continue
            path = Path(value)
            if not path.exists():
                problems.append(f"{where}.data_files={value!r} does not exist")
            elif path.is_dir():
                names = sorted(p.name for p in path.iterdir() if p.is_file())
                held = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "") if names else "no files"
                problems.append(f"{where}.data_files={value!r} is a folder: point it at the data file itself (it holds {held})")
            elif _is_blank(path):
                problems.append(
                    f"{where}.data_files={value!r} is empty: put the samples in it or point {where}.data_files at the "
                    "right file"
                )


def _is_blank(path: Path) -> bool:
    """Empty or only whitespace (read only when small: a real data file is never a few bytes of spaces)."""
    size = path.stat().st_size
    return size == 0 or (size < 4096 and not path.read_bytes().strip())


def builder_sizes(model: nn.Module) -> dict[str, int]:
    """The builder keywords of ``HF_TO_BUILDER`` as the meta-device model has them (those it exposes)."""
    sizes: dict[str, int] = {}
    try:
        layers = alignment.decoder_layers(model)
        sizes["num_layers"] = len(layers)
        sizes["embed_dim"] = alignment.model_embed_dim(model)
        sizes["vocab_size"] = alignment.model_vocab_size(model)
        attn = getattr(layers[0], "attn", None)
        for name in ("num_heads", "num_kv_heads"):
            if isinstance(getattr(attn, name, None), int):
                sizes[name] = getattr(attn, name)
        # w1's weight is (intermediate_dim, embed_dim) for nn.Linear and LoRA/DoRA linears alike.
        weight = getattr(getattr(getattr(layers[0], "mlp", None), "w1", None), "weight", None)
        if weight is not None:
            sizes["intermediate_dim"] = int(weight.shape[0])
    except (ValueError, IndexError, AttributeError):
        pass  # not a torchtune decoder: compare what was read
    return sizes


def _check_checkpoint_config(key: str, model_key: str, ckpt: Any, model: nn.Module, problems: list[str]) -> None:
    """The checkpoint folder's ``config.json`` describes the model the builder makes (else loading fails late)."""
    if not isinstance(ckpt, DictConfig):
        return
    directory = Path(str(ckpt.get("checkpoint_dir", "")))
    path = directory / "config.json"
    if not path.is_file():
        return
    try:
        hf = json.loads(path.read_text())
        if not isinstance(hf, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        problems.append(
            f"{key}.checkpoint_dir={str(directory)!r}: config.json is not valid JSON ({_short(err)}): download or copy "
            "the model again"
        )
        return
    # Hugging Face leaves num_key_value_heads out when it equals num_attention_heads.
    hf.setdefault("num_key_value_heads", hf.get("num_attention_heads"))
    built = builder_sizes(model)
    wrong = [
        (hf_key, hf[hf_key], builder_key, built[builder_key])
        for hf_key, builder_key in HF_TO_BUILDER
        if isinstance(hf.get(hf_key), int) and builder_key in built and hf[hf_key] != built[builder_key]
    ]
    if wrong:
        problems.append(
            f"{key}.checkpoint_dir={str(directory)!r} does not match {model_key}: its config.json has "
            f"{', '.join(f'{h}={v}' for h, v, _, _ in wrong)} but {model_key} builds "
            f"{', '.join(f'{b}={v}' for _, _, b, v in wrong)}: point {key}.checkpoint_dir at the matching model or fix "
            f"{', '.join(f'{model_key}.{b}' for _, _, b, _ in wrong)}"
        )


def _check_output_dir(cfg: DictConfig, problems: list[str]) -> None:
    """The run can create ``output_dir`` (or write in it), tested on its nearest existing folder: nothing is created;
    and the folder follows the output-folder rule (``checkpointing.check_output_dir``): no other run's outputs, no
    file of the user's where the run writes, no input where the run writes."""
    value = cfg.get("output_dir", None)
    if value is None:
        return
    target = Path(str(value)).expanduser().absolute()
    probe = target
    # os.path.exists is False (not an exception) for paths we may not even look into.
    while not os.path.exists(probe) and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        problems.append(
            f"output_dir={str(value)!r} cannot be created: {str(probe)!r} is a file, not a folder: point output_dir at "
            "a folder you can write to"
        )
        return
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == target else f": its nearest existing folder {str(probe)!r} does not allow this user to create files"
        problems.append(
            f"output_dir={str(value)!r} is not writable{where}: point output_dir elsewhere or fix the folder's "
            "permissions"
        )
        return
    # The shared output-folder rule (new, empty or the recipes' own folder; a user's entry where the run writes is
    # refused), an earlier run there, or an input where this run writes (kept out with overwrite too).
    problems.extend(
        checkpointing.check_output_dir(
            target,
            epochs=cfg.get("epochs") if isinstance(cfg.get("epochs"), int) and cfg.get("epochs") > 0 else 1,
            resume=cfg.get("resume_from_checkpoint", False) is True,
            overwrite=cfg.get("overwrite_output_dir", False) is True,
            inputs=checkpointing.config_input_paths(cfg),
            side=checkpointing.side_dirs(cfg),
        )
    )


def _check_resume(
    cfg: DictConfig, weighting: Optional[loss_weighting.LossWeighting], world_size: int, problems: list[str]
) -> None:
    """What a resume cannot change, read from the newest training state's recorded settings (memory-mapped, never
    unpickled into code) before any weights load: the loss-scaling method, and the global batch of a mid-epoch
    state. A state that cannot be read this way is left to the recipe, which names the file and the fix."""
    if cfg.get("resume_from_checkpoint", False) is not True or cfg.get("output_dir", None) is None:
        return
    peeked = checkpointing.peek_training_state(Path(str(cfg.output_dir)).expanduser())
    if peeked is None:
        return
    state, path = peeked
    if weighting is not None:
        problem = checkpointing.loss_scaling_problem(state, path, weighting.method)
        if problem:
            problems.append(problem)
    batch, accumulation = cfg.get("batch_size"), cfg.get("gradient_accumulation_steps")
    if isinstance(batch, int) and isinstance(accumulation, int) and batch > 0 and accumulation > 0:
        problem = checkpointing.global_batch_problem(
            state, path, batch_size=batch, gradient_accumulation_steps=accumulation, world_size=world_size
        )
        if problem:
            problems.append(problem)


def disable_null_components(cfg: DictConfig) -> DictConfig:
    """Turn an optional section whose ``_component_`` is null into ``None`` (in place), meaning "not used".

    ``tune run ... lr_scheduler=None`` does not remove the section: torchtune's command line maps ``key=value``
    onto ``key._component_`` when the YAML section has one (and it refuses ``~key`` for components). So a null
    component is how a user switches off an optional part on the command line.
    """
    for key in OPTIONAL_COMPONENTS:
        section = cfg.get(key, None)
        if isinstance(section, DictConfig) and "_component_" in section and section.get("_component_") is None:
            cfg[key] = None
    return cfg


# -------------------------------------------------------------------------------------------- tokenizer, data


def _check_seq_len(cfg: DictConfig, models: dict[str, Optional[nn.Module]], problems: list[str]) -> None:
    """Token sequences are cut at ``tokenizer.max_seq_len``; both models must accept that many positions."""
    tokenizer = cfg.get("tokenizer", None)
    if not isinstance(tokenizer, DictConfig):
        return
    length = tokenizer.get("max_seq_len", None)
    if length is None:
        for where, ds in _dataset_entries(cfg):
            if isinstance(ds, DictConfig) and ds.get("packed", False):
                problems.append(
                    f"{where}.packed=True needs tokenizer.max_seq_len (the length of each pack): set "
                    f"tokenizer.max_seq_len, e.g. 2048, or {where}.packed=False"
                )
        return
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        problems.append(f"tokenizer.max_seq_len={_show(length)} must be an integer >= 1 or null")
        return
    for key, model in models.items():
        limit = getattr(model, "max_seq_len", None)
        if isinstance(limit, int) and length > limit:
            problems.append(
                f"tokenizer.max_seq_len={length} is larger than {key}.max_seq_len={limit}: lower tokenizer.max_seq_len "
                f"or raise {key}.max_seq_len"
            )


def _describe_file(path: Path) -> tuple[str, str]:
    """(kind, description) of a file from its first bytes: what a tokenizer path actually points at."""
    if path.is_dir():
        return "folder", "a folder"
    size = path.stat().st_size
    if size == 0:
        return "empty", "an empty file"
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if len(head) > 8 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < size:
        return "safetensors", "a safetensors weights file"
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"["):
        return "json", "a JSON file"
    if re.match(rb"[A-Za-z0-9+/=]+ \d+\r?\n", head):
        return "tiktoken", "a tiktoken BPE file"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary", "a binary file"
    return "text", "a text file"


def _tokenizer_problem(tokenizer: DictConfig, err: Exception) -> str:
    """Turn a tokenizer builder's error into a line naming the key, what the file is and what the builder reads."""
    component = str(tokenizer.get("_component_"))
    path = tokenizer.get("path", None)
    try:
        kind, description = _describe_file(Path(str(path))) if path is not None else ("", "")
    except OSError:
        kind = description = ""
    if not description:
        return f"tokenizer: could not build {component!r}: {_short(err)}: check the tokenizer section"
    for name, expected_kind, expected in TOKENIZER_FILES:
        if name in component.lower():
            if kind != expected_kind:
                # The builder's own error adds nothing here (tiktoken quotes the file's first bytes back).
                return (
                    f"tokenizer.path={str(path)!r} is {description}, but {component} expects {expected}: point "
                    "tokenizer.path at it"
                )
            break
    files = [f"tokenizer.path={str(path)!r} ({description})"]
    for key in ("special_tokens_path", "merges_file"):
        value = tokenizer.get(key, None)
        if value is not None and Path(str(value)).exists():
            try:
                files.append(f"tokenizer.{key}={str(value)!r} ({_describe_file(Path(str(value)))[1]})")
            except OSError:
                files.append(f"tokenizer.{key}={str(value)!r}")
    return f"tokenizer: could not build {component!r}: {_short(err)}: check {' and '.join(files)}"


def _json_problem(path: Path) -> Optional[str]:
    """Where a JSON (or JSON Lines) data file stops parsing, or ``None`` when it parses.

    Only called after the dataset failed to build: ``datasets`` says just "An error occurred while generating the
    dataset".
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        return f"not UTF-8 text: byte {err.start}"
    except OSError:
        return None
    if not text.strip():
        return "it is empty"
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        whole = err
    else:
        # `datasets` reads `[]` as zero rows and says only 'Instruction "train" corresponds to no data!'.
        return "it is empty" if document == [] or document == {} else None
    if text.lstrip().startswith("["):
        return f"line {whole.lineno}, column {whole.colno}: {whole.msg}"
    # Not one JSON document: JSON Lines, one record per line.
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError as err:
            return f"line {number}, column {err.colno}: {err.msg}"
    return None


def _data_source(where: str, ds: DictConfig) -> str:
    """How the message names the data: its file(s), or the source."""
    files = _data_files(ds)
    if len(files) == 1:
        return f"{where}.data_files={files[0]!r}"
    if files:
        return f"{where}.data_files={files!r}"
    return f"{where}.source={ds.get('source', None)!r}"


def _column_problem(where: str, ds_cfg: DictConfig, dataset: Any, *, try_sample: bool) -> Optional[str]:
    """The columns the dataset's message transform reads that its data lacks, named with the columns present.

    Args:
        where (str): the dataset's config key.
        ds_cfg (DictConfig): its section.
        dataset (Any): the built, unpacked dataset (torchtune's ``SFTDataset``).
        try_sample (bool): also build sample 0 and catch the ``KeyError`` of a column the table does not know.
    """
    data = getattr(dataset, "_data", None)
    columns = list(getattr(data, "column_names", None) or [])
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
        except Exception as err:  # a sample the tokenizer cannot take: the data or the column settings
            return (
                f"{_data_source(where, ds_cfg)}: sample 0 cannot be tokenized by {ds_cfg.get('_component_')}: "
                f"{_short(err)}: check the data and the {where} section's column settings"
            )
    if not missing:
        return None
    component = str(ds_cfg.get("_component_"))
    fix = "rename them in the file"
    try:
        from torchtune.config._utils import _get_component_from_path

        parameters = inspect.signature(_get_component_from_path(component)).parameters
        if "column_map" in parameters:
            fix += f" or map them with {where}.column_map"
        elif "conversation_column" in parameters:
            fix += f" or set {where}.conversation_column"
    except Exception:
        pass
    return (
        f"{_data_source(where, ds_cfg)} lacks column(s) {missing} that {component} needs (columns present: "
        f"{sorted(columns)}): {fix}"
    )


def _dataset_problem(where: str, ds_cfg: DictConfig, tokenizer: Any, err: Exception) -> str:
    """Explain why a dataset failed to build: malformed JSON, a missing column (also when packing), or the error."""
    from torchtune import config as tt_config

    source = ds_cfg.get("source", None)
    for value in _data_files(ds_cfg):
        if _is_local(value) and Path(value).is_file() and (source == "json" or value.endswith((".json", ".jsonl"))):
            reason = _json_problem(Path(value))
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
            unpacked = tt_config.instantiate(OmegaConf.merge(ds_cfg, {"packed": False}), tokenizer)
            problem = _column_problem(where, ds_cfg, unpacked, try_sample=True)
            if problem is not None:
                return problem
        except Exception:
            pass
    return f"{where}: could not build {ds_cfg.get('_component_')!r}: {_short(err)}: check the {where} section"


def _build_data(cfg: DictConfig, problems: list[str]) -> Optional[tuple[Any, Any]]:
    """Build the tokenizer and the dataset(s) as the recipe would, naming what goes wrong.

    Returns:
        Optional[tuple[Any, Any]]: (tokenizer, dataset), or ``None`` when a problem was added.
    """
    from torchtune import config as tt_config
    from torchtune.datasets import ConcatDataset, PackedDataset

    try:
        tokenizer = tt_config.instantiate(cfg.tokenizer)
    except Exception as err:  # the builder's message rarely names the key or the file kind
        problems.append(_tokenizer_problem(cfg.tokenizer, err))
        return None
    built = []
    for where, ds_cfg in _dataset_entries(cfg):
        if not isinstance(ds_cfg, DictConfig):
            problems.append(f"{where}={_show(ds_cfg)} must be a mapping with a _component_, e.g. torchtune.datasets.alpaca_dataset")
            continue
        try:
            dataset = tt_config.instantiate(ds_cfg, tokenizer)
        except Exception as err:
            problems.append(_dataset_problem(where, ds_cfg, tokenizer, err))
            continue
        packed = isinstance(dataset, PackedDataset)
        # A packed dataset has read every sample already; an unpacked one is checked on its first sample.
        problem = _column_problem(where, ds_cfg, dataset.ds if packed else dataset, try_sample=not packed)
        if problem is not None:
            problems.append(problem)
            continue
        built.append(dataset)
    if len(built) != len(_dataset_entries(cfg)):
        return None
    if isinstance(cfg.dataset, ListConfig):
        try:
            dataset = ConcatDataset(datasets=built)
        except Exception as err:  # e.g. packed and unpacked datasets mixed
            problems.append(f"dataset: the datasets cannot be concatenated: {_short(err)}: pack all of them or none")
            return None
    else:
        dataset = built[0]
    return tokenizer, dataset


def _check_sample_count(cfg: DictConfig, dataset: Any, problems: list[str], world_size: int = 1) -> None:
    """The dataloader drops the last partial batch: fewer samples than one optimiser step means no step at all
    (with data parallelism each rank gets ``ceil(samples / world_size)``)."""
    batch_size, accumulation = cfg.get("batch_size", None), cfg.get("gradient_accumulation_steps", 1)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in (batch_size, accumulation)):
        return  # reported by the integer checks
    count = len(dataset)
    per_rank = -(-count // world_size)
    if per_rank < batch_size * accumulation:
        unit = "samples (packed)" if getattr(dataset, "packed", False) or type(dataset).__name__ == "PackedDataset" else "samples"
        where = f" on each of {world_size} ranks ({per_rank} of them per rank)" if world_size > 1 else ""
        problems.append(
            f"batch_size={batch_size} x gradient_accumulation_steps={accumulation} = {batch_size * accumulation} "
            f"samples per optimiser step{where}, but the dataset has {count} {unit} (the last partial batch is "
            "dropped, so an epoch has no step): lower batch_size or gradient_accumulation_steps, or use more data"
        )


FUSED_OUTPUT_KEYS = frozenset({"enabled", "chunk_size"})


def _check_fused_output(cfg: DictConfig, problems: list[str]) -> None:
    """``fused_output: {enabled, chunk_size}``: what the fused output + loss pass supports."""
    fused = cfg.get("fused_output", None)
    if fused is None:
        return
    if not isinstance(fused, DictConfig):
        problems.append(f"fused_output={_show(fused)} must be a mapping, e.g. fused_output: {{enabled: true, chunk_size: 1024}}")
        return
    for key in fused.keys():
        if key not in FUSED_OUTPUT_KEYS:
            close = difflib.get_close_matches(str(key), sorted(FUSED_OUTPUT_KEYS), n=1)
            fix = f"did you mean 'fused_output.{close[0]}'?" if close else f"the keys are {sorted(FUSED_OUTPUT_KEYS)}"
            problems.append(f"unknown key 'fused_output.{key}': {fix}")
    enabled = fused.get("enabled", False)
    if not isinstance(enabled, bool):
        problems.append(f"fused_output.enabled={enabled!r} must be true or false")
        return
    chunk = fused.get("chunk_size", 1024)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        problems.append(f"fused_output.chunk_size={chunk!r} must be an integer >= 1 (tokens per chunk, e.g. 1024)")
    if not enabled:
        return
    model = cfg.get("model", None)
    if isinstance(model, DictConfig) and model.get("apply_lora_to_output", False) is True:
        problems.append(
            "fused_output.enabled=true computes the student's logits from model.output's weight, which LoRA on the "
            "output layer would change: set model.apply_lora_to_output=false or fused_output.enabled=false"
        )
    kd = cfg.get("kd_loss", None)
    if isinstance(kd, DictConfig) and isinstance(kd.get("_component_", None), str):
        from torchtune.config._utils import _get_component_from_path

        try:
            kd_class = _get_component_from_path(kd._component_)
        except Exception:
            return  # reported where kd_loss is checked
        if not hasattr(kd_class, "_block_value_and_grad"):
            problems.append(
                f"fused_output.enabled=true needs a kd_losses divergence (it uses their hand-derived gradients), but "
                f"kd_loss._component_={kd._component_!r} is not one: use e.g. kd_losses.ForwardKLLoss, or "
                "fused_output.enabled=false"
            )


def _check_fsdp(cfg: DictConfig, world_size: Optional[int], problems: list[str], notices: list[str]) -> None:
    present = [key for key in FSDP_KEYS if cfg.get(key, None) is not None]
    if world_size is None:
        if present:
            notices.append(
                f"{', '.join(present)} only apply to recipes/knowledge_distillation_distributed.py; the single-device "
                "recipe ignores them"
            )
        return
    for key in ("fsdp_cpu_offload", "fsdp_reshard_after_forward"):
        value = cfg.get(key, None)
        if value is not None and not isinstance(value, bool):
            problems.append(f"{key}={value!r} must be true or false")
    layers = cfg.get("custom_sharded_layers", None)
    if layers is not None and (
        not isinstance(layers, (list, ListConfig)) or not all(isinstance(name, str) and name for name in layers)
    ):
        problems.append(
            f"custom_sharded_layers={_show(layers)} must be a list of module names, e.g. [tok_embeddings, output]"
        )


def _loss_settings(cfg: DictConfig) -> Optional[tuple[float, int]]:
    """``(kd_loss temperature, ignore_index)`` of the config's losses, or ``None`` when they cannot be built
    (reported where the losses are checked)."""
    from torchtune import config as tt_config

    try:
        kd, ce = tt_config.instantiate(cfg.kd_loss), tt_config.instantiate(cfg.loss)
    except Exception:
        return None
    return float(getattr(kd, "temperature", 1.0)), int(getattr(ce, "ignore_index", -100))


def _check_teacher_cache_section(
    cfg: DictConfig, facts: Optional[ModelFacts], problems: list[str], notices: list[str], *, writing: bool
) -> bool:
    """``teacher_cache: {path, top_k, dtype, samples_per_shard, batch_size, overwrite, verify, rehash_inputs}``; True
    when well formed. For the pre-pass (``writing``) the folder must be one it may write (the output-folder rule)."""
    section = cfg.get("teacher_cache", None)
    if section is None:
        return False
    found = teacher_cache.section_problems(section, facts.teacher_vocab if facts is not None else None)
    problems.extend(found)
    if found:
        return False
    if writing:
        from torchtune_kd import output_folder

        cache = teacher_cache.settings(section)
        problems.extend(output_folder.check(
            cache.path, owner=teacher_cache.OWNER, option="teacher_cache.path", overwrite=cache.overwrite,
            overwrite_hint="teacher_cache.overwrite=true",
        ))
    if facts is not None and facts.layer_pairs:
        message = (
            f"layer_mapping={_show(cfg.get('layer_mapping'))} needs the teacher's hidden states, which a teacher cache "
            "does not hold: set layer_mapping=null (and loss_scaling.manual_scales.ir=0), or remove teacher_cache to "
            "distil from the live teacher"
        )
        if writing:
            notices.append(message.replace("needs", "(IR) needs") + " when training from this cache")
        else:
            problems.append(message)
    kd = cfg.get("kd_loss", None)
    if not writing and isinstance(kd, DictConfig) and isinstance(kd.get("_component_", None), str):
        from torchtune.config._utils import _get_component_from_path

        try:
            kd_class = _get_component_from_path(kd._component_)
        except Exception:
            return True  # reported where kd_loss is checked
        if not hasattr(kd_class, "_block_value_and_grad"):
            problems.append(
                f"teacher_cache needs a kd_losses divergence (they take the cache's top-k form), but "
                f"kd_loss._component_={kd._component_!r} is not one: use e.g. kd_losses.ForwardKLLoss"
            )
    return True


def _check_cache_contents(cfg: DictConfig, facts: ModelFacts, dataset: Any, problems: list[str], notices: list[str]) -> None:
    """The cache is complete and made from this config's teacher, tokenizer, data, max_seq_len, k and temperature."""
    losses = _loss_settings(cfg)
    if losses is None:
        return
    temperature, ignore_index = losses
    found, found_notices = teacher_cache.check_cache(
        cfg, dataset, temperature=temperature, ignore_index=ignore_index, vocab_size=facts.teacher_vocab
    )
    problems.extend(found)
    notices.extend(found_notices)


# ------------------------------------------------------------------------------------------------- entry point


def _meta_model(cfg_model: DictConfig, key: str, problems: list[str]) -> Optional[nn.Module]:
    from torchtune import config as tt_config

    plain, _ = model_config_without_flag(cfg_model)
    try:
        with torch.device("meta"):
            return tt_config.instantiate(plain)
    except Exception as err:  # the builder's own message is the most useful thing to show
        problems.append(f"{key}: could not build {_component(cfg_model)!r}: {type(err).__name__}: {err}")
        return None


def validate_config(
    cfg: DictConfig,
    *,
    check_files: bool = True,
    check_device: bool = True,
    build_data: bool = False,
    world_size: Optional[int] = None,
    writing_cache: bool = False,
) -> ModelFacts | None:
    """Validate a distillation config before any heavy work.

    Args:
        cfg (DictConfig): the full recipe config (after CLI overrides).
        check_files (bool): check the files: checkpoint, tokenizer and data files exist, safetensors headers are
            complete, each checkpoint's ``config.json`` matches its model builder, ``output_dir`` can be written
            under the shared output-folder rule (``checkpointing.check_output_dir``) and, on resume, its newest
            training state was trained with this loss-scaling method and (mid-epoch) this global batch.
            Default True.
        check_device (bool): check that the requested device exists. Default True.
        build_data (bool): also build the tokenizer and the dataset(s) (a list becomes a ``ConcatDataset``, as in the
            recipe), check their files, columns and size, and return them on the facts for the recipe to reuse.
            Skipped when another problem concerns the ``tokenizer`` or ``dataset`` keys. Default False.
        world_size (Optional[int]): the number of data-parallel ranks for the distributed recipe (its FSDP keys
            are checked and the data must give every rank a step); ``None`` for the single-device recipe.
        writing_cache (bool): the config is for the teacher-cache pre-pass (``recipes/cache_teacher.py``):
            ``teacher_cache.path`` is required, the cache itself is not checked (it is being written) and
            ``output_dir`` is not (the pre-pass writes nothing there). Otherwise a ``teacher_cache`` section means
            training from the cache: it must be complete and made from this config's teacher, tokenizer, data,
            ``max_seq_len`` and temperature (checked with ``build_data``), and IR is refused (the cache holds no
            hidden states).

    Returns:
        ModelFacts | None: depths, sizes, the resolved layer pairs and notices for the user (and, with
        ``build_data``, the tokenizer, dataset and sample count); ``None`` only if the models could not be built
        (which is reported as an error).

    Raises:
        ConfigError: listing every problem found.

    Optional sections whose ``_component_`` is null (``lr_scheduler=None`` on the command line) are set to ``None``
    in ``cfg`` first (:func:`disable_null_components`).
    """
    disable_null_components(cfg)
    problems: list[str] = []
    notices: list[str] = []

    for key in cfg.keys():
        if key not in KNOWN_TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(str(key), sorted(KNOWN_TOP_LEVEL_KEYS), n=1)
            fix = f"did you mean {close[0]!r}?" if close else "remove it (see the README's config reference)"
            problems.append(f"unknown key {key!r}: {fix}")
    for key in REQUIRED_KEYS:
        if cfg.get(key, None) is None:
            problems.append(f"missing required key {key!r}")

    _check_int(cfg, "batch_size", problems, minimum=1)
    _check_int(cfg, "epochs", problems, minimum=1)
    _check_fsdp(cfg, world_size, problems, notices)
    _check_fused_output(cfg, problems)
    _check_int(cfg, "gradient_accumulation_steps", problems, minimum=1)
    _check_int(cfg, "log_every_n_steps", problems, minimum=1)
    _check_int(cfg, "max_steps_per_epoch", problems, minimum=1, optional=True)
    _check_int(cfg, "save_every_n_steps", problems, minimum=1, optional=True)
    _check_int(cfg, "keep_last_n", problems, minimum=1, optional=True)
    _check_int(cfg, "max_nonfinite_steps", problems, minimum=0, optional=True)
    for flag in ("resume_from_checkpoint", "overwrite_output_dir", "save_adapter_weights_only", "save_projections"):
        if not isinstance(cfg.get(flag, False), bool):
            problems.append(f"{flag}={cfg.get(flag)!r} must be true or false")

    dtype = cfg.get("dtype", None)
    if dtype is not None and dtype not in ("fp32", "bf16"):
        problems.append(f"dtype={dtype!r} is not supported: use 'bf16' (GPU) or 'fp32' (fp16 has no loss scaling here)")
    device = str(cfg.get("device", "cuda"))
    if check_device and device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"device={device!r} but no CUDA device is available: use device=cpu dtype=fp32 on CPU")
    if cfg.get("enable_activation_offloading", False) and not device.startswith("cuda"):
        problems.append("enable_activation_offloading=True needs a CUDA device: set it to False on CPU")

    clip = cfg.get("clip_grad_norm", None)
    if clip is not None and str(clip) != "inf":
        try:
            if float(clip) <= 0:
                raise ValueError
        except (TypeError, ValueError):
            problems.append(f"clip_grad_norm={clip!r} must be a positive number, 'inf' or null")

    multiplier = cfg.get("projection_lr_multiplier", 1.0)
    try:
        if not float(multiplier) > 0:
            raise ValueError
    except (TypeError, ValueError):
        problems.append(f"projection_lr_multiplier={multiplier!r} must be a positive number")

    scaling = cfg.get("loss_scaling", None)
    weighting: Optional[loss_weighting.LossWeighting] = None
    if scaling is not None and not isinstance(scaling, DictConfig):
        problems.append(f"loss_scaling={scaling!r} must be a mapping with keys {sorted(LOSS_SCALING_KEYS)}")
    else:
        for key in (scaling or {}).keys():
            if key not in LOSS_SCALING_KEYS:
                problems.append(f"unknown key 'loss_scaling.{key}': the keys are {sorted(LOSS_SCALING_KEYS)}")
        container = OmegaConf.to_container(scaling, resolve=True) if scaling is not None else None
        enabled = bool((container or {}).get("enabled", False))
        kd_ratio = _check_kd_ratio(cfg, not enabled, problems)
        try:
            weighting = loss_weighting.LossWeighting.from_config(container, kd_ratio)
        except ValueError as err:
            problems.append(str(err))
        if enabled and cfg.get("kd_ratio", None) is not None:
            notices.append(
                f"kd_ratio={_show(cfg.kd_ratio)} is ignored: loss_scaling.enabled=true weights the losses with "
                f"loss_scaling.method={(container or {}).get('method', 'manual')!r}; remove kd_ratio, or set "
                "loss_scaling.enabled=false to blend (1 - kd_ratio) * CE + kd_ratio * KD"
            )

    _check_losses(cfg, problems)
    _check_optimizer(cfg, problems)
    _check_profiler(cfg, problems)
    using_cache = cfg.get("teacher_cache", None) is not None and not writing_cache
    if writing_cache and cfg.get("teacher_cache", None) is None:
        problems.append(
            "teacher_cache.path is missing: the pre-pass needs a folder to write to, e.g. teacher_cache.path=cache/teacher_top64"
        )
    if check_files:
        _check_paths(cfg, problems, teacher_optional=using_cache)
        if not writing_cache:
            _check_output_dir(cfg, problems)
            if not _concerns(problems, ["output_dir"]):
                _check_resume(cfg, weighting, world_size or 1, problems)

    facts = None
    student = _meta_model(cfg.model, "model", problems) if isinstance(cfg.get("model"), DictConfig) else None
    teacher = (
        _meta_model(cfg.teacher_model, "teacher_model", problems)
        if isinstance(cfg.get("teacher_model"), DictConfig)
        else None
    )
    _check_seq_len(cfg, {"model": student, "teacher_model": teacher}, problems)
    if check_files:
        for key, model_key, model in (("checkpointer", "model", student), ("teacher_checkpointer", "teacher_model", teacher)):
            if model is not None:
                _check_checkpoint_config(key, model_key, cfg.get(key), model, problems)
    if student is not None and teacher is not None:
        from torchtune.modules.peft import get_adapter_params

        try:
            facts = ModelFacts(
                student_depth=len(alignment.decoder_layers(student)),
                teacher_depth=len(alignment.decoder_layers(teacher)),
                student_dim=alignment.model_embed_dim(student),
                teacher_dim=alignment.model_embed_dim(teacher),
                student_vocab=alignment.model_vocab_size(student),
                teacher_vocab=alignment.model_vocab_size(teacher),
                student_is_lora=bool(get_adapter_params(student)),
                student_max_seq_len=getattr(student, "max_seq_len", None),
                teacher_max_seq_len=getattr(teacher, "max_seq_len", None),
                notices=notices,
            )
        except ValueError as err:
            problems.append(str(err))
        if facts is not None:
            _check_models(cfg, facts, weighting, problems)
    del student, teacher

    cache_ok = _check_teacher_cache_section(cfg, facts, problems, notices, writing=writing_cache)
    if build_data and not _concerns(problems, DATA_KEYS):
        data = _build_data(cfg, problems)
        if data is not None:
            _check_sample_count(cfg, data[1], problems, world_size or 1)
            if facts is not None:
                facts.tokenizer, facts.dataset = data
                facts.num_samples = len(data[1])
            if using_cache and cache_ok and facts is not None:
                _check_cache_contents(cfg, facts, data[1], problems, notices)

    if problems:
        raise ConfigError(problems)
    return facts


def _check_models(
    cfg: DictConfig, facts: ModelFacts, weighting: Optional[loss_weighting.LossWeighting], problems: list[str]
) -> None:
    if facts.student_vocab != facts.teacher_vocab:
        problems.append(
            f"vocabulary sizes differ: model has {facts.student_vocab} tokens, teacher_model has "
            f"{facts.teacher_vocab}; logit distillation compares distributions over one shared vocabulary, so "
            "use a teacher and student with the same tokenizer"
        )
    raw_mapping = cfg.get("layer_mapping", None)
    mapping = OmegaConf.to_container(raw_mapping, resolve=True) if isinstance(raw_mapping, ListConfig) else raw_mapping
    try:
        facts.layer_pairs = alignment.resolve_layer_mapping(mapping, facts.student_depth, facts.teacher_depth)
    except ValueError as err:
        problems.append(str(err))
        return
    flags = {key: bool(cfg[key].get(HIDDEN_STATES_FLAG, False)) for key in ("model", "teacher_model")}
    for key, value in flags.items():
        raw = cfg[key].get(HIDDEN_STATES_FLAG, False)
        if not isinstance(raw, bool):
            problems.append(f"{key}.{HIDDEN_STATES_FLAG}={raw!r} must be true or false (the layers come from layer_mapping)")
    if facts.layer_pairs:
        if cfg.get("ir_loss", None) is None:
            problems.append(
                f"ir_loss is missing (ir_loss=None) but layer_mapping={_show(mapping)} needs it: add ir_loss: "
                "{_component_: kd_losses.CosineIRLoss} or set layer_mapping=null"
            )
        missing = [key for key, value in flags.items() if not value]
        if missing:
            facts.notices.append(
                f"layer_mapping is set, so hidden states are captured although {', '.join(missing)}."
                f"{HIDDEN_STATES_FLAG} is not true"
            )
        if weighting is not None and weighting.method == "blend":
            facts.notices.append(
                "loss_scaling is disabled (kd_ratio blend): the IR loss is computed and logged but NOT optimised and "
                "the projections are not trained; set loss_scaling.enabled=true to train with it"
            )
    else:
        if cfg.get("ir_loss", None) is not None:
            facts.notices.append(
                f"ir_loss is set but layer_mapping is empty ({_show(raw_mapping)}), so no IR loss is computed: set "
                "layer_mapping (a list of [student, teacher] pairs, or 'auto') to use it, or remove ir_loss"
            )
        flagged = [key for key, value in flags.items() if value]
        if flagged:
            problems.append(
                f"{', '.join(f'{k}.{HIDDEN_STATES_FLAG}' for k in flagged)} is true but layer_mapping is empty: set "
                "layer_mapping (a list of [student, teacher] pairs, or 'auto') or remove the flag"
            )
        if weighting is not None and weighting.method != "blend" and weighting.scales["ir"] > 0:
            problems.append(
                f"loss_scaling.manual_scales.ir={weighting.scales['ir']} but layer_mapping is empty, so there is no IR "
                "loss: set layer_mapping or loss_scaling.manual_scales.ir=0"
            )
