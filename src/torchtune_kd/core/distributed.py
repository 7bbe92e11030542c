"""What the training core needs under data parallelism: collectives, FSDP2 sharding and full state dicts.

Everything here runs on every rank of an initialised process group (gloo on CPU, NCCL on GPU) and is a collective
unless its docstring says otherwise: every rank must call it, in the same order. The full (unsharded) state dicts it
produces and consumes have exactly the layout of the single-device recipe's, so a training state written by either
recipe resumes in the other.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks (a new tensor; the argument is left as it is)."""
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def max_over_ranks(value: Optional[int], device: torch.device) -> Optional[int]:
    """The largest non-``None`` ``value`` over ranks, or ``None`` when every rank has ``None`` (e.g. a signal number)."""
    tensor = torch.tensor([-1 if value is None else int(value)], device=device, dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    result = int(tensor.item())
    return None if result < 0 else result


def all_gather_floats(value: float, device: torch.device) -> list[float]:
    """``value`` from every rank, in rank order."""
    mine = torch.tensor([float(value)], device=device, dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [float(v.item()) for v in every]


def gather_errors(message: Any) -> dict[int, Any]:
    """Every rank's error (``None`` where a rank had none, e.g. a list of problems), so that all ranks stop together.

    Returns:
        dict[int, Any]: rank -> error, for the ranks that failed (the same on every rank).
    """
    messages: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    return {rank: text for rank, text in enumerate(messages) if text is not None}


def full_tensor(value: Any) -> Any:
    """A DTensor gathered to a plain tensor (a collective); anything else as it is."""
    return value.full_tensor() if isinstance(value, DTensor) else value


class _AverageGradient(torch.autograd.Function):
    """Identity forward; backward averages the gradient over ranks (what FSDP does with every other gradient)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.div_(dist.get_world_size())


def gathered_for_compute(value: torch.Tensor) -> torch.Tensor:
    """A whole tensor from a (possibly) sharded parameter, for computing outside its module's forward.

    A DTensor is all-gathered (``full_tensor``). Its backward only slices each rank's own gradient onto its shard (a
    gathered tensor is taken to be the same everywhere), so the gradient is first averaged over ranks, as FSDP
    averages every other gradient. A plain tensor (e.g. a parameter FSDP left unsharded after the forward, whose
    gradient FSDP reduces itself) is returned as it is.
    """
    if not isinstance(value, DTensor):
        return value
    if not value.requires_grad:
        return value.full_tensor()
    return _AverageGradient.apply(value.full_tensor())


def full_state_dict(
    module: nn.Module, *, keep: Callable[[str], bool] = lambda name: True, to_cpu_on: bool = True
) -> dict[str, torch.Tensor]:
    """The unsharded state dict of a (partly) FSDP-sharded module as CPU copies.

    Sharded entries are all-gathered one at a time (so a rank never holds more than one full tensor beyond its
    shards); only the entries ``keep`` selects are gathered.

    Args:
        module (nn.Module): the module (its parameters may be DTensors).
        keep (Callable[[str], bool]): which state-dict keys to gather.
        to_cpu_on (bool): whether this rank keeps the result (normally rank 0); the others return ``{}``.

    Returns:
        dict[str, torch.Tensor]: detached CPU copies, never views of the live module.
    """
    result: dict[str, torch.Tensor] = {}
    for name, value in module.state_dict().items():
        if not keep(name):
            continue
        value = full_tensor(value)
        if to_cpu_on:
            result[name] = value.detach().to("cpu", copy=True)
    return result


def _parameters_in_optimizer_order(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state_dict(optimizer: torch.optim.Optimizer, *, to_cpu_on: bool = True) -> dict[str, Any]:
    """The optimiser's ``state_dict()`` with every sharded state tensor gathered: the single-device layout.

    Parameters keep the optimiser's integer ids (param-group order), exactly as ``optimizer.state_dict()`` of the
    single-device recipe lists them, so the result loads into either recipe.
    """
    state_dict = optimizer.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for param_id in sorted(state_dict["state"]):
        entry = {}
        for key, value in state_dict["state"][param_id].items():
            value = full_tensor(value)
            entry[key] = value.detach().to("cpu", copy=True) if torch.is_tensor(value) else value
        state[param_id] = entry
    if not to_cpu_on:
        return {}
    return {"state": state, "param_groups": state_dict["param_groups"]}


def load_full_optimizer_state_dict(optimizer: torch.optim.Optimizer, full: Mapping[str, Any]) -> None:
    """Load a single-device-layout optimiser state into an optimiser over (possibly) sharded parameters.

    Each state tensor shaped like its parameter is sharded like it (``distribute_tensor`` onto the parameter's mesh
    and placements); scalars such as ``step`` are loaded as they are.
    """
    params = _parameters_in_optimizer_order(optimizer)
    state: dict[int, dict[str, Any]] = {}
    for param_id, entry in full["state"].items():
        param = params[int(param_id)]
        converted = {}
        for key, value in entry.items():
            if isinstance(param, DTensor) and torch.is_tensor(value) and tuple(value.shape) == tuple(param.shape):
                value = distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh, param.placements)
            converted[key] = value
        state[int(param_id)] = converted
    optimizer.load_state_dict({"state": state, "param_groups": full["param_groups"]})


@torch.no_grad()
def copy_full_state_dict(module: nn.Module, full: Mapping[str, torch.Tensor]) -> None:
    """Copy full (unsharded) values into a module's existing (possibly sharded) parameters and buffers, in place.

    The parameters stay the same objects (the optimiser and FSDP keep their references); each value is sharded like
    the tensor it goes into.

    Raises:
        KeyError: ``full`` lacks one of the module's entries or has one the module does not.
    """
    targets = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    missing, unexpected = sorted(set(targets) - set(full)), sorted(set(full) - set(targets))
    if missing or unexpected:
        raise KeyError(f"state dict does not match the module: missing {missing}, unexpected {unexpected}")
    for name, target in targets.items():
        value = full[name]
        if isinstance(target, DTensor):
            value = distribute_tensor(
                value.to(device=target.device_mesh.device_type, dtype=target.dtype), target.device_mesh, target.placements
            )
            target.to_local().copy_(value.to_local())
        else:
            target.copy_(value)


def shard_decoder(
    model: nn.Module,
    *,
    custom_sharded_layers: Optional[Iterable[str]] = None,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
) -> None:
    """FSDP2 (``fully_shard``) on each transformer layer (plus ``custom_sharded_layers``) and the root, as torchtune's
    distributed recipes do (``training.shard_model``).

    A model whose output projection is tied to its token embedding (Llama 3.2 1B and 3B) keeps both in the root unit
    whatever ``custom_sharded_layers`` says: the one weight is used at both ends of the forward, and an embedding
    sharded on its own would be resharded before the output projection reads it.
    """
    from torchtune import training, utils

    names = list(custom_sharded_layers or [])
    if has_tied_output(model) and {"tok_embeddings", "output"} & set(names):
        names = [name for name in names if name not in ("tok_embeddings", "output")]
        utils.get_logger("INFO").info(
            f"{type(model).__name__} ties its output to tok_embeddings: both stay in the root FSDP unit "
            "(custom_sharded_layers applies to the other names only)."
        )
    conditions = [partial(training.get_shard_conditions, names_to_match=names or None)]
    training.shard_model(model, conditions, cpu_offload=cpu_offload, reshard_after_forward=reshard_after_forward)


def has_tied_output(model: nn.Module) -> bool:
    """Whether the model's output projection reuses its token embedding (torchtune's ``TiedLinear``)."""
    return type(getattr(model, "output", None)).__name__ == "TiedLinear"


def shard_each(modules: Iterable[nn.Module], *, cpu_offload: bool = False) -> None:
    """``fully_shard`` every module with parameters on its own (e.g. each projection ``nn.Linear``).

    Each is called directly (never through a parent's ``forward``), so each must be its own FSDP root. Their
    gradients are reduced (averaged) over ranks like the student's, and every rank holds the same values.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    kwargs = {"offload_policy": CPUOffloadPolicy()} if cpu_offload else {}
    for module in modules:
        if any(True for _ in module.parameters()):
            fully_shard(module, **kwargs)


def materialise_buffers(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Buffers a checkpoint does not hold (RoPE caches) are built on ``device`` after meta-device construction."""
    from torchtune import training

    with training.set_default_dtype(dtype), device:
        for module in model.modules():
            if hasattr(module, "rope_init"):
                module.rope_init()
