"""Knowledge distillation on one device: a faithful fork of torchtune 0.6.1's ``knowledge_distillation_single_device``.

Run as::

    tune run recipes/knowledge_distillation_single_device.py --config configs/distillation.yaml [key=value ...]

It keeps torchtune's recipe (LoRA student, frozen teacher, chunked output, gradient accumulation, activation
checkpointing, compile, profiler, lr scheduler, metric loggers, checkpoints with resume) and adds a full fine-tune
student, exact divergences (``kd_losses``), layer alignment with learned projections and an IR loss, loss weighting,
token-exact accumulation, a config pre-flight, mid-epoch checkpoints and safe stops. This file holds only
orchestration; every idea lives in the training core, ``torchtune_kd.core`` (see its package docstring).

``recipes/knowledge_distillation_distributed.py`` subclasses this recipe and overrides only what data parallelism
changes (the methods marked "data-parallel hook" below): the world size and rank, model building (FSDP2), the
reductions of the step's sums, gradient clipping, state gathering for checkpoints, and which rank logs and writes.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

import torch
from omegaconf import DictConfig
from torch import nn
from torch.optim import Optimizer
from torchtune import config, training, utils
from torchtune.modules.peft import get_adapter_state_dict
from torchtune.recipe_interfaces import FTRecipeInterface
from torchtune.training import DummyProfiler, PROFILER_KEY
from tqdm import tqdm

from torchtune_kd import output_folder
from torchtune_kd.core import (
    alignment, checkpointing, cross_tokenizer, cross_tokenizer_loss, data, fused_output, loss_step, loss_weighting,
    models, on_policy, output_pass, preflight, safety, teacher_cache, teacher_source, training_state, vocabularies,
)
from torchtune_kd.core.config_checks.cross_tokenizer import settings as cross_tokenizer_settings

log = utils.get_logger("INFO")
# Default of diagnostics_every_n_steps (configs/tiny_cpu.yaml sets 1 so that the tests see them on every step).
DIAGNOSTICS_EVERY_N_STEPS = 10


class KDRecipeSingleDevice(FTRecipeInterface):
    """Knowledge distillation of a LoRA or fully fine-tuned student from a frozen teacher on one device.

    The objective per optimiser step is ``w_ce * CE + w_kd * KD + w_ir * IR`` where each component is a mean over
    the step's counted tokens (all micro-batches together) and the weights come from ``loss_weighting``.

    Args:
        cfg (DictConfig): the recipe config (see ``configs/``).

    Raises:
        preflight.ConfigError: every problem of the config, its files, its data and its output folder, before
            anything heavy happens.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.world_size, self.rank = self._world()
        self._is_rank_zero = self.rank == 0
        self._facts = self._preflight(cfg)
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        self._output_dir = Path(cfg.output_dir)
        self._log_every_n_steps = cfg.get("log_every_n_steps", 1)
        # Top-1 agreement and teacher entropy: exact, on the first and every n-th logged step (each costs two argmax
        # passes and an entropy pass over the step's [tokens, vocab]).
        self._diagnostics_every = int(cfg.get("diagnostics_every_n_steps", None) or DIAGNOSTICS_EVERY_N_STEPS)
        self._diagnose = True
        self._step_kind = teacher_source.DATA
        self._padding_warned = False  # a padded teacher's large padding mass is warned about once
        self._log_peak_memory_stats = cfg.get("log_peak_memory_stats", True)

        self.seed = training.set_seed(seed=cfg.seed, debug_mode=cfg.get("cudnn_deterministic_mode", None))
        self.epochs_run = 0
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.max_steps_per_epoch
        self.global_step = 0
        self._resume_from_checkpoint = cfg.get("resume_from_checkpoint", False)
        self._save_adapter_weights_only = cfg.get("save_adapter_weights_only", False)
        self._save_projections = cfg.get("save_projections", True)
        self._gradient_accumulation_steps = cfg.gradient_accumulation_steps
        self._batch_size = cfg.batch_size
        self._clip_grad_norm = cfg.get("clip_grad_norm", None)
        self._projection_lr_multiplier = float(cfg.get("projection_lr_multiplier", 1.0))
        self._save_every_n_steps = cfg.get("save_every_n_steps", None)
        self._keep_last_n = int(cfg.get("keep_last_n", 1))
        self._guard = safety.NonFiniteGuard(int(cfg.get("max_nonfinite_steps", 0)))
        self._on_policy = on_policy.settings(cfg.get("on_policy", None))
        cache = cfg.get("teacher_cache", None)
        self._cache_settings = teacher_cache.settings(cache) if cache is not None else None
        self._teacher_cache: Optional[teacher_cache.TeacherCache] = None
        self._signals = safety.StopSignals()
        self._steps_done_in_epoch = 0
        self._dataloader_state: Optional[Dict[str, Any]] = None
        self._last_checkpoint: Optional[Path] = None
        self._stopped_by: Optional[int] = None
        # The claimed output folder (rank 0 only: it alone writes there).
        self._output_folder: Optional[output_folder.OwnedFolder] = None

    # ------------------------------------------------------- data-parallel hooks

    def _world(self) -> tuple[int, int]:
        """Data-parallel hook: ``(world_size, rank)``."""
        return 1, 0

    def _preflight(self, cfg: DictConfig) -> preflight.ModelFacts:
        """Data-parallel hook: validate the whole config before anything heavy (every problem in one error)."""
        return preflight.validate_config(cfg, build_data=True)

    def _reduce_sum(self) -> Optional[Any]:
        """Data-parallel hook: the sum over ranks for the step's token counts and means (``None``: one process)."""
        return None

    def _all_done(self, done: torch.Tensor) -> bool:
        """Data-parallel hook: whether every sequence being sampled has stopped (on every rank: each sampled token
        is a forward that every rank must make)."""
        return bool(done.all())

    def _clip_gradients(self) -> torch.Tensor:
        """Data-parallel hook: clip (when ``clip_grad_norm`` is set) and return the total gradient norm."""
        return torch.nn.utils.clip_grad_norm_(
            self._trainable_parameters(),
            max_norm=float(self._clip_grad_norm) if self._clip_grad_norm is not None else float("inf"),
        )

    def _stop_signal(self) -> Optional[int]:
        """Data-parallel hook: the SIGTERM/SIGINT received (by any rank), or ``None``."""
        return self._signals.received

    def _signal_exit_note(self, signum: int) -> str:
        """Data-parallel hook: the line saying which exit status follows a signal stop."""
        return safety.exit_note(signum)

    def _gather_model_state(self, trainable_only: bool) -> Dict[str, torch.Tensor]:
        """Data-parallel hook: CPU copies of the student's state dict (only the adapters if ``trainable_only`` and
        LoRA). Copies: the LoRA merge works in place and must never touch the live model."""
        state = checkpointing.cpu_copy(self._model.state_dict())
        return get_adapter_state_dict(state) if trainable_only and self._is_lora else state

    def _gather_projection_state(self) -> Optional[Dict[str, torch.Tensor]]:
        """Data-parallel hook: CPU copies of the projections' weights (``None`` without a layer mapping)."""
        return checkpointing.cpu_copy(self._aligner.projections.state_dict()) if self._aligner is not None else None

    def _gather_optimizer_state(self) -> Dict[str, Any]:
        """Data-parallel hook: the optimiser state in ``Optimizer.state_dict()``'s layout with full tensors."""
        return self._optimizer.state_dict()

    def _load_optimizer_state(self, state: Dict[str, Any]) -> None:
        """Data-parallel hook: load an optimiser state written by either recipe."""
        self._optimizer.load_state_dict(state)

    def _load_projection_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Data-parallel hook: load full projection weights written by either recipe."""
        self._aligner.projections.load_state_dict(state)

    def _output_weight(self, model: nn.Module) -> torch.Tensor:
        """Data-parallel hook: a model's output-projection weight for the fused pass, whole."""
        return fused_output.output_weight(model)

    def _rng_state(self) -> Dict[str, Any]:
        """Data-parallel hook: the RNG states to save (dropout draws from them)."""
        return {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self._device) if self._device.type == "cuda" else None,
        }

    def _restore_rng_state(self, rng: Dict[str, Any]) -> None:
        """Data-parallel hook: restore the RNG states saved by :meth:`_rng_state`."""
        torch.set_rng_state(rng["cpu"])
        if self._device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], device=self._device)

    # ------------------------------------------------------------------ set-up

    def setup(self, cfg: DictConfig) -> None:
        """Build everything: models, tokenizer, alignment, losses, optimiser, data, scheduler; restore a resume.

        Raises:
            preflight.ConfigError: the output folder cannot be claimed, nothing to resume, or a changed layer mapping
                on resume.
            checkpointing.CheckpointError: the training state to resume cannot be loaded safely, has another format
                or misses a field.
        """
        if self._is_rank_zero:
            # Before anything is built or written: the run's folder, by the shared rule (the pre-flight checked it).
            self._output_folder, removed = checkpointing.claim_output_dir(
                self._output_dir, resume=self._resume_from_checkpoint,
                overwrite=cfg.get("overwrite_output_dir", False), side=checkpointing.side_dirs(cfg),
            )
            for path in removed:
                log.info(f"overwrite_output_dir=True: removed the earlier run's {path}")
        state: Optional[training_state.TrainingState] = None
        if self._resume_from_checkpoint:
            state, path = checkpointing.load_latest_training_state(self._output_dir)
            self._last_checkpoint = path.parent
            log.info(f"Resuming from {path} (epochs run: {state.epochs_run}, step {state.global_step}).")
            # The pre-flight checked these on a memory-mapped read; again here (before any model is built) for a
            # state it could not read that way.
            problems = training_state.resume_problems(
                state, path, scaling_method=loss_weighting.LossWeighting.from_recipe_config(cfg).method,
                batch_size=self._batch_size, gradient_accumulation_steps=self._gradient_accumulation_steps,
                world_size=self.world_size,
            )
            if problems:
                raise preflight.ConfigError(problems)

        self._metric_logger = None
        if self._is_rank_zero:
            config.log_config(recipe_name=type(self).__name__, cfg=cfg)
            for notice in self._facts.notices:
                log.warning(f"Notice: {notice}")
            self._metric_logger = config.instantiate(cfg.metric_logger)
            self._metric_logger.log_config(cfg)

        self._compile = cfg.get("compile", False)
        self._settings = training_state.resume_settings(cfg)
        if state is not None:
            for warning in training_state.check_resumed_settings(cfg, state, self._facts.layer_pairs, self._output_dir):
                log.warning(warning)
            if self.seed != state.seed:
                # The data order depends on the seed, so the checkpoint's wins before the dataloader is built.
                log.warning(f"Config seed {self.seed} differs from the checkpoint's; using {state.seed}.")
                self.seed = state.seed

        self._checkpointer = config.instantiate(cfg.checkpointer, should_load_recipe_state=False)
        student_ckpt = self._checkpointer.load_checkpoint()
        self._model = self._setup_model(
            cfg_model=cfg.model,
            enable_activation_checkpointing=cfg.get("enable_activation_checkpointing", False),
            compile_model=self._compile,
            base_model_state_dict=student_ckpt[training.MODEL_KEY],
            trainable_state_dict=state.trainable if state is not None else None,
        )
        del student_ckpt
        self._teacher_model = None
        if self._cache_settings is None:
            teacher_ckpt = config.instantiate(cfg.teacher_checkpointer, should_load_recipe_state=False).load_checkpoint()
            self._teacher_model = self._setup_teacher_model(cfg.teacher_model, teacher_ckpt[training.MODEL_KEY])
            del teacher_ckpt
        self._tokenizer = self._facts.tokenizer
        self._setup_alignment(cfg)

        models_with_output = [m for m in (self._model, self._teacher_model) if m is not None]
        self._losses = loss_step.build_losses(cfg.loss, cfg.kd_loss, models_with_output, compile=self._compile)
        self._ignore_index = self._losses.ignore_index
        self._cross_tokenizer_kd: Optional[cross_tokenizer_loss.CrossTokenizerKD] = None
        if self._cache_settings is not None:
            # The teacher is never built: its top-k distributions are read per sample id (core.teacher_cache).
            self._teacher_cache = teacher_cache.TeacherCache(self._cache_settings.path, ignore_index=self._ignore_index)
            log.info(f"Teacher cache {self._cache_settings.path}: {teacher_cache.describe(self._teacher_cache.manifest)}.")
            self._teacher_source: teacher_source.TeacherSource = teacher_source.CachedTeacher(self._teacher_cache)
        else:
            self._teacher_source = teacher_source.LiveTeacher(
                self._teacher_model, output_weight=partial(self._output_weight, self._teacher_model)
            )
            if self._on_policy.active:
                self._teacher_source = self._generating_teacher(cfg, self._teacher_source)
            if cfg.get("cross_tokenizer", None) is not None:
                self._teacher_source = self._cross_tokenizer_teacher(cfg)
            if self._facts.shared_vocab is not None:
                # Same tokenizer, teacher padded past the student's rows: KD on the shared rows (core.vocabularies).
                self._teacher_source = vocabularies.PaddedVocabTeacher(
                    self._teacher_source, shared=self._facts.shared_vocab, ignore_index=self._ignore_index
                )
        self._fused_chunk_fn = None
        self._fused = self._output_path_is_fused(models_with_output)
        if self._fused:
            # The models return their final hidden states; the loss applies the output projections chunk by chunk.
            for model in models_with_output:
                model.set_num_output_chunks(0)
            if self._compile:
                self._fused_chunk_fn = fused_output.compiled_chunk_fn(os.environ.get("TORCH_COMPILE_BACKEND", "inductor"))
            chunk_size = self._facts.output_path.chunk_size
            self._output_pass: output_pass.OutputPass = output_pass.FusedPass(
                self._losses.kd_loss, student_weight=partial(self._output_weight, self._model),
                chunk_size=chunk_size, chunk_fn=self._fused_chunk_fn,
            )
            size = f"{chunk_size} tokens per chunk" if chunk_size else "chunks of about vocab / hidden per step"
            log.info(f"Fused output pass: CE and KD from hidden states, {size}.")
        else:
            self._output_pass = output_pass.UnfusedPass(self._losses, cross_tokenizer=self._cross_tokenizer_kd)
        log.info(
            f"Loss is initialized ({type(self._losses.kd_loss).__name__}, output chunks: "
            f"{self._losses.num_output_chunks or 'none'})."
        )
        self._weighting = loss_weighting.LossWeighting.from_recipe_config(cfg)
        self._optimizer = self._setup_optimizer(cfg.optimizer)
        self._dataloader = data.build_dataloader(
            data.WithSampleIds(self._facts.dataset) if self._teacher_cache is not None else self._facts.dataset,
            packed=data.is_packed(cfg.dataset, self._facts.dataset),
            batch_size=cfg.batch_size,
            shuffle=cfg.shuffle,
            seed=self.seed,
            pad_id=self._tokenizer.pad_id,
            ignore_index=self._ignore_index,
            num_replicas=self.world_size,
            rank=self.rank,
        )
        self._global_batch = cfg.batch_size * self._gradient_accumulation_steps * self.world_size
        self._steps_per_epoch = len(self._dataloader) // self._gradient_accumulation_steps
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < self._steps_per_epoch:
            self._steps_per_epoch = self.max_steps_per_epoch
        if state is not None:
            self._restore_training_state(state)

        self._lr_schedule_steps = self.total_epochs * self._steps_per_epoch
        ended_lr = self._optimizer.param_groups[0]["lr"]
        self._lr_scheduler = self._setup_lr_scheduler(
            cfg.get("lr_scheduler", None),
            num_training_steps=self._lr_schedule_steps,
            last_epoch=self.global_step - 1,
        )
        if state is not None and self._lr_scheduler is not None and self._is_rank_zero:
            change = training_state.lr_schedule_change(
                state, schedule_steps=self._lr_schedule_steps, steps_per_epoch=self._steps_per_epoch,
                ended_lr=ended_lr, resumed_lr=self._optimizer.param_groups[0]["lr"], output_dir=self._output_dir,
            )
            if change:
                log.warning(change)
        self._profiler = self._setup_profiler(cfg.get(PROFILER_KEY, None))
        self._activations_handling_ctx = training.get_act_offloading_ctx_manager(
            self._model, cfg.get("enable_activation_offloading", False)
        )

    def _generating_teacher(self, cfg: DictConfig, live: teacher_source.LiveTeacher) -> on_policy.GeneratingTeacher:
        """The live teacher scoring sequences sampled from the student (``on_policy``, ``core.on_policy``)."""
        tokenizer = self._tokenizer
        stop_tokens = list(getattr(tokenizer, "stop_tokens", None) or [tokenizer.eos_id])
        settings = self._on_policy
        log.info(
            f"On-policy distillation: {settings.fraction:.0%} of the steps on the student's own samples "
            f"(up to {settings.max_new_tokens} new tokens, temperature {settings.temperature}, top_k {settings.top_k}, "
            f"top_p {settings.top_p}); the other steps on "
            f"{'the teacher' + chr(39) + 's samples' if settings.teacher_generated else 'the data'}."
        )
        synchronize = (lambda: torch.cuda.synchronize(self._device)) if self._device.type == "cuda" else (lambda: None)
        return on_policy.GeneratingTeacher(
            live, self._model, settings, seed=self.seed, rank=self.rank, ignore_index=self._ignore_index,
            pad_id=tokenizer.pad_id, stop_tokens=stop_tokens, max_seq_len=cfg.tokenizer.get("max_seq_len", None),
            dtype=self._dtype, all_done=self._all_done, synchronize=synchronize,
        )

    def _cross_tokenizer_teacher(self, cfg: DictConfig) -> cross_tokenizer.CrossTokenizerTeacher:
        """The live teacher reading each batch in its own tokens, and the loss of the aligned positions
        (``cross_tokenizer``, ``core.cross_tokenizer``)."""
        facts, settings = self._facts, cross_tokenizer_settings(cfg)
        student_table = cross_tokenizer.TokenTable.from_tokenizer(self._tokenizer, facts.student_vocab)
        teacher_table = cross_tokenizer.TokenTable.from_tokenizer(facts.teacher_tokenizer, facts.teacher_vocab)
        student_ids, teacher_ids = cross_tokenizer.shared_vocabulary(student_table, teacher_table)
        self._cross_tokenizer_kd = cross_tokenizer_loss.CrossTokenizerKD(
            self._losses.kd_loss, student_ids, teacher_ids, exact_weight=settings.exact_weight,
            uld_weight=settings.uld_weight, uld_top_k=settings.uld_top_k,
        ).to(self._device)
        log.info(
            f"Cross-tokenizer teacher: {student_ids.numel()} shared tokens; KD = {settings.exact_weight} x "
            f"{type(self._losses.kd_loss).__name__} on them + {settings.uld_weight} x ULD (top {settings.uld_top_k}) at "
            "aligned positions."
        )
        max_len = cfg.teacher_tokenizer.get("max_seq_len", None) or facts.teacher_max_seq_len
        return cross_tokenizer.CrossTokenizerTeacher(
            self._teacher_model, student_table, teacher_table, facts.teacher_tokenizer, max_teacher_len=max_len
        )

    def _restore_training_state(self, state: training_state.TrainingState) -> None:
        """Restore counters, optimiser, projections, loss-scaling statistics, RNG and the dataloader position."""
        self.epochs_run = state.epochs_run
        if self.max_steps_per_epoch != state.max_steps_per_epoch:
            log.warning("max_steps_per_epoch differs from the checkpoint's; using the checkpoint's value.")
            self.max_steps_per_epoch = state.max_steps_per_epoch
            if self.max_steps_per_epoch is not None:
                self._steps_per_epoch = min(self._steps_per_epoch, self.max_steps_per_epoch)
        self.global_step = state.global_step
        self._steps_done_in_epoch = state.steps_in_epoch
        self._dataloader_state = self._resume_position(state)
        self._guard.skipped = state.nonfinite_steps
        if self._aligner is not None and state.projections is not None:
            self._load_projection_state(state.projections)
        self._load_optimizer_state(state.optimizer)
        self._weighting.load_state_dict(state.loss_scaling)
        self._restore_rng_state(state.rng)

    def _resume_position(self, state: training_state.TrainingState) -> Optional[Dict[str, Any]]:
        """Where in the epoch to continue (see :func:`training_state.resume_position`): ``None`` at an epoch end.

        Raises:
            preflight.ConfigError: a mid-epoch state from a run with another global batch size.
        """
        return training_state.resume_position(
            state, self._last_checkpoint, world_size=self.world_size, batch_size=self._batch_size,
            gradient_accumulation_steps=self._gradient_accumulation_steps,
        )

    def _setup_model(
        self,
        cfg_model: DictConfig,
        enable_activation_checkpointing: bool,
        compile_model: bool,
        base_model_state_dict: Dict[str, Any],
        trainable_state_dict: Optional[Dict[str, Any]] = None,
    ) -> nn.Module:
        """Build the student (LoRA or full), load its weights and make the right parameters trainable."""
        model, self._lora = self._build_student(
            cfg_model, device=self._device, dtype=self._dtype,
            base_state_dict=base_model_state_dict, trainable_state_dict=trainable_state_dict,
            compile_model=compile_model, activation_checkpointing=enable_activation_checkpointing,
            init_seed=self.seed, **self._builder_options(),
        )
        self._is_lora = self._lora is not None
        self._log_memory("After student init:")
        return model

    def _setup_teacher_model(self, model_cfg: DictConfig, model_state_dict: Dict[str, Any]) -> nn.Module:
        """Build the frozen teacher and load its weights."""
        model = self._build_teacher(
            model_cfg, device=self._device, dtype=self._dtype, state_dict=model_state_dict, **self._builder_options()
        )
        self._log_memory("After teacher init:")
        return model

    # The model builders and their extra keyword arguments: the distributed recipe swaps in the sharded builders
    # and their FSDP options, the set-up above stays one.
    _build_student = staticmethod(models.build_student)
    _build_teacher = staticmethod(models.build_teacher)

    def _builder_options(self) -> Dict[str, Any]:
        """Keyword arguments passed to both model builders beyond the common ones (none on one device)."""
        return {}

    def _log_memory(self, message: str) -> None:
        if self._device.type == "cuda":
            training.log_memory_stats(training.get_memory_stats(device=self._device), message=message)

    def _setup_alignment(self, cfg: DictConfig) -> None:
        """Hooks on the mapped layers, one projection per pair, and the IR loss (if a layer mapping is set)."""
        self._aligner = self._student_capture = self._teacher_capture = None
        if self._facts.layer_pairs:
            self._aligner, self._student_capture, self._teacher_capture = alignment.attach(
                self._model, self._teacher_model, self._facts.layer_pairs, config.instantiate(cfg.ir_loss),
                device=self._device, dtype=self._dtype, seed=self.seed,
            )

    def _setup_optimizer(self, cfg_optimizer: DictConfig) -> Optimizer:
        """The optimiser over the student's trainable parameters and (when IR is optimised) the projections."""
        groups: List[Dict[str, Any]] = [{"params": [p for p in self._model.parameters() if p.requires_grad]}]
        self._trains_projections = (
            self._aligner is not None
            and self._weighting.method != "blend"
            and any(True for _ in self._aligner.parameters())
        )
        if self._aligner is not None and not self._trains_projections:
            self._aligner.requires_grad_(False)
        if self._trains_projections:
            lr = float(cfg_optimizer.get("lr", 1e-3)) * self._projection_lr_multiplier
            groups.append({"params": list(self._aligner.parameters()), "lr": lr})
        optimizer = config.instantiate(cfg_optimizer, groups)
        log.info("Optimizer is initialized.")
        return optimizer

    def _trainable_parameters(self) -> List[torch.nn.Parameter]:
        params = [p for p in self._model.parameters() if p.requires_grad]
        return params + list(self._aligner.parameters()) if self._trains_projections else params

    def _setup_lr_scheduler(
        self, cfg_lr_scheduler: Optional[DictConfig], num_training_steps: int, last_epoch: int
    ) -> Optional[torch.optim.lr_scheduler.LRScheduler]:
        if cfg_lr_scheduler is None:
            log.info("No learning rate scheduler configured: constant learning rate.")
            return None
        lr_scheduler = config.instantiate(
            cfg_lr_scheduler, self._optimizer, num_training_steps=num_training_steps, last_epoch=last_epoch
        )
        log.info("Learning rate scheduler is initialized.")
        return lr_scheduler

    def _setup_profiler(self, cfg_profiler: Optional[DictConfig] = None) -> Union[torch.profiler.profile, DummyProfiler]:
        """torchtune's profiler set-up: a no-op unless ``profiler.enabled`` (its component is checked by pre-flight)."""
        if cfg_profiler is None:
            cfg_profiler = DictConfig({"enabled": False})
        if cfg_profiler.get("_component_", None) is None:
            cfg_profiler["_component_"] = "torchtune.training.setup_torch_profiler"
        profiler, profiler_cfg = config.instantiate(cfg_profiler)
        self.profiler_profile_memory = profiler_cfg.get("profile_memory", False)
        if profiler_cfg["enabled"]:
            self.profiler_wait_steps = profiler_cfg["wait_steps"]
            self.profiler_warmup_steps = profiler_cfg["warmup_steps"]
            self.profiler_active_steps = profiler_cfg["active_steps"]
        return profiler

    def _output_path_is_fused(self, models: List[torch.nn.Module]) -> bool:
        """The pre-flight's choice of output pass, checked against the built models: an output layer the fused pass
        cannot read (not a plain or tied linear) falls back to the unfused pass under ``enabled: auto`` and is an
        error under ``enabled: true``."""
        path = self._facts.output_path
        if not path.fused:
            return False
        for model in models:
            try:
                fused_output.output_weight(model)
            except ValueError as err:
                if not path.auto:
                    raise preflight.ConfigError([f"fused_output.enabled=true, but {err}: set fused_output.enabled=false"]) from None
                if self._is_rank_zero:
                    log.warning(f"Output pass: unfused after all (fused_output.enabled=auto): {err}.")
                return False
        return True

    # ---------------------------------------------------------------- training

    def _loss_step(
        self, batch: Dict[str, torch.Tensor], coefficients: Optional[Dict[str, torch.Tensor]] = None
    ) -> Dict[str, torch.Tensor]:
        """Forward the student on one micro-batch, get the teacher's signal, and return the loss components as token
        sums.

        The teacher source (live model or cache, ``core.teacher_source``) and the output pass (fused or not,
        ``core.output_pass``) are chosen once at set-up; ``output_pass.micro_batch_sums`` serves every combination,
        and the IR loss is added from the layer captures.

        Args:
            batch (Dict[str, torch.Tensor]): ``tokens``, ``labels`` and ``real_tokens`` ``(bsz, seq_len)``; with
                packing also ``mask`` ``(bsz, seq_len, seq_len)`` and ``input_pos`` ``(bsz, seq_len)``; with a teacher
                cache ``sample_id`` ``(bsz,)``.
            coefficients (Optional[Dict[str, torch.Tensor]]): with ``fused_output``, the weights of CE and KD in the
                step's objective divided by its counted tokens (``loss_step.accumulate_gradients`` passes them).

        Returns:
            Dict[str, torch.Tensor]: fp32 scalar sums ``ce``, ``kd``, ``ir`` (if aligned) and ``ir/<s>-<t>``, and the
            detached diagnostics ``agree`` and ``teacher_entropy``; with ``fused_output`` also the differentiable
            ``objective`` (the weighted CE + KD, whose sums are then detached).
        """
        sums = output_pass.micro_batch_sums(
            self._model, self._teacher_source, self._output_pass, batch, self._ignore_index, coefficients,
            activations=self._activations_handling_ctx, diagnostics=self._diagnose,
        )
        if self._step_kind == teacher_source.STUDENT:
            # The labels are the student's own samples: their CE is logged, not trained on (core.on_policy).
            sums[on_policy.STUDENT_NLL] = sums.pop("ce").detach()
        if self._aligner is not None:
            pair_sums, _ = self._aligner.token_sums(
                self._student_capture.pop(), self._teacher_capture.pop(), batch[loss_step.REAL_TOKENS_KEY]
            )
            sums["ir"] = torch.stack(list(pair_sums.values())).sum() / len(pair_sums)
            sums.update({f"ir/{name}": value for name, value in pair_sums.items()})
        return sums

    def _accumulate_gradients(self, batches: List[Dict[str, torch.Tensor]]) -> tuple:
        """Forward/backward the step's (prepared) micro-batches; each contributes ``sum / step_tokens`` (global
        under data parallelism, where FSDP's averaging over ranks is undone by scaling the backward by the world
        size). A step on the student's own samples trains no CE."""
        components = ["ce"] if self._step_kind != teacher_source.STUDENT else []
        components += ["kd"] + (["ir"] if self._aligner is not None else [])
        return loss_step.accumulate_gradients(
            batches, self._loss_step, self._weighting, self._ignore_index,
            reduce_sum=self._reduce_sum(), grad_scale=float(self.world_size),
            fused_components=components if self._output_pass.fused else None,
        )

    def _micro_batches(self) -> Iterator[List[Dict[str, torch.Tensor]]]:
        """Group the dataloader's batches into the micro-batches of each optimiser step (on the device), after the
        teacher source's host work on each (a cache lookup)."""
        group: List[Dict[str, torch.Tensor]] = []
        for batch in self._dataloader:
            group.append({k: v.to(self._device) for k, v in self._teacher_source.on_host(batch).items()})
            if len(group) == self._gradient_accumulation_steps:
                yield group
                group = []

    def _generation_metrics(self, elapsed: float) -> Dict[str, float]:
        """The step's ``on_policy/*`` metrics (none without ``on_policy``); the counts are summed over ranks."""
        source = self._teacher_source
        source = source.inner if isinstance(source, vocabularies.PaddedVocabTeacher) else source
        if not isinstance(source, on_policy.GeneratingTeacher):
            return {}
        counts = source.step_counts()
        if self._step_kind != teacher_source.DATA and self._reduce_sum() is not None:
            counts = self._reduce_sum()(counts.to(self._device)).cpu()
        return on_policy.step_metrics(self._step_kind, counts.tolist(), source.stats, elapsed)

    def _peak_memory(self) -> Dict[str, float]:
        """Data-parallel hook: this process's peak memory since the last call (GiB)."""
        if self._device.type == "cuda":
            return training.get_memory_stats(device=self._device)
        # ru_maxrss is in KiB on Linux.
        return {"peak_memory_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}

    @property
    def stopped_by_signal(self) -> Optional[int]:
        return self._stopped_by

    def _log_metrics(self, values: Dict[str, float], elapsed: float) -> None:
        # Every rank reads its memory (a collective under data parallelism); only rank 0 has a logger.
        memory = self._peak_memory() if self._log_peak_memory_stats else {}
        if self._metric_logger is None:
            return
        metrics = loss_step.log_dict(values, lr=self._optimizer.param_groups[0]["lr"], elapsed=elapsed)
        if self.world_size > 1:
            metrics["tokens_per_second_per_gpu"] = metrics["tokens_per_second"] / self.world_size
        metrics.update(memory)
        self._metric_logger.log_dict(metrics, step=self.global_step)

    def train(self) -> None:
        """One optimiser step per ``gradient_accumulation_steps`` batches; checkpoints at each epoch end, every
        ``save_every_n_steps`` steps and after SIGTERM/SIGINT (then the loop stops: see :attr:`stopped_by_signal`)."""
        if self._compile:
            log.info("torch.compile is enabled: expect a slow first iteration.")
        with self._signals:
            self._profiler.start()
            for curr_epoch in range(self.epochs_run, self.total_epochs):
                if not self._train_epoch(curr_epoch):
                    break
            self._profiler.stop()

    def _train_epoch(self, curr_epoch: int) -> bool:
        """Train one epoch (from a mid-epoch position on resume); False when a signal stopped it."""
        self._dataloader.sampler.set_epoch(curr_epoch)
        first_step = 0
        if self._dataloader_state is not None:
            # Mid-epoch resume: the dataloader continues after the last batch the checkpoint had consumed.
            if training_state.SAMPLER_POSITION in self._dataloader_state:
                position = self._dataloader_state[training_state.SAMPLER_POSITION]
                self._dataloader.sampler.load_state_dict({"yielded": position})
            else:
                self._dataloader.load_state_dict(self._dataloader_state)
            first_step, self._dataloader_state = self._steps_done_in_epoch, None
        pbar = tqdm(
            total=self._steps_per_epoch, initial=first_step, desc=f"epoch {curr_epoch + 1}/{self.total_epochs}",
            disable=not self._is_rank_zero,
        )
        t0, epoch_done, stop = time.perf_counter(), False, None
        for step_in_epoch, batches in enumerate(self._micro_batches(), start=first_step):
            if step_in_epoch >= self._steps_per_epoch:
                break
            profiling_memory = curr_epoch == 0 and self.profiler_profile_memory and self._device.type == "cuda"
            if profiling_memory and step_in_epoch == self.profiler_wait_steps + self.profiler_warmup_steps:
                torch.cuda.memory._record_memory_history()

            self._diagnose = loss_step.diagnostics_due(self.global_step + 1, self._log_every_n_steps, self._diagnostics_every)
            # The step's sequences: the data's, or (on-policy) sampled now, before any token count is taken.
            self._step_kind, batches = teacher_source.prepare_step(self._teacher_source, self.global_step + 1, batches)
            totals, weights = self._accumulate_gradients(batches)
            grad_norm = self._clip_gradients()
            values = loss_step.read_step_values(totals, grad_norm, weights)
            if self._facts.shared_vocab is not None and not self._padding_warned and self._is_rank_zero:
                warning = vocabularies.padding_mass_warning(values.get(vocabularies.PADDING_MASS), self._facts.shared_vocab)
                if warning:
                    log.warning(warning)
                    self._padding_warned = True
            if self._guard.check(values, step=self.global_step + 1, epoch=curr_epoch, last_checkpoint=self._last_checkpoint):
                self._optimizer.step()
                self._weighting.update({c: values[c] for c in loss_weighting.COMPONENTS if c in values})
            self._optimizer.zero_grad(set_to_none=True)
            if self._lr_scheduler is not None:
                self._lr_scheduler.step()
            self.global_step += 1
            if values["label_tokens"] == 0 and self._is_rank_zero:
                log.warning(
                    f"Step {self.global_step}: every label of the step is ignored, so CE and KD are 0 and only IR "
                    "trains; check the dataset's masking (train_on_input) and max_seq_len truncation."
                )

            pbar.update(1)
            pbar.set_description(f"{curr_epoch + 1}|{self.global_step}|Loss: {values['loss']:.4f}")
            if self.global_step % self._log_every_n_steps == 0:
                # Every rank: the generation counts are summed over ranks (only on the steps that log them).
                elapsed = time.perf_counter() - t0
                self._log_metrics({**values, **self._generation_metrics(elapsed=elapsed)}, elapsed=elapsed)
            t0 = time.perf_counter()
            if profiling_memory and step_in_epoch == (
                self.profiler_wait_steps + self.profiler_warmup_steps + self.profiler_active_steps
            ):
                torch.cuda.memory._record_memory_history(enabled=None)
            self._profiler.step()

            epoch_done = step_in_epoch + 1 >= self._steps_per_epoch
            periodic = bool(self._save_every_n_steps) and self.global_step % self._save_every_n_steps == 0
            stop = self._stop_signal()
            if not epoch_done and (periodic or stop is not None):
                self.save_checkpoint(epoch=curr_epoch, steps_in_epoch=step_in_epoch + 1)
            if stop is not None and not epoch_done:
                break
        pbar.close()
        if epoch_done or stop is None:
            self.epochs_run += 1
            self.save_checkpoint(epoch=curr_epoch)
        if stop is not None:
            self._stopped_by = stop
            if self._is_rank_zero:
                self._signals.report(self.global_step, self._last_checkpoint, stop, note=self._signal_exit_note(stop))
            return False
        return True

    # -------------------------------------------------------------- checkpoint

    def save_checkpoint(self, epoch: int, steps_in_epoch: int = 0) -> None:
        """Write a checkpoint (layout: ``torchtune_kd.core.checkpointing``), never with non-finite weights: at an
        epoch end (``steps_in_epoch == 0``) the exports, always (last) the training state resume needs.

        Raises:
            checkpointing.CheckpointError: a weight is NaN/inf (nothing is written), or the save could not be
                written (a read-only folder, a full disk, an entry in the way): the message names the newest complete
                training state, which the atomic writes kept intact.
        """
        end_of_epoch = steps_in_epoch == 0
        # Gathered on every rank (collectives under data parallelism), written by rank 0 only.
        model_state = self._gather_model_state(trainable_only=not end_of_epoch)
        projections = self._gather_projection_state()
        optimizer_state = self._gather_optimizer_state()
        rng = self._rng_state()
        if not self._is_rank_zero:
            return
        trainable = get_adapter_state_dict(model_state) if self._is_lora else model_state
        checkpointing.require_finite(trainable, "the student's weights")
        checkpointing.require_finite(projections or {}, "the projections")
        what = f"epoch {epoch}" if end_of_epoch else f"step {self.global_step} (epoch {epoch}, mid-epoch)"
        state = training_state.TrainingState(
            seed=self.seed,
            epochs_run=self.epochs_run,
            total_epochs=self.total_epochs,
            max_steps_per_epoch=self.max_steps_per_epoch,
            global_step=self.global_step,
            steps_in_epoch=steps_in_epoch,
            # An epoch's data order is fixed by the sampler's seed and the epoch; within it, the loader's state.
            dataloader=None if end_of_epoch else self._dataloader.state_dict(),
            # World-size-independent position (the other recipe resumes from it) and what it assumes.
            samples_in_epoch=steps_in_epoch * self._global_batch,
            global_batch=self._global_batch,
            world_size=self.world_size,
            # The length of the lr schedule this state was trained with (a resume that changes it says so).
            lr_schedule_steps=self._lr_schedule_steps,
            optimizer=optimizer_state,
            trainable=trainable,
            projections=projections,
            layer_pairs=self._facts.layer_pairs,
            settings=self._settings,
            loss_scaling=self._weighting.state_dict(),
            nonfinite_steps=self._guard.skipped,
            rng=rng,
        )
        try:
            path = self._write_checkpoint(epoch if end_of_epoch else None, model_state, projections, state)
        except (OSError, output_folder.OutputFolderError) as err:
            raise checkpointing.save_failure(err, self._output_dir, f"the checkpoint of {what}") from None
        self._last_checkpoint = path.parent
        log.info(f"Saved {what}; training state for resume in {path.parent}.")

    def _write_checkpoint(
        self,
        epoch: Optional[int],
        model_state: Dict[str, torch.Tensor],
        projections: Optional[Dict[str, torch.Tensor]],
        state: training_state.TrainingState,
    ) -> Path:
        """Rank 0's writes of :meth:`save_checkpoint` (``epoch``: the epoch whose end this is, ``None`` mid-epoch):
        each top-level entry is claimed in the output folder's marker before it is written."""
        folder = self._output_folder
        save_projections = bool(projections) and self._save_projections
        folder.claim(*checkpointing.entries_to_claim(
            epoch, lora=self._is_lora, adapter_weights_only=self._save_adapter_weights_only, projections=save_projections,
        ))
        # Leftovers of an interrupted save: at the top only the temporaries of entries the marker lists; inside
        # the recipes' own folders, this module's temporary names.
        folder.remove_temporaries()
        checkpointing.clean_leftovers(*(
            self._output_dir / name for name in ("adapters", checkpointing.TRAINING_STATE_DIR) if folder.owns(name)
        ))
        checkpointing.clean_incomplete_states(self._output_dir)
        if epoch is not None:
            checkpointing.save_student(
                self._checkpointer, model_state, self._output_dir, epoch,
                lora=self._lora, adapter_weights_only=self._save_adapter_weights_only,
            )
            if save_projections:
                checkpointing.save_projections(
                    self._aligner.pairs, projections, self._output_dir / "projections" / f"epoch_{epoch}" / "projections.pt"
                )
        return checkpointing.save_training_state(state, self._output_dir, self.global_step, self._keep_last_n)

    def cleanup(self) -> None:
        for capture in (getattr(self, "_student_capture", None), getattr(self, "_teacher_capture", None)):
            if capture is not None:
                capture.remove()
        if getattr(self, "_metric_logger", None) is not None:
            self._metric_logger.close()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point: ``tune run recipes/knowledge_distillation_single_device.py --config ... [key=value ...]``.

    Problems a user can fix (config, files, an unsafe resume, a diverged run, a save that cannot be written) end the
    process with a plain message and exit status 1 instead of a traceback; a run stopped by SIGTERM/SIGINT exits
    with 128 + the signal number after its checkpoint is written.
    """
    recipe = None
    try:
        recipe = KDRecipeSingleDevice(cfg=cfg)
        recipe.setup(cfg=cfg)
        recipe.train()
    except (preflight.ConfigError, checkpointing.CheckpointError, safety.TrainingDivergedError, teacher_cache.CacheError) as err:
        print(f"\nError: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        if recipe is not None:
            recipe.cleanup()
    if recipe.stopped_by_signal is not None:
        sys.exit(safety.SIGNAL_EXIT_BASE + recipe.stopped_by_signal)


if __name__ == "__main__":
    sys.exit(recipe_main())
