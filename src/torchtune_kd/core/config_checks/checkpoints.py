"""``checkpointer`` and ``teacher_checkpointer``: the folders and files exist, safetensors are whole, and each
folder's ``config.json`` describes the model its builder makes (else loading fails late, after minutes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn

from torchtune_kd.core import checkpointing
from torchtune_kd.core.config_checks.common import Findings, component, short
from torchtune_kd.core.config_checks.files import safetensors_problem
from torchtune_kd.core.config_checks.models import HF_TO_BUILDER, MetaModels, builder_sizes

# Checkpointer key -> the model section whose weights it loads.
CHECKPOINTERS = (("checkpointer", "model"), ("teacher_checkpointer", "teacher_model"))


def _file_problems(key: str, ckpt: DictConfig, problems: list[str], *, optional: bool) -> None:
    """One checkpointer's folder and files (``optional``: a missing file is not a problem)."""
    directory = Path(str(ckpt.get("checkpoint_dir", "")))
    if not directory.is_dir():
        problems.append(
            f"{key}.checkpoint_dir={str(directory)!r} does not exist: download the model there (see the "
            "config's header) or point the key at it"
        )
        return
    name = component(ckpt)
    if name and name.endswith("FullModelHFCheckpointer") and not (directory / "config.json").is_file():
        problems.append(f"{key}.checkpoint_dir={str(directory)!r} has no config.json: not a Hugging Face model folder")
    for name in checkpointing.checkpoint_file_names(key, ckpt.get("checkpoint_files", []), problems):
        path = directory / name
        if not path.is_file():
            if not optional:
                problems.append(f"{key}.checkpoint_files: {name!r} is not in {str(directory)!r}")
            continue
        if name.endswith(".safetensors"):
            try:
                reason = safetensors_problem(path)
            except OSError as err:  # e.g. no read permission: the checkpointer would fail the same way
                reason = f"it cannot be read ({short(err)})"
            if reason is not None:
                problems.append(
                    f"{key}.checkpoint_files: {str(path)!r} is truncated or corrupt: {reason}: download or copy it "
                    "again"
                )


def check_files(cfg: DictConfig, *, teacher_optional: bool = False) -> Findings:
    """The checkpoint folders and files exist and look whole.

    Args:
        cfg (DictConfig): the config.
        teacher_optional (bool): a run from a teacher cache never loads the teacher, so its files are checked only
            where they exist (the cache check then verifies them).
    """
    found = Findings()
    for key, _ in CHECKPOINTERS:
        ckpt = cfg.get(key)
        if not isinstance(ckpt, DictConfig):
            continue
        optional = key == "teacher_checkpointer" and teacher_optional
        if optional and not Path(str(ckpt.get("checkpoint_dir", ""))).is_dir():
            continue
        _file_problems(key, ckpt, found.problems, optional=optional)
    return found


def _config_problem(key: str, model_key: str, ckpt: Any, model: nn.Module) -> list[str]:
    """The checkpoint folder's ``config.json`` describes the model the builder makes."""
    if not isinstance(ckpt, DictConfig):
        return []
    directory = Path(str(ckpt.get("checkpoint_dir", "")))
    path = directory / "config.json"
    if not path.is_file():
        return []
    try:
        hf = json.loads(path.read_text())
        if not isinstance(hf, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        return [
            f"{key}.checkpoint_dir={str(directory)!r}: config.json is not valid JSON ({short(err)}): download or copy "
            "the model again"
        ]
    # Hugging Face leaves num_key_value_heads out when it equals num_attention_heads.
    hf.setdefault("num_key_value_heads", hf.get("num_attention_heads"))
    built = builder_sizes(model)
    wrong = [
        (hf_key, hf[hf_key], builder_key, built[builder_key])
        for hf_key, builder_key in HF_TO_BUILDER
        if isinstance(hf.get(hf_key), int) and builder_key in built and hf[hf_key] != built[builder_key]
    ]
    if not wrong:
        return []
    return [
        f"{key}.checkpoint_dir={str(directory)!r} does not match {model_key}: its config.json has "
        f"{', '.join(f'{h}={v}' for h, v, _, _ in wrong)} but {model_key} builds "
        f"{', '.join(f'{b}={v}' for _, _, b, v in wrong)}: point {key}.checkpoint_dir at the matching model or fix "
        f"{', '.join(f'{model_key}.{b}' for _, _, b, _ in wrong)}"
    ]


def check_configs(cfg: DictConfig, models: MetaModels) -> Findings:
    """Each checkpoint folder's ``config.json`` matches the meta-device model of its section (where both exist)."""
    found = Findings()
    built = models.by_key()
    for key, model_key in CHECKPOINTERS:
        if built[model_key] is not None:
            found.problems.extend(_config_problem(key, model_key, cfg.get(key), built[model_key]))
    return found
