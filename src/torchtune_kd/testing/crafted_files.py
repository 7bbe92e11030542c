"""Crafted files for the evaluation tests: a model folder whose weights went NaN/inf (as a diverged run exports) and
a training log written through torchtune's own ``DiskLogger``."""

from __future__ import annotations

import math
from pathlib import Path

# A tensor every stand-in model folder has.
NAN_TENSOR = "model.layers.1.mlp.up_proj.weight"


def poison(folder: Path, file_name: str = "model.safetensors", tensor: str = NAN_TENSOR, value: float = math.nan,
           count: int = 3) -> None:
    """Overwrite ``count`` entries of one tensor of a safetensors file with ``value`` (what a diverged run exports)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = folder / file_name
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    tensors[tensor].view(-1)[:count] = value
    save_file(tensors, path, metadata=metadata)


def write_disk_log(path: Path, steps: range, with_ir: bool, offset: float = 0.0) -> dict:
    """Write a log through torchtune's own DiskLogger; return what was logged."""
    import torch
    from torchtune.training.metric_logging import DiskLogger

    logged: dict[str, list] = {}
    logger = DiskLogger(log_dir=str(path.parent), filename=path.name)
    for step in steps:
        payload = {
            "loss": 3.0 / step + offset, "ce_loss": 2.5 / step, "kd_loss": 0.1 * step, "grad_norm": 1.0 + step / 7,
            "lr": 3e-4, "weight/ce": 0.5, "weight/kd": 0.3,
        }
        if with_ir:
            payload.update({"ir_loss": 1.0 / (step + 1), "ir_loss/0-1": 0.9 / step, "weight/ir": 0.2})
        logger.log_dict(payload, step=step)
        for name, value in payload.items():
            logged.setdefault(name, []).append((step, float(value)))
    logger.log("kd/top1_agreement", torch.tensor(0.25), step=steps[-1])  # single-metric line, tensor value
    logged["kd/top1_agreement"] = [(steps[-1], 0.25)]
    logger.close()
    return logged
