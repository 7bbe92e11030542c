"""Knowledge distillation on many GPUs (and nodes) with torchrun and FSDP2.

Run as::

    tune run --nproc_per_node 8 recipes/knowledge_distillation_distributed.py --config configs/distributed_8B_to_1B.yaml

(multi-node: torchrun's own ``--nnodes``/``--rdzv-backend``/``--rdzv-endpoint`` arguments, see the README). It is
the single-device recipe (``KDRecipeSingleDevice``, every feature, the same training core) with only what data
parallelism changes:

- the student and the teacher are sharded with FSDP2 (``fully_shard`` on each transformer layer and the root, as
  torchtune's distributed recipes do); the teacher is frozen and frees each layer's gathered weights after its
  forward; each projection is sharded on its own, starts from the same seeded weights on every rank and gets
  averaged gradients, so every rank holds the same values;
- each rank reads its share of every global batch (``batch_size`` samples per rank and micro-batch);
- the step's counted tokens are summed over ranks before the first backward and each rank contributes
  ``world_size * sum / global_tokens``, which FSDP's averaging turns into the single-device gradient of the global
  batch; logged means and dynamic-scaling statistics are reduced the same way, so every rank holds the same weights;
- rank 0 logs and writes checkpoints in the single-device layout (state dicts gathered from the shards), so a
  training state resumes in either recipe;
- a problem found by the pre-flight on any rank, or a SIGTERM/SIGINT received by any rank, stops every rank.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig
from torch.distributed import destroy_process_group, init_process_group
from torchtune import config, training, utils
from torchtune.modules.peft import get_adapter_state_dict

# `recipes` is the checkout's folder (the install hook torchtune_kd.recipes_path puts the checkout first on sys.path),
# also when torchrun runs this file as a script.
from recipes.knowledge_distillation_single_device import KDRecipeSingleDevice
from torchtune_kd.core import checkpointing, distributed, models, preflight, safety, teacher_cache

log = utils.get_logger("INFO")


def _is_adapter_key(name: str) -> bool:
    return bool(get_adapter_state_dict({name: torch.empty(0)}, device=None))


class KDRecipeDistributed(KDRecipeSingleDevice):
    """Knowledge distillation with data parallelism: FSDP2-sharded student and teacher, one process per device.

    Every option of the single-device recipe works here, plus torchtune's distributed options
    ``fsdp_cpu_offload``, ``fsdp_reshard_after_forward`` and ``custom_sharded_layers``. ``batch_size`` is per rank:
    a step's global batch is ``batch_size * gradient_accumulation_steps * world_size`` samples.

    Args:
        cfg (DictConfig): the recipe config (see ``configs/``).

    Raises:
        preflight.ConfigError: every problem of the config on any rank (all ranks raise it), before weights load.
    """

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self._fsdp_cpu_offload = bool(cfg.get("fsdp_cpu_offload", False))
        self._reshard_after_forward = bool(cfg.get("fsdp_reshard_after_forward", True))
        self._custom_sharded_layers = list(cfg.get("custom_sharded_layers", None) or [])
        if not self._is_rank_zero:
            # One log for the job: other ranks report only warnings and errors. A filter, not a level: torchtune's
            # get_logger("INFO") resets the shared logger's level whenever a module asks for it.
            log.addFilter(lambda record: record.levelno >= logging.WARNING)

    # ------------------------------------------------------- data-parallel hooks

    def _world(self) -> tuple[int, int]:
        return utils.get_world_size_and_rank()

    def _preflight(self, cfg: DictConfig) -> preflight.ModelFacts:
        """The pre-flight on every rank (files may differ between nodes); any rank's problems stop all ranks."""
        facts, problems = None, None
        try:
            facts = preflight.validate_config(cfg, build_data=True, world_size=self.world_size)
        except preflight.ConfigError as err:
            problems = err.problems
        failed = distributed.gather_errors(problems)
        if not failed:
            return facts
        if len(failed) == self.world_size and all(found == failed[0] for found in failed.values()):
            raise preflight.ConfigError(failed[0])
        raise preflight.ConfigError(
            [f"on rank {rank} of {self.world_size}: {problem}" for rank, found in failed.items() for problem in found]
        )

    def _reduce_sum(self) -> Optional[Any]:
        return distributed.all_reduce_sum

    def _all_done(self, done: torch.Tensor) -> bool:
        # Every rank makes the same number of sampling forwards (each gathers the sharded weights).
        undone = (~done).sum().to(torch.float32).reshape(1)
        return float(distributed.all_reduce_sum(undone)) == 0.0

    def _clip_gradients(self) -> torch.Tensor:
        return distributed.full_tensor(super()._clip_gradients())

    def _stop_signal(self) -> Optional[int]:
        return distributed.max_over_ranks(self._signals.received, self._device)

    def _signal_exit_note(self, signum: int) -> str:
        return safety.exit_note(signum, launcher=True)

    def _gather_model_state(self, trainable_only: bool) -> Dict[str, torch.Tensor]:
        keep = _is_adapter_key if trainable_only and self._is_lora else (lambda name: True)
        return distributed.full_state_dict(self._model, keep=keep, to_cpu_on=self._is_rank_zero)

    def _gather_projection_state(self) -> Optional[Dict[str, torch.Tensor]]:
        if self._aligner is None:
            return None
        return distributed.full_state_dict(self._aligner.projections, to_cpu_on=self._is_rank_zero)

    def _gather_optimizer_state(self) -> Dict[str, Any]:
        return distributed.full_optimizer_state_dict(self._optimizer, to_cpu_on=self._is_rank_zero)

    def _load_optimizer_state(self, state: Dict[str, Any]) -> None:
        distributed.load_full_optimizer_state_dict(self._optimizer, state)

    def _load_projection_state(self, state: Dict[str, torch.Tensor]) -> None:
        distributed.copy_full_state_dict(self._aligner.projections, state)

    def _output_weight(self, model: torch.nn.Module) -> torch.Tensor:
        """A whole output weight for the fused pass: a sharded one is all-gathered; the student's gradient then comes
        back averaged over ranks, as FSDP averages every other gradient."""
        return distributed.gathered_for_compute(super()._output_weight(model))

    def _rng_state(self) -> Dict[str, Any]:
        own = super()._rng_state()
        every = [None] * self.world_size
        torch.distributed.all_gather_object(every, own)
        # Rank 0's under the single-device keys (so the other recipe can resume), each rank's under per_rank.
        return {**own, "per_rank": every}

    def _restore_rng_state(self, rng: Dict[str, Any]) -> None:
        per_rank = rng.get("per_rank")
        if per_rank is not None and len(per_rank) == self.world_size:
            super()._restore_rng_state(per_rank[self.rank])
        elif self._is_rank_zero:
            log.warning(
                f"The training state was saved by {len(per_rank) if per_rank else 1} process(es), this run has "
                f"{self.world_size}: each rank keeps its freshly seeded RNG (only dropout draws from it)."
            )

    # ------------------------------------------------------------------ set-up

    # Student and teacher are built on the meta device, sharded with FSDP2, then loaded (the set-up is inherited).
    _build_student = staticmethod(models.build_student_sharded)
    _build_teacher = staticmethod(models.build_teacher_sharded)

    def _builder_options(self) -> Dict[str, Any]:
        return {
            "custom_sharded_layers": self._custom_sharded_layers,
            "cpu_offload": self._fsdp_cpu_offload,
            "reshard_after_forward": self._reshard_after_forward,
        }

    def _setup_alignment(self, cfg: DictConfig) -> None:
        super()._setup_alignment(cfg)
        if self._aligner is not None:
            distributed.shard_each(self._aligner.projections.values(), cpu_offload=self._fsdp_cpu_offload)

    def _peak_memory(self) -> Dict[str, float]:
        """Rank 0's figures under torchtune's names, plus every rank's peak (``<name>/rank<r>``) and the largest."""
        own = super()._peak_memory()
        key = "peak_memory_alloc" if "peak_memory_alloc" in own else "peak_memory_rss_gib"
        every = distributed.all_gather_floats(own[key], self._device)
        own.update({f"{key}/rank{rank}": value for rank, value in enumerate(every)})
        own[f"{key}/max_over_ranks"] = max(every)
        return own

    def _log_memory(self, message: str) -> None:
        if self._is_rank_zero:
            super()._log_memory(message)

    def save_checkpoint(self, epoch: int, steps_in_epoch: int = 0) -> None:
        """Gather on every rank, write on rank 0; every rank returns once the checkpoint is on disk, or raises rank
        0's error when it could not be written (instead of waiting for it at a barrier)."""
        error = None
        try:
            super().save_checkpoint(epoch, steps_in_epoch)
        except checkpointing.CheckpointError as err:
            error = str(err)
        failed = distributed.gather_errors(error)
        if failed:
            raised = checkpointing.CheckpointError(failed[min(failed)])
            raised.on_every_rank = True  # one message for the job: rank 0 prints it
            raise raised

    def cleanup(self) -> None:
        super().cleanup()
        if torch.distributed.is_initialized():
            destroy_process_group()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point: ``tune run --nproc_per_node N recipes/knowledge_distillation_distributed.py --config ...``.

    As in the single-device recipe, problems a user can fix end every rank with exit status 1 and one plain
    message (printed by rank 0, or by the rank that hit it); a SIGTERM/SIGINT received by any rank makes all ranks
    checkpoint together and exit with 128 + the signal number, which torchrun turns into its own exit status 1 (a
    worker cannot change that): rank 0's last line says so, and where the complete checkpoint is.
    """
    if not training.is_distributed():
        print(
            "\nError: this recipe runs under a distributed launcher: tune run --nproc_per_node N "
            "recipes/knowledge_distillation_distributed.py --config ... (or torchrun); on one device use "
            "recipes/knowledge_distillation_single_device.py",
            file=sys.stderr,
        )
        sys.exit(1)
    device_type = str(cfg.get("device", "cuda")).split(":")[0]
    if device_type == "cuda" and torch.cuda.is_available():
        # Each rank's GPU is selected (from LOCAL_RANK) before any collective; objects travel over gloo.
        utils.get_device(device="cuda")
        init_process_group("cuda:nccl,cpu:gloo")
    else:
        # CPU (or a missing GPU, which the pre-flight then reports on every rank).
        init_process_group("gloo")
    if cfg.get("fsdp_cpu_offload", False):
        # Fused AdamW on CPU is ~2x faster with every core (torchtune's distributed recipes do the same).
        training.set_torch_num_threads()
    recipe = None
    _, rank = utils.get_world_size_and_rank()
    try:
        recipe = KDRecipeDistributed(cfg=cfg)
        recipe.setup(cfg=cfg)
        recipe.train()
        # No rank tears the process group down while another still uses it.
        torch.distributed.barrier()
    except preflight.ConfigError as err:
        # Every rank raises the same gathered error: rank 0 prints it.
        if rank == 0:
            print(f"\nError: {err}", file=sys.stderr)
        sys.exit(1)
    except safety.TrainingDivergedError as err:
        # The step's values are reduced over ranks, so every rank stops at the same step: rank 0 reports.
        if rank == 0:
            print(f"\nError: {err}", file=sys.stderr)
        sys.exit(1)
    except checkpointing.CheckpointError as err:
        if not getattr(err, "on_every_rank", False):
            print(f"\nError (rank {rank}): {err}", file=sys.stderr)
        elif rank == 0:
            print(f"\nError: {err}", file=sys.stderr)
        sys.exit(1)
    except teacher_cache.CacheError as err:
        # A damaged shard is found by the rank that reads it (each reads its own samples); the launcher ends the rest.
        print(f"\nError (rank {rank}): {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        if recipe is not None:
            recipe.cleanup()
        elif torch.distributed.is_initialized():
            destroy_process_group()
    if recipe.stopped_by_signal is not None:
        sys.exit(safety.SIGNAL_EXIT_BASE + recipe.stopped_by_signal)


if __name__ == "__main__":
    sys.exit(recipe_main())
