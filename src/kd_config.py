"""Config pre-flight for the distillation recipes: validate the whole config once, up front.

:func:`validate_config` runs before any weights load. It reports every problem together in one
:class:`ConfigError` (a ``ValueError``), each naming the key, the value and the fix: unknown keys, bad numbers,
missing files, inconsistent loss/chunk settings, bad layer mappings and scales, and a student/teacher vocabulary
mismatch. Models are instantiated on the ``meta`` device to read their depths and sizes, so a real Llama 3.2
1B/3B pair costs no memory.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

import kd_alignment
import kd_scaling

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
    }
)
REQUIRED_KEYS = (
    "output_dir", "model", "teacher_model", "tokenizer", "checkpointer", "teacher_checkpointer", "dataset",
    "optimizer", "loss", "kd_loss", "epochs", "batch_size", "device", "dtype", "metric_logger",
)
LOSS_SCALING_KEYS = frozenset({"enabled", "method", "manual_scales", "dynamic"})
CE_LOSSES = ("torchtune.modules.loss.CEWithChunkedOutputLoss", "torch.nn.CrossEntropyLoss")
HIDDEN_STATES_FLAG = "output_hidden_states"


class ConfigError(ValueError):
    """All problems found in a config, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__(
            f"{len(self.problems)} problem(s) in the config:\n  - " + "\n  - ".join(self.problems)
        )


@dataclass
class ModelFacts:
    """What pre-flight learned about the two models (read from ``meta``-device instances)."""

    student_depth: int
    teacher_depth: int
    student_dim: int
    teacher_dim: int
    student_vocab: int
    teacher_vocab: int
    student_is_lora: bool
    layer_pairs: list[tuple[int, int]] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


def model_config_without_flag(cfg_model: DictConfig) -> tuple[DictConfig, bool]:
    """Split our per-model ``output_hidden_states: true`` flag from the builder's kwargs.

    torchtune's builders do not know the flag (they would reject it), so the recipe consumes it here.
    """
    plain = OmegaConf.masked_copy(cfg_model, [k for k in cfg_model.keys() if k != HIDDEN_STATES_FLAG])
    flag = cfg_model.get(HIDDEN_STATES_FLAG, False)
    return plain, flag


def _component(cfg: Any) -> Optional[str]:
    return cfg.get("_component_") if isinstance(cfg, DictConfig) else None


def _check_int(cfg: DictConfig, key: str, problems: list[str], *, minimum: int, optional: bool = False) -> None:
    value = cfg.get(key, None)
    if value is None:
        if not optional and key in cfg:
            problems.append(f"{key}=None must be an integer >= {minimum}")
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        problems.append(f"{key}={value!r} must be an integer >= {minimum}")


def _check_paths(cfg: DictConfig, problems: list[str]) -> None:
    for key in ("checkpointer", "teacher_checkpointer"):
        ckpt = cfg.get(key)
        if not isinstance(ckpt, DictConfig):
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
        files = ckpt.get("checkpoint_files", [])
        names = list(files.values()) if isinstance(files, DictConfig) else list(files or [])
        if isinstance(files, DictConfig):  # {filename_format, max_filename}: torchtune expands it itself
            names = []
        for name in names:
            if not (directory / str(name)).is_file():
                problems.append(f"{key}.checkpoint_files: {str(name)!r} is not in {str(directory)!r}")
    tokenizer = cfg.get("tokenizer")
    if isinstance(tokenizer, DictConfig):
        for key in ("path", "special_tokens_path", "merges_file"):
            value = tokenizer.get(key)
            if value is not None and not Path(str(value)).exists():
                problems.append(f"tokenizer.{key}={str(value)!r} does not exist")
    datasets = cfg.get("dataset")
    for index, ds in enumerate(datasets if isinstance(datasets, ListConfig) else [datasets]):
        if not isinstance(ds, DictConfig):
            continue
        data_files = ds.get("data_files")
        if data_files is None:
            continue
        if isinstance(data_files, DictConfig):
            values = list(data_files.values())
        elif isinstance(data_files, ListConfig):
            values = list(data_files)
        else:
            values = [data_files]
        for value in values:
            if "://" not in str(value) and not any(ch in str(value) for ch in "*?[") and not Path(str(value)).exists():
                where = "dataset" if not isinstance(datasets, ListConfig) else f"dataset[{index}]"
                problems.append(f"{where}.data_files={str(value)!r} does not exist")


def _check_losses(cfg: DictConfig, problems: list[str]) -> None:
    loss, kd_loss = cfg.get("loss"), cfg.get("kd_loss")
    ce_name, kd_name = _component(loss), _component(kd_loss)
    if ce_name is not None and ce_name not in CE_LOSSES:
        problems.append(f"loss._component_={ce_name!r} is not supported: use one of {list(CE_LOSSES)}")
    if kd_name is not None and not kd_name.startswith("kd_losses."):
        hint = ""
        if kd_name.startswith("torchtune.modules.loss."):
            hint = (
                " (torchtune's KD losses return the soft cross-entropy, not a KL; the kd_losses class of the same "
                "name is the exact divergence)"
            )
        problems.append(f"kd_loss._component_={kd_name!r}: use a kd_losses class, e.g. kd_losses.ForwardKLWithChunkedOutputLoss{hint}")
        return
    if ce_name is None or kd_name is None:
        return
    ce_chunked = ce_name.endswith("CEWithChunkedOutputLoss")
    kd_chunked = kd_name.endswith("WithChunkedOutputLoss")
    if ce_chunked != kd_chunked:
        problems.append(
            f"loss ({ce_name}) and kd_loss ({kd_name}) must both be chunked or both unchunked: the model produces "
            "one kind of output for both"
        )
    elif ce_chunked:
        ce_chunks = loss.get("num_output_chunks", 8)
        kd_chunks = kd_loss.get("num_output_chunks", 8)
        if ce_chunks != kd_chunks:
            problems.append(
                f"loss.num_output_chunks={ce_chunks} differs from kd_loss.num_output_chunks={kd_chunks}: set both to "
                "the same value"
            )


def _meta_model(cfg_model: DictConfig, key: str, problems: list[str]) -> Optional[nn.Module]:
    from torchtune import config as tt_config

    plain, _ = model_config_without_flag(cfg_model)
    try:
        with torch.device("meta"):
            return tt_config.instantiate(plain)
    except Exception as err:  # the builder's own message is the most useful thing to show
        problems.append(f"{key}: could not build {_component(cfg_model)!r}: {type(err).__name__}: {err}")
        return None


def validate_config(cfg: DictConfig, *, check_files: bool = True, check_device: bool = True) -> ModelFacts | None:
    """Validate a distillation config before any heavy work.

    Args:
        cfg (DictConfig): the full recipe config (after CLI overrides).
        check_files (bool): check that checkpoint, tokenizer and data files exist. Default True.
        check_device (bool): check that the requested device exists. Default True.

    Returns:
        ModelFacts | None: depths, sizes, the resolved layer pairs and notices for the user; ``None`` only if the
        models could not be built (which is reported as an error).

    Raises:
        ConfigError: listing every problem found.
    """
    problems: list[str] = []

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
    _check_int(cfg, "gradient_accumulation_steps", problems, minimum=1)
    _check_int(cfg, "log_every_n_steps", problems, minimum=1)
    _check_int(cfg, "max_steps_per_epoch", problems, minimum=1, optional=True)

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
    weighting: Optional[kd_scaling.LossWeighting] = None
    if scaling is not None and not isinstance(scaling, DictConfig):
        problems.append(f"loss_scaling={scaling!r} must be a mapping with keys {sorted(LOSS_SCALING_KEYS)}")
    else:
        for key in (scaling or {}).keys():
            if key not in LOSS_SCALING_KEYS:
                problems.append(f"unknown key 'loss_scaling.{key}': the keys are {sorted(LOSS_SCALING_KEYS)}")
        try:
            container = OmegaConf.to_container(scaling, resolve=True) if scaling is not None else None
            weighting = kd_scaling.LossWeighting.from_config(container, cfg.get("kd_ratio", 0.5))
        except ValueError as err:
            problems.append(str(err))

    _check_losses(cfg, problems)
    if check_files:
        _check_paths(cfg, problems)

    facts = None
    student = _meta_model(cfg.model, "model", problems) if isinstance(cfg.get("model"), DictConfig) else None
    teacher = (
        _meta_model(cfg.teacher_model, "teacher_model", problems)
        if isinstance(cfg.get("teacher_model"), DictConfig)
        else None
    )
    if student is not None and teacher is not None:
        from torchtune.modules.peft import get_adapter_params

        try:
            facts = ModelFacts(
                student_depth=len(kd_alignment.decoder_layers(student)),
                teacher_depth=len(kd_alignment.decoder_layers(teacher)),
                student_dim=kd_alignment.model_embed_dim(student),
                teacher_dim=kd_alignment.model_embed_dim(teacher),
                student_vocab=kd_alignment.model_vocab_size(student),
                teacher_vocab=kd_alignment.model_vocab_size(teacher),
                student_is_lora=bool(get_adapter_params(student)),
            )
        except ValueError as err:
            problems.append(str(err))
        if facts is not None:
            _check_models(cfg, facts, weighting, problems)
    del student, teacher

    if problems:
        raise ConfigError(problems)
    return facts


def _check_models(
    cfg: DictConfig, facts: ModelFacts, weighting: Optional[kd_scaling.LossWeighting], problems: list[str]
) -> None:
    if facts.student_vocab != facts.teacher_vocab:
        problems.append(
            f"vocabulary sizes differ: model has {facts.student_vocab} tokens, teacher_model has "
            f"{facts.teacher_vocab}; logit distillation compares distributions over one shared vocabulary, so "
            "use a teacher and student with the same tokenizer"
        )
    mapping = cfg.get("layer_mapping", None)
    if isinstance(mapping, ListConfig):
        mapping = OmegaConf.to_container(mapping, resolve=True)
    try:
        facts.layer_pairs = kd_alignment.resolve_layer_mapping(mapping, facts.student_depth, facts.teacher_depth)
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
            problems.append("layer_mapping is set but ir_loss is missing: add ir_loss: {_component_: kd_losses.CosineIRLoss}")
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
