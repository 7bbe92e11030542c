"""Knowledge distillation on one device: a faithful fork of torchtune 0.6.1's ``knowledge_distillation_single_device``.

Run as::

    tune run recipes/knowledge_distillation_single_device.py --config configs/distillation.yaml [key=value ...]

What it keeps from torchtune: LoRA student, frozen teacher from its own checkpointer, chunked output, gradient
accumulation, activation checkpointing, compile, profiler, lr scheduler, metric loggers, end-of-epoch checkpoints
with resume. What it adds or fixes:

- a full fine-tune student (any student whose model has no LoRA adapters);
- exact divergences from ``kd_losses`` (torchtune's ``ForwardKLLoss`` reports the soft cross-entropy);
- gradient accumulation that weights every token equally (0.6.1 backpropagates each micro-batch's *mean* and then
  divides by the step's token count as well);
- layer-to-layer alignment (``layer_mapping``) with learned projections and an IR loss (``kd_alignment``);
- loss weighting: torchtune's ``kd_ratio`` blend, manual or dynamic scales (``kd_scaling``);
- a config pre-flight that rejects bad input before any weights load (``kd_config``);
- per-component metrics (CE, KD, IR per pair, weights, grad norm, tokens/s, peak memory, teacher agreement);
- atomic checkpoints: a clean Hugging Face export per epoch (no adapter or projection files beside the merged
  weights), adapters and projections in their own folders, and a training state that restores everything that
  trains (student trainable weights, projections, optimiser, loss-scaling statistics, RNG).

Only orchestration lives here; each KD idea is an importable module under ``src/``.
"""

from __future__ import annotations

import math
import resource
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torch.optim import Optimizer
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune import config, modules, training, utils
from torchtune.data import padded_collate_packed, padded_collate_sft
from torchtune.datasets import ConcatDataset
from torchtune.modules.peft import (
    get_adapter_params,
    get_adapter_state_dict,
    get_lora_module_names,
    get_merged_lora_ckpt,
    set_trainable_params,
    validate_missing_and_unexpected_for_lora,
)
from torchtune.recipe_interfaces import FTRecipeInterface
from torchtune.training import DummyProfiler, PROFILER_KEY
from tqdm import tqdm

import kd_alignment
import kd_checkpoint
import kd_config
import kd_scaling
import kd_step

log = utils.get_logger("INFO")

# Exit status after a signal-triggered checkpoint: the shell's convention (128 + signal number), so schedulers and
# scripts see that the run stopped early although nothing was lost.
SIGNAL_EXIT_BASE = 128
# Settings compared on resume: a change is reported (see _check_resumed_settings).
RESUME_SETTINGS = ("optimizer", "batch_size", "gradient_accumulation_steps", "kd_loss", "loss_scaling")


class TrainingDivergedError(RuntimeError):
    """A loss component or the gradient norm became NaN/inf; no weights of that step were applied or saved."""


class KDRecipeSingleDevice(FTRecipeInterface):
    """Knowledge distillation of a LoRA or fully fine-tuned student from a frozen teacher on one device.

    The objective per optimiser step is ``w_ce * CE + w_kd * KD + w_ir * IR`` where each component is a mean over
    the step's counted tokens (all micro-batches together) and the weights come from ``kd_scaling.LossWeighting``.

    Args:
        cfg (DictConfig): the recipe config (see ``configs/``), already validated by ``kd_config.validate_config``.

    Raises:
        ValueError: if ``dtype`` is fp16.
    """

    def __init__(self, cfg: DictConfig) -> None:
        # Reject bad input before anything else: the config, its inputs, the data and the output folder.
        self._facts = kd_config.validate_config(cfg, build_data=True)
        output_problems = kd_checkpoint.check_output_dir(
            Path(cfg.output_dir),
            epochs=cfg.epochs,
            resume=bool(cfg.get("resume_from_checkpoint", False)),
            overwrite=bool(cfg.get("overwrite_output_dir", False)),
            inputs=kd_checkpoint.config_input_paths(cfg),
        )
        if output_problems:
            raise kd_config.ConfigError(output_problems)

        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        if self._dtype == torch.float16:
            raise ValueError("fp16 precision is not supported in this recipe. Please use fp32 or bf16.")

        self._output_dir = Path(cfg.output_dir)
        self._log_every_n_steps = cfg.get("log_every_n_steps", 1)
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
        self._clip_grad_norm = cfg.get("clip_grad_norm", None)
        self._projection_lr_multiplier = float(cfg.get("projection_lr_multiplier", 1.0))
        self._save_every_n_steps = cfg.get("save_every_n_steps", None)
        self._keep_last_n = int(cfg.get("keep_last_n", 1))
        self._max_nonfinite_steps = int(cfg.get("max_nonfinite_steps", 0))
        self._nonfinite_steps = 0
        self._steps_done_in_epoch = 0
        self._dataloader_state: Optional[Dict[str, Any]] = None
        self._last_checkpoint: Optional[Path] = None
        self._stop_signal: Optional[int] = None

    # ------------------------------------------------------------------ set-up

    def setup(self, cfg: DictConfig) -> None:
        """Build everything: pre-flight, models, tokenizer, alignment, losses, optimiser, data, scheduler.

        Raises:
            kd_config.ConfigError: a changed layer mapping on resume, or no training state to resume.
            kd_checkpoint.CheckpointError: the training state to resume cannot be loaded safely.
        """
        training_state = self._load_training_state() if self._resume_from_checkpoint else None
        if training_state is None and cfg.get("overwrite_output_dir", False):
            for removed in kd_checkpoint.remove_previous_run(self._output_dir):
                log.info(f"overwrite_output_dir=True: removed the earlier run's {removed}")

        config.log_config(recipe_name="KDRecipeSingleDevice", cfg=cfg)
        for notice in self._facts.notices:
            log.warning(f"Notice: {notice}")

        self._metric_logger = config.instantiate(cfg.metric_logger)
        self._metric_logger.log_config(cfg)

        self._compile = cfg.get("compile", False)
        self._settings = self._resume_settings(cfg)
        if training_state is not None:
            self._check_resumed_settings(cfg, training_state)
            if self.seed != training_state[training.SEED_KEY]:
                # The data order depends on the seed, so the checkpoint's wins before the dataloader is built.
                log.warning(f"Config seed {self.seed} differs from the checkpoint's; using {training_state[training.SEED_KEY]}.")
                self.seed = training_state[training.SEED_KEY]

        student_ckpt = self._load_checkpoint(cfg.checkpointer)
        teacher_ckpt = self._load_teacher_checkpoint(cfg.teacher_checkpointer)

        self._model = self._setup_model(
            cfg_model=cfg.model,
            enable_activation_checkpointing=cfg.get("enable_activation_checkpointing", False),
            compile_model=self._compile,
            base_model_state_dict=student_ckpt[training.MODEL_KEY],
            trainable_state_dict=training_state["trainable"] if training_state else None,
        )
        self._teacher_model = self._setup_teacher_model(cfg.teacher_model, teacher_ckpt[training.MODEL_KEY])
        del student_ckpt, teacher_ckpt

        self._tokenizer = self._facts.tokenizer
        log.info("Tokenizer is initialized from file.")

        self._setup_alignment(cfg)

        self._loss_fn = config.instantiate(cfg.loss)
        self._kd_loss_fn = config.instantiate(cfg.kd_loss)
        self._ignore_index = getattr(self._loss_fn, "ignore_index", -100)
        num_chunks = getattr(self._loss_fn, "num_output_chunks", 0)
        if num_chunks:
            self._model.set_num_output_chunks(num_chunks)
            self._teacher_model.set_num_output_chunks(num_chunks)
        self._ce_token_sum = partial(kd_step.ce_token_sum, ignore_index=self._ignore_index)
        self._kd_token_sum = self._kd_loss_fn.token_sum
        if self._compile:
            self._ce_token_sum, self._kd_token_sum = kd_step.compile_losses(self._ce_token_sum, self._kd_loss_fn)
        log.info(f"Loss is initialized ({type(self._kd_loss_fn).__name__}, output chunks: {num_chunks or 'none'}).")

        scaling_cfg = cfg.get("loss_scaling", None)
        self._weighting = kd_scaling.LossWeighting.from_config(
            OmegaConf.to_container(scaling_cfg, resolve=True) if scaling_cfg is not None else None,
            cfg.get("kd_ratio", 0.5),
        )

        self._optimizer = self._setup_optimizer(cfg.optimizer)

        self._dataloader = self._setup_data(
            self._facts.dataset, packed=self._is_packed(cfg.dataset, self._facts.dataset), shuffle=cfg.shuffle,
            batch_size=cfg.batch_size,
        )
        self._steps_per_epoch = len(self._dataloader) // self._gradient_accumulation_steps
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < self._steps_per_epoch:
            self._steps_per_epoch = self.max_steps_per_epoch

        if training_state is not None:
            self._restore_training_state(training_state)

        self._lr_scheduler = self._setup_lr_scheduler(
            cfg.get("lr_scheduler", None),
            num_training_steps=self.total_epochs * self._steps_per_epoch,
            last_epoch=self.global_step - 1,
        )
        self._profiler = self._setup_profiler(cfg.get(PROFILER_KEY, None))
        self._activations_handling_ctx = training.get_act_offloading_ctx_manager(
            self._model, cfg.get("enable_activation_offloading", False)
        )

    def _load_checkpoint(self, cfg_checkpointer: DictConfig) -> Dict[str, Any]:
        """Load the student's base weights. The training state is ours (see ``save_checkpoint``), not torchtune's."""
        self._checkpointer = config.instantiate(cfg_checkpointer, should_load_recipe_state=False)
        return self._checkpointer.load_checkpoint()

    def _load_teacher_checkpoint(self, cfg_checkpointer: DictConfig) -> Dict[str, Any]:
        teacher_checkpointer = config.instantiate(cfg_checkpointer, should_load_recipe_state=False)
        return teacher_checkpointer.load_checkpoint()

    def _load_training_state(self) -> Dict[str, Any]:
        """The newest complete training state in ``output_dir``, loaded without unpickling code."""
        path = kd_checkpoint.latest_training_state(self._output_dir)
        if path is None:
            raise kd_config.ConfigError(
                [
                    f"resume_from_checkpoint=True but {str(self._output_dir / kd_checkpoint.TRAINING_STATE_DIR)!r} "
                    "holds no training state: run without resuming first, or point output_dir at the run to resume"
                ]
            )
        state = kd_checkpoint.load_training_state(
            path, required_keys=(training.SEED_KEY, training.EPOCHS_KEY, "global_step", training.OPT_KEY, "trainable")
        )
        self._last_checkpoint = path.parent
        log.info(f"Resuming from {path} (epochs run: {state[training.EPOCHS_KEY]}, step {state['global_step']}).")
        return state

    @staticmethod
    def _resume_settings(cfg: DictConfig) -> Dict[str, Any]:
        return {key: OmegaConf.to_container(cfg[key], resolve=True) if isinstance(cfg.get(key), (DictConfig, ListConfig))
                else cfg.get(key) for key in RESUME_SETTINGS}

    def _check_resumed_settings(self, cfg: DictConfig, state: Dict[str, Any]) -> None:
        """Refuse a changed layer mapping; warn about other settings that differ from the checkpoint's."""
        saved_pairs = state.get("layer_pairs")
        pairs = [list(p) for p in self._facts.layer_pairs]
        if saved_pairs is not None and [list(p) for p in saved_pairs] != pairs:
            raise kd_config.ConfigError(
                [
                    f"layer_mapping resolves to {pairs} but the checkpoint in {str(self._output_dir)!r} was trained with "
                    f"{saved_pairs}: its projections and optimiser state belong to those pairs. Resume with the "
                    "checkpoint's layer_mapping, or start a new run (new output_dir)."
                ]
            )
        saved = state.get("settings") or {}
        current = self._resume_settings(cfg)
        uses = {
            "optimizer": "the checkpoint's optimiser state is restored, including its learning rate, betas and weight "
            "decay (PyTorch restores param-group settings); start a new run to change them",
        }
        for key in RESUME_SETTINGS:
            if key in saved:
                message = kd_checkpoint.describe_change(
                    key, saved[key], current[key], used=uses.get(key, "the config's value is used from here on")
                )
                if message:
                    log.warning(message)

    def _restore_training_state(self, state: Dict[str, Any]) -> None:
        """Restore counters, optimiser, projections, loss-scaling statistics, RNG and the dataloader position."""
        self.epochs_run = state[training.EPOCHS_KEY]
        if self.max_steps_per_epoch != state[training.MAX_STEPS_KEY]:
            log.warning("max_steps_per_epoch differs from the checkpoint's; using the checkpoint's value.")
            self.max_steps_per_epoch = state[training.MAX_STEPS_KEY]
            if self.max_steps_per_epoch is not None:
                self._steps_per_epoch = min(self._steps_per_epoch, self.max_steps_per_epoch)
        self.global_step = state["global_step"]
        self._steps_done_in_epoch = state.get("steps_in_epoch", 0)
        self._dataloader_state = state.get("dataloader")
        self._nonfinite_steps = state.get("nonfinite_steps", 0)
        if self._aligner is not None and state.get("projections") is not None:
            self._aligner.projections.load_state_dict(state["projections"])
        self._optimizer.load_state_dict(state[training.OPT_KEY])
        self._weighting.load_state_dict(state["loss_scaling"])
        torch.set_rng_state(state["rng"]["cpu"])
        if self._device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device=self._device)

    def _setup_model(
        self,
        cfg_model: DictConfig,
        enable_activation_checkpointing: bool,
        compile_model: bool,
        base_model_state_dict: Dict[str, Any],
        trainable_state_dict: Optional[Dict[str, Any]] = None,
    ) -> nn.Module:
        """Build the student (LoRA or full), load its weights and make the right parameters trainable."""
        cfg_plain, _ = kd_config.model_config_without_flag(cfg_model)
        with training.set_default_dtype(self._dtype), self._device:
            model = config.instantiate(cfg_plain)

        self.adapter_params = get_adapter_params(model)
        self._is_lora = bool(self.adapter_params)
        if self._is_lora:
            self._lora_rank = cfg_model.lora_rank
            self._lora_alpha = cfg_model.lora_alpha
            self._lora_attn_modules = list(cfg_model.lora_attn_modules)
            self._apply_lora_to_mlp = cfg_model.get("apply_lora_to_mlp", False)
            self._apply_lora_to_output = cfg_model.get("apply_lora_to_output", False)
            self._is_dora = any("magnitude" in k for k in self.adapter_params)
            set_trainable_params(model, self.adapter_params)

        if compile_model:
            training.compile_model(model)
        if enable_activation_checkpointing:
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})

        if self._is_lora:
            base_missing, base_unexpected = model.load_state_dict(base_model_state_dict, strict=False)
            if self._is_dora:
                for module in model.modules():
                    if hasattr(module, "initialize_dora_magnitude"):
                        module.initialize_dora_magnitude()
            lora_missing, lora_unexpected = (None, None)
            if trainable_state_dict:
                lora_missing, lora_unexpected = model.load_state_dict(trainable_state_dict, strict=False)
            validate_missing_and_unexpected_for_lora(
                lora_attn_modules=self._lora_attn_modules,
                apply_lora_to_mlp=self._apply_lora_to_mlp,
                apply_lora_to_output=self._apply_lora_to_output,
                base_missing=base_missing,
                base_unexpected=base_unexpected,
                lora_missing=lora_missing,
                lora_unexpected=lora_unexpected,
            )
            training.validate_expected_param_dtype(self.adapter_params.items(), dtype=self._dtype)
        else:
            model.load_state_dict(trainable_state_dict or base_model_state_dict, strict=True)
            training.validate_expected_param_dtype(model.named_parameters(), dtype=self._dtype)

        kind = "LoRA" if self._is_lora else "full fine-tune"
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info(f"Student ({kind}, {trainable:,} trainable parameters) is initialized with precision {self._dtype}.")
        if self._device.type == "cuda":
            training.log_memory_stats(training.get_memory_stats(device=self._device), message="After student init:")
        return model

    def _setup_teacher_model(self, model_cfg: DictConfig, model_state_dict: Dict[str, Any]) -> nn.Module:
        """Build the frozen teacher: eval mode, no gradients, weights loaded strictly."""
        cfg_plain, _ = kd_config.model_config_without_flag(model_cfg)
        with training.set_default_dtype(self._dtype), self._device:
            model = config.instantiate(cfg_plain)
        model.load_state_dict(model_state_dict)
        # eval() does not disable dropout inside SDPA (pytorch#124464); torchtune's models use none.
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        training.validate_expected_param_dtype(model.named_parameters(), dtype=self._dtype)
        log.info(f"Teacher model is initialized with precision {self._dtype}.")
        if self._device.type == "cuda":
            training.log_memory_stats(training.get_memory_stats(device=self._device), message="After teacher init:")
        return model

    def _setup_alignment(self, cfg: DictConfig) -> None:
        """Hooks on the mapped layers, one projection per pair, and the IR loss (if a layer mapping is set)."""
        self._aligner: Optional[kd_alignment.HiddenStateAligner] = None
        self._student_capture = self._teacher_capture = None
        pairs = self._facts.layer_pairs
        if not pairs:
            return
        ir_loss = config.instantiate(cfg.ir_loss)
        self._aligner = kd_alignment.HiddenStateAligner(
            pairs,
            student_dim=kd_alignment.model_embed_dim(self._model),
            teacher_dim=kd_alignment.model_embed_dim(self._teacher_model),
            ir_loss=ir_loss,
        ).to(device=self._device, dtype=self._dtype)
        self._student_capture = kd_alignment.LayerOutputCapture(
            kd_alignment.decoder_layers(self._model), self._aligner.student_layers
        )
        self._teacher_capture = kd_alignment.LayerOutputCapture(
            kd_alignment.decoder_layers(self._teacher_model), self._aligner.teacher_layers, detach=True
        )
        log.info(
            f"Layer mapping (student -> teacher): {pairs}; projections {self._aligner.student_dim} -> "
            f"{self._aligner.teacher_dim}; IR loss {type(ir_loss).__name__}."
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
            base_lr = float(cfg_optimizer.get("lr", 1e-3))
            groups.append(
                {"params": list(self._aligner.parameters()), "lr": base_lr * self._projection_lr_multiplier}
            )
        optimizer = config.instantiate(cfg_optimizer, groups)
        log.info("Optimizer is initialized.")
        return optimizer

    def _trainable_parameters(self) -> List[torch.nn.Parameter]:
        params = [p for p in self._model.parameters() if p.requires_grad]
        if self._trains_projections:
            params += list(self._aligner.parameters())
        return params

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
        """torchtune's profiler set-up, unchanged: a no-op unless ``profiler.enabled``."""
        if cfg_profiler is None:
            cfg_profiler = DictConfig({"enabled": False})
        if cfg_profiler.get("_component_", None) is None:
            cfg_profiler["_component_"] = "torchtune.training.setup_torch_profiler"
        elif cfg_profiler.get("_component_") != "torchtune.training.setup_torch_profiler":
            raise ValueError(
                f"profiler._component_={cfg_profiler.get('_component_')!r}: only "
                "torchtune.training.setup_torch_profiler is supported"
            )
        profiler, profiler_cfg = config.instantiate(cfg_profiler)
        self.profiler_profile_memory = profiler_cfg.get("profile_memory", False)
        if profiler_cfg["enabled"]:
            self.profiler_wait_steps = profiler_cfg["wait_steps"]
            self.profiler_warmup_steps = profiler_cfg["warmup_steps"]
            self.profiler_active_steps = profiler_cfg["active_steps"]
        return profiler

    @staticmethod
    def _is_packed(cfg_dataset: Union[DictConfig, ListConfig], dataset: Any) -> bool:
        if isinstance(cfg_dataset, ListConfig):
            return bool(getattr(dataset, "packed", False))
        return bool(cfg_dataset.get("packed", False))

    def _setup_data(self, dataset: Any, *, packed: bool, shuffle: bool, batch_size: int) -> StatefulDataLoader:
        """The same sampler and collation as torchtune's recipe, plus a real-token mask from the collator."""
        # torchtune 0.6.1 fixes the sampler's seed at 0; following the run's seed makes seeds differ in data order
        # too (with seed 0 the order is torchtune's).
        sampler = StatefulDistributedSampler(dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=self.seed)
        collate = (
            partial(padded_collate_sft, padding_idx=self._tokenizer.pad_id, ignore_idx=self._ignore_index)
            if not packed
            else padded_collate_packed
        )
        return StatefulDataLoader(
            dataset=dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=partial(
                kd_step.collate_with_real_tokens, collate_fn=collate, packed=packed, ignore_index=self._ignore_index
            ),
            # Dropping the last, smaller batch avoids shape changes (recompiles) with compile.
            drop_last=True,
        )

    # ---------------------------------------------------------------- training

    def _loss_step(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Forward both models on one micro-batch and return the loss components as token sums.

        Args:
            batch (Dict[str, torch.Tensor]): ``tokens``, ``labels`` and ``real_tokens`` ``(bsz, seq_len)``; with
                packing also ``mask`` ``(bsz, seq_len, seq_len)`` and ``input_pos`` ``(bsz, seq_len)``.

        Returns:
            Dict[str, torch.Tensor]: fp32 scalar sums ``ce``, ``kd``, ``ir`` (if aligned) and ``ir/<s>-<t>``, and the
            detached diagnostics ``agree`` and ``teacher_entropy``.
        """
        tokens, labels = batch["tokens"], batch["labels"]
        mask = batch.get("mask", None)
        input_pos = batch.get("input_pos", None)

        with self._activations_handling_ctx:
            logits = self._model(tokens, mask=mask, input_pos=input_pos)
        with torch.no_grad():
            teacher_logits = self._teacher_model(tokens, mask=mask, input_pos=input_pos)

        labels = kd_step.shift_labels(labels, self._ignore_index)
        sums: Dict[str, torch.Tensor] = {}
        sums["ce"] = self._ce_token_sum(logits, labels)
        sums["kd"], _ = self._kd_token_sum(logits, teacher_logits, labels)
        sums["agree"], sums["teacher_entropy"] = kd_step.kd_health_sums(
            logits, teacher_logits, labels, self._ignore_index
        )
        del logits, teacher_logits

        if self._aligner is not None:
            pair_sums, _ = self._aligner.token_sums(
                self._student_capture.pop(), self._teacher_capture.pop(), batch[kd_step.REAL_TOKENS_KEY]
            )
            sums["ir"] = torch.stack(list(pair_sums.values())).sum() / len(pair_sums)
            for name, value in pair_sums.items():
                sums[f"ir/{name}"] = value
        return sums

    def _accumulate_gradients(
        self, batches: List[Dict[str, torch.Tensor]]
    ) -> tuple[Dict[str, torch.Tensor], Dict[str, float]]:
        """Forward and backward every micro-batch of one optimiser step, without a host sync.

        Token counts of the whole step are known (as device tensors) before the first backward, so each micro-batch
        contributes ``sum / total_tokens`` and the accumulated gradient is that of the step's token mean, whatever
        the split into micro-batches. The only sync is the very first step of dynamic scaling, which seeds its
        running magnitudes from the first micro-batch.

        Returns:
            tuple: the step's component means (``loss``, ``ce``, ``kd``, ``ir``, ``ir/<pair>``, ``agree``,
            ``teacher_entropy``) and ``label_tokens`` as detached 0-d tensors, and the weight of each component.
        """
        n_label = torch.stack([kd_step.label_token_count(b["labels"], self._ignore_index) for b in batches]).sum()
        n_real = torch.stack([b[kd_step.REAL_TOKENS_KEY].sum() for b in batches]).sum()
        label_divisor, real_divisor = n_label.clamp(min=1), n_real.clamp(min=1)
        totals: Dict[str, torch.Tensor] = {}
        weights: Optional[Dict[str, float]] = None
        for batch in batches:
            sums = self._loss_step(batch)
            means = {k: v / (real_divisor if k == "ir" or k.startswith("ir/") else label_divisor) for k, v in sums.items()}
            if weights is None:
                # Values are read (a sync) only to seed dynamic scaling on the very first step, scaled up to a step mean.
                weights = self._weighting.weights(
                    kd_step.LazyFloats({c: means[c].detach() * len(batches) for c in kd_scaling.COMPONENTS if c in means})
                )
            objective = sum(weights[c] * means[c] for c in weights if c in means)
            if objective.requires_grad:
                objective.backward()
            for key, value in means.items():
                totals[key] = totals[key] + value.detach() if key in totals else value.detach()
            totals["loss"] = totals["loss"] + objective.detach() if "loss" in totals else objective.detach()
        totals["label_tokens"] = n_label
        return totals, weights or {}

    def _micro_batches(self) -> Iterator[List[Dict[str, torch.Tensor]]]:
        """Group the dataloader's batches into the micro-batches of each optimiser step (on the device)."""
        group: List[Dict[str, torch.Tensor]] = []
        for batch in self._dataloader:
            group.append({k: v.to(self._device) for k, v in batch.items()})
            if len(group) == self._gradient_accumulation_steps:
                yield group
                group = []

    def _peak_memory(self) -> Dict[str, float]:
        if self._device.type == "cuda":
            return training.get_memory_stats(device=self._device)
        # ru_maxrss is in KiB on Linux.
        return {"peak_memory_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}

    def _handle_signal(self, signum: int, frame: Any) -> None:
        """SIGTERM/SIGINT: finish the current optimiser step, then checkpoint and stop (a second Ctrl-C aborts)."""
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._stop_signal = signum
        log.warning(
            f"Received {signal.Signals(signum).name}: finishing the current optimiser step, then saving a resumable "
            "checkpoint (press Ctrl-C again to abort without saving)."
        )

    def _check_finite(self, values: Dict[str, float], epoch: int) -> bool:
        """True if the step may be applied; skip it within ``max_nonfinite_steps`` or stop the run loudly.

        Raises:
            TrainingDivergedError: a non-finite loss component or gradient norm beyond the skip budget.
        """
        bad = {k: values[k] for k in ("loss", "ce", "kd", "ir", "grad_norm") if k in values and not math.isfinite(values[k])}
        if not bad:
            return True
        self._nonfinite_steps += 1
        where = f"step {self.global_step + 1} (epoch {epoch + 1})"
        found = ", ".join(f"{k}={v}" for k, v in bad.items())
        if self._nonfinite_steps > self._max_nonfinite_steps:
            last = str(self._last_checkpoint) if self._last_checkpoint else "none (nothing was saved before this step)"
            raise TrainingDivergedError(
                f"training diverged at {where}: {found}. This step's update was not applied and nothing was saved. "
                f"Last good checkpoint: {last}. Lower the learning rate, set clip_grad_norm, or check the data; "
                f"max_nonfinite_steps=N skips up to N such steps (now {self._max_nonfinite_steps})."
            )
        log.warning(
            f"Skipping {where}: {found} (non-finite step {self._nonfinite_steps} of max_nonfinite_steps="
            f"{self._max_nonfinite_steps}); no update applied."
        )
        return False

    def train(self) -> None:
        """The training loop: one optimiser step per ``gradient_accumulation_steps`` batches.

        Checkpoints at each epoch end, every ``save_every_n_steps`` optimiser steps, and after SIGTERM/SIGINT (then
        the loop stops and :attr:`stopped_by_signal` says which signal).
        """
        if self._compile:
            log.info("torch.compile is enabled: expect a slow first iteration.")
        handled = (signal.SIGTERM, signal.SIGINT)
        previous_handlers = {sig: signal.signal(sig, self._handle_signal) for sig in handled}
        try:
            self._train_epochs()
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)

    @property
    def stopped_by_signal(self) -> Optional[int]:
        return self._stop_signal

    def _train_epochs(self) -> None:
        self._profiler.start()
        for curr_epoch in range(self.epochs_run, self.total_epochs):
            self._dataloader.sampler.set_epoch(curr_epoch)
            first_step = 0
            if self._dataloader_state is not None:
                # Mid-epoch resume: the dataloader continues after the last batch the checkpoint had consumed.
                self._dataloader.load_state_dict(self._dataloader_state)
                first_step, self._dataloader_state = self._steps_done_in_epoch, None
            pbar = tqdm(total=self._steps_per_epoch, initial=first_step, desc=f"epoch {curr_epoch + 1}/{self.total_epochs}")
            t0 = time.perf_counter()
            epoch_done = False
            for step_in_epoch, batches in enumerate(self._micro_batches(), start=first_step):
                if step_in_epoch >= self._steps_per_epoch:
                    break
                profiling_memory = (
                    curr_epoch == 0
                    and self.profiler_profile_memory
                    and self._device.type == "cuda"
                )
                if profiling_memory and step_in_epoch == self.profiler_wait_steps + self.profiler_warmup_steps:
                    torch.cuda.memory._record_memory_history()

                totals, weights = self._accumulate_gradients(batches)
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    self._trainable_parameters(),
                    max_norm=float(self._clip_grad_norm) if self._clip_grad_norm is not None else math.inf,
                )
                # The step's one host sync: every logged value and the finiteness check at once.
                names = [*totals, "grad_norm"]
                stacked = torch.stack([v.float() for v in (*totals.values(), grad_norm.detach())])
                values = dict(zip(names, stacked.tolist()))
                values.update({f"weight/{c}": w for c, w in weights.items()})
                if self._check_finite(values, curr_epoch):
                    self._optimizer.step()
                    self._weighting.update({c: values[c] for c in kd_scaling.COMPONENTS if c in values})
                self._optimizer.zero_grad(set_to_none=True)
                if self._lr_scheduler is not None:
                    self._lr_scheduler.step()
                self.global_step += 1
                if values["label_tokens"] == 0:
                    log.warning(
                        f"Step {self.global_step}: every label of the step is ignored, so CE and KD are 0 and only IR "
                        "trains; check the dataset's masking (train_on_input) and max_seq_len truncation."
                    )

                pbar.update(1)
                pbar.set_description(f"{curr_epoch + 1}|{self.global_step}|Loss: {values['loss']:.4f}")
                if self.global_step % self._log_every_n_steps == 0:
                    self._log_step(values, elapsed=time.perf_counter() - t0)
                t0 = time.perf_counter()

                if profiling_memory and step_in_epoch == (
                    self.profiler_wait_steps + self.profiler_warmup_steps + self.profiler_active_steps
                ):
                    torch.cuda.memory._record_memory_history(enabled=None)
                self._profiler.step()

                epoch_done = step_in_epoch + 1 >= self._steps_per_epoch
                periodic = bool(self._save_every_n_steps) and self.global_step % self._save_every_n_steps == 0
                if not epoch_done and (periodic or self._stop_signal is not None):
                    self.save_checkpoint(epoch=curr_epoch, steps_in_epoch=step_in_epoch + 1)
                if self._stop_signal is not None and not epoch_done:
                    break

            pbar.close()
            if self._stop_signal is not None and not epoch_done:
                self._report_stop()
                break
            self.epochs_run += 1
            self.save_checkpoint(epoch=curr_epoch)
            if self._stop_signal is not None:
                self._report_stop()
                break
        self._profiler.stop()

    def _report_stop(self) -> None:
        log.warning(
            f"Stopped by {signal.Signals(self._stop_signal).name} after step {self.global_step}: resumable checkpoint "
            f"in {self._last_checkpoint}. Resume with the same command plus resume_from_checkpoint=True."
        )

    def _log_step(self, values: Dict[str, float], *, elapsed: float) -> None:
        log_dict: Dict[str, float] = {
            "loss": values["loss"],
            "ce_loss": values["ce"],
            "kd_loss": values["kd"],
            "grad_norm": values["grad_norm"],
            "lr": self._optimizer.param_groups[0]["lr"],
            "tokens_per_second": values["label_tokens"] / max(elapsed, 1e-9),
            # Already means over the step's counted tokens.
            "kd/top1_agreement": values["agree"],
            "kd/teacher_entropy": values["teacher_entropy"],
        }
        if "ir" in values:
            log_dict["ir_loss"] = values["ir"]
            for key, value in values.items():
                if key.startswith("ir/"):
                    log_dict[f"ir_loss/{key[3:]}"] = value
        for key, value in values.items():
            if key.startswith("weight/"):
                log_dict[key] = value
        if self._log_peak_memory_stats:
            log_dict.update(self._peak_memory())
        self._metric_logger.log_dict(log_dict, step=self.global_step)

    # -------------------------------------------------------------- checkpoint

    def save_checkpoint(self, epoch: int, steps_in_epoch: int = 0) -> None:
        """Write a checkpoint, each folder or file atomically, never with non-finite weights.

        At an epoch end (``steps_in_epoch == 0``):

        - ``epoch_{N}/``: the student as a clean Hugging Face model (merged LoRA weights, config, tokenizer files),
          nothing else, so ``lm_eval --model hf`` and transformers load exactly the trained student;
        - ``adapters/epoch_{N}/``: LoRA adapter (PEFT format + torchtune ``.pt``) and its config (LoRA students);
        - ``projections/epoch_{N}/projections.pt``: the learned student->teacher projections (if ``save_projections``).

        Always, written last: ``training_state/step_{S}/recipe_state.pt``, everything ``resume_from_checkpoint``
        needs (trainable weights, projections, optimiser, loss-scaling statistics, RNG, and mid-epoch the
        dataloader position); only the newest ``keep_last_n`` are kept.

        Raises:
            kd_checkpoint.CheckpointError: a weight is NaN/inf (nothing is written).
        """
        kd_checkpoint.clean_leftovers(
            self._output_dir, self._output_dir / "adapters", self._output_dir / kd_checkpoint.TRAINING_STATE_DIR
        )
        kd_checkpoint.clean_incomplete_states(self._output_dir)
        # Copies: the LoRA merge below works in place and must never touch the live model.
        model_state = kd_checkpoint.cpu_copy(self._model.state_dict())
        trainable = get_adapter_state_dict(model_state) if self._is_lora else model_state
        projections = (
            kd_checkpoint.cpu_copy(self._aligner.projections.state_dict()) if self._aligner is not None else None
        )
        kd_checkpoint.require_finite(trainable, "the student's weights")
        kd_checkpoint.require_finite(projections or {}, "the projections")

        end_of_epoch = steps_in_epoch == 0
        if end_of_epoch:
            if self._is_lora:
                if not self._save_adapter_weights_only:
                    merged = get_merged_lora_ckpt(model_state, rank=self._lora_rank, alpha=self._lora_alpha)
                    self._export_hf(merged, epoch)
                self._save_adapter(trainable, epoch)
            else:
                self._export_hf(model_state, epoch)
            if projections and self._save_projections:
                kd_checkpoint.save_projections(
                    self._aligner.pairs, projections, self._output_dir / "projections" / f"epoch_{epoch}" / "projections.pt"
                )

        state = {
            training.SEED_KEY: self.seed,
            training.EPOCHS_KEY: self.epochs_run,
            training.TOTAL_EPOCHS_KEY: self.total_epochs,
            training.MAX_STEPS_KEY: self.max_steps_per_epoch,
            "global_step": self.global_step,
            "steps_in_epoch": steps_in_epoch,
            # The data order of an epoch is fixed by the sampler's seed and the epoch (set_epoch); within an epoch
            # the dataloader's state says how far it got.
            "dataloader": None if end_of_epoch else self._dataloader.state_dict(),
            training.OPT_KEY: self._optimizer.state_dict(),
            "trainable": trainable,
            "projections": projections,
            "layer_pairs": [list(p) for p in self._facts.layer_pairs],
            "settings": self._settings,
            "loss_scaling": self._weighting.state_dict(),
            "nonfinite_steps": self._nonfinite_steps,
            "rng": {
                "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self._device) if self._device.type == "cuda" else None,
            },
        }
        path = kd_checkpoint.save_training_state(state, self._output_dir, self.global_step, self._keep_last_n)
        self._last_checkpoint = path.parent
        what = f"epoch {epoch}" if end_of_epoch else f"step {self.global_step} (epoch {epoch}, mid-epoch)"
        log.info(f"Saved {what}; training state for resume in {path.parent}.")

    def _export_hf(self, state_dict: Dict[str, torch.Tensor], epoch: int) -> None:
        final_dir = kd_checkpoint.export_hf(self._checkpointer, state_dict, self._output_dir, epoch, training.MODEL_KEY)
        log.info(f"Hugging Face model saved to {final_dir}")

    def _save_adapter(self, adapter_state: Dict[str, torch.Tensor], epoch: int) -> None:
        kd_checkpoint.save_peft_adapter(
            adapter_state,
            self._output_dir / "adapters" / f"epoch_{epoch}",
            hf_config=self._checkpointer._config,
            rank=self._lora_rank,
            alpha=self._lora_alpha,
            target_modules=get_lora_module_names(
                self._lora_attn_modules, self._apply_lora_to_mlp, self._apply_lora_to_output
            ),
            base_model=getattr(self._checkpointer, "repo_id", None),
        )

    def cleanup(self) -> None:
        for capture in (getattr(self, "_student_capture", None), getattr(self, "_teacher_capture", None)):
            if capture is not None:
                capture.remove()
        if hasattr(self, "_metric_logger"):
            self._metric_logger.close()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point: ``tune run recipes/knowledge_distillation_single_device.py --config ... [key=value ...]``.

    Problems a user can fix (config, files, an unsafe resume, a diverged run) end the process with a plain message
    and exit status 1 instead of a traceback; a run stopped by SIGTERM/SIGINT exits with 128 + the signal number
    after its checkpoint is written.
    """
    recipe = None
    try:
        recipe = KDRecipeSingleDevice(cfg=cfg)
        recipe.setup(cfg=cfg)
        recipe.train()
    except (kd_config.ConfigError, kd_checkpoint.CheckpointError, TrainingDivergedError) as err:
        print(f"\nError: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        if recipe is not None:
            recipe.cleanup()
    if recipe.stopped_by_signal is not None:
        sys.exit(SIGNAL_EXIT_BASE + recipe.stopped_by_signal)


if __name__ == "__main__":
    sys.exit(recipe_main())
