"""The student's weights in and out: the checkpointer's file names, detached copies, the NaN/inf guard, and the
exports a finished epoch writes (``epoch_{N}/`` as a clean Hugging Face model, ``adapters/epoch_{N}/`` in PEFT format,
``projections/epoch_{N}/projections.pt``), each written atomically (:mod:`torchtune_kd.core.checkpointing.atomic`).
Non-finite weights are never written.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from torchtune_kd.core.checkpointing.atomic import atomic_torch_save, replace_dir, stage_dir
from torchtune_kd.errors import CheckpointError


def checkpoint_file_names(key: str, files: Any, problems: list[str]) -> list[str]:
    """The checkpoint file names of ``<key>.checkpoint_files``, torchtune's ``{filename_format, max_filename}`` form
    expanded; a malformed mapping is appended to ``problems`` (naming the key) and gives no names."""
    if isinstance(files, DictConfig):
        from torchtune.training.checkpointing._utils import FormattedCheckpointFiles

        plain = OmegaConf.to_container(files, resolve=True)
        try:
            return list(FormattedCheckpointFiles.from_dict(plain).build_checkpoint_filenames())
        except (KeyError, TypeError, ValueError) as err:  # torchtune's own message says which field is wrong
            problems.append(
                f"{key}.checkpoint_files={plain!r} is not a valid {{filename_format, max_filename}} mapping: "
                f"{str(err)[:200]}"
            )
            return []
    return [str(name) for name in (files or [])]


def cpu_copy(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies: never views of the live model (on CPU ``t.cpu()`` is ``t`` itself, and torchtune's
    ``get_merged_lora_ckpt`` adds adapters into the base weights in place)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


def non_finite_tensors(state_dict: Mapping[str, torch.Tensor]) -> list[tuple[str, int]]:
    """``(name, count)`` of the floating-point tensors holding NaN or inf."""
    bad = []
    for name, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point():
            count = int((~torch.isfinite(value)).sum())
            if count:
                bad.append((name, count))
    return bad


def require_finite(state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    bad = non_finite_tensors(state_dict)
    if bad:
        listed = ", ".join(f"{name} ({count})" for name, count in bad[:5])
        raise CheckpointError(
            f"refusing to save {what}: {len(bad)} tensor(s) hold NaN/inf values, e.g. {listed}. The run diverged; "
            "resume from the last good checkpoint with a lower learning rate."
        )


def export_hf(
    checkpointer: Any,
    state_dict: Mapping[str, torch.Tensor],
    output_dir: Path,
    epoch: int,
    model_key: str = "model",
) -> Path:
    """Write ``output_dir/epoch_{N}`` as a clean Hugging Face model folder through torchtune's checkpointer.

    The checkpointer writes ``<its output dir>/epoch_{N}``: pointing it at a staging folder makes the export
    atomic. It also copies every non-weight file of the source folder; adapter files there would make transformers
    (with peft) apply an adapter on top of merged weights, so they never go into an export.
    """
    final_dir = Path(output_dir) / f"epoch_{epoch}"
    staging = stage_dir(final_dir)
    original_output_dir = checkpointer._output_dir
    checkpointer._output_dir = staging
    try:
        checkpointer.save_checkpoint({model_key: dict(state_dict)}, epoch=epoch, intermediate_checkpoint=False)
    finally:
        checkpointer._output_dir = original_output_dir
    staged = staging / f"epoch_{epoch}"
    for leftover in list(staged.glob("adapter_*")):
        leftover.unlink()
    replace_dir(staged, final_dir)
    shutil.rmtree(staging, ignore_errors=True)
    return final_dir


def save_peft_adapter(
    adapter_state: Mapping[str, torch.Tensor],
    final_dir: Path,
    *,
    hf_config: Mapping[str, Any],
    rank: int,
    alpha: float,
    target_modules: list[str],
    base_model: Optional[str],
) -> Path:
    """The LoRA adapter in PEFT format (+ torchtune's ``.pt``) in its own folder, never beside merged weights."""
    from safetensors.torch import save_file
    from torchtune.models import convert_weights

    adapter_config = convert_weights.tune_to_peft_adapter_config(
        adapter_config={"r": rank, "lora_alpha": alpha, "target_modules": target_modules, "peft_type": "LORA"},
        base_model_name_or_path=base_model,
    )
    peft_weights = convert_weights.tune_to_peft_adapter_weights(
        dict(adapter_state),
        num_heads=hf_config["num_attention_heads"],
        num_kv_heads=hf_config["num_key_value_heads"],
        dim=hf_config["hidden_size"],
        head_dim=hf_config.get("head_dim", None),
    )
    staged = stage_dir(Path(final_dir))
    torch.save(dict(adapter_state), staged / "adapter_model.pt")
    save_file({k: v.contiguous() for k, v in peft_weights.items()}, staged / "adapter_model.safetensors", metadata={"format": "pt"})
    (staged / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    replace_dir(staged, Path(final_dir))
    return Path(final_dir)


def save_projections(pairs: list, state_dict: Mapping[str, torch.Tensor], final_file: Path) -> Path:
    """The learned projections (``state_dict``) with the layer pairs they map, written atomically to ``final_file``."""
    atomic_torch_save({"pairs": [list(p) for p in pairs], "state_dict": dict(state_dict)}, final_file)
    return final_file


@dataclass
class LoraSpec:
    """What exporting a LoRA student needs: its rank/alpha (to merge) and where the adapters sit (PEFT config)."""

    rank: int
    alpha: float
    attn_modules: list[str]
    apply_to_mlp: bool
    apply_to_output: bool


def save_student(
    checkpointer: Any,
    model_state: Mapping[str, torch.Tensor],
    output_dir: Path,
    epoch: int,
    *,
    lora: Optional[LoraSpec],
    adapter_weights_only: bool = False,
) -> None:
    """The epoch's student exports: ``epoch_{N}/`` (merged when LoRA) and, for LoRA, ``adapters/epoch_{N}/``.

    ``model_state`` must be a copy (:func:`cpu_copy`): merging adds the adapters into its base weights in place.
    """
    from torchtune import training
    from torchtune.modules.peft import get_adapter_state_dict, get_lora_module_names, get_merged_lora_ckpt

    if lora is None:
        export_hf(checkpointer, model_state, output_dir, epoch, training.MODEL_KEY)
        return
    adapter_state = get_adapter_state_dict(dict(model_state))
    if not adapter_weights_only:
        merged = get_merged_lora_ckpt(dict(model_state), rank=lora.rank, alpha=lora.alpha)
        export_hf(checkpointer, merged, output_dir, epoch, training.MODEL_KEY)
    save_peft_adapter(
        adapter_state,
        Path(output_dir) / "adapters" / f"epoch_{epoch}",
        hf_config=checkpointer._config,
        rank=lora.rank,
        alpha=lora.alpha,
        target_modules=get_lora_module_names(lora.attn_modules, lora.apply_to_mlp, lora.apply_to_output),
        base_model=getattr(checkpointer, "repo_id", None),
    )
