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
import os
import resource
import shutil
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
from torchtune.models import convert_weights
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
import kd_config
import kd_scaling
import kd_step

log = utils.get_logger("INFO")

TRAINING_STATE_DIR = "training_state"
TRAINING_STATE_FILE = "recipe_state.pt"


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """Write ``obj`` to ``path`` so that a crash leaves either the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _replace_dir(staged: Path, final: Path) -> None:
    """Move a fully written folder into place, replacing an older one of the same name."""
    if final.exists():
        trash = final.with_name(f".{final.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(staged, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staged, final)


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
        self._facts: Optional[kd_config.ModelFacts] = None

    # ------------------------------------------------------------------ set-up

    def setup(self, cfg: DictConfig) -> None:
        """Build everything: pre-flight, models, tokenizer, alignment, losses, optimiser, data, scheduler."""
        # Reject bad input before any weights load.
        self._facts = kd_config.validate_config(cfg)
        for notice in self._facts.notices:
            log.info(f"Notice: {notice}")

        self._metric_logger = config.instantiate(cfg.metric_logger)
        self._metric_logger.log_config(cfg)

        self._compile = cfg.get("compile", False)
        training_state = self._load_training_state() if self._resume_from_checkpoint else None
        if training_state is not None and self.seed != training_state[training.SEED_KEY]:
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

        self._tokenizer = config.instantiate(cfg.tokenizer)
        log.info("Tokenizer is initialized from file.")

        self._setup_alignment(cfg)

        self._loss_fn = config.instantiate(cfg.loss)
        self._kd_loss_fn = config.instantiate(cfg.kd_loss)
        if self._compile:
            self._kd_loss_fn = training.compile_loss(self._kd_loss_fn)
        self._ignore_index = getattr(self._loss_fn, "ignore_index", -100)
        num_chunks = getattr(self._loss_fn, "num_output_chunks", 0)
        if num_chunks:
            self._model.set_num_output_chunks(num_chunks)
            self._teacher_model.set_num_output_chunks(num_chunks)
        log.info(f"Loss is initialized ({type(self._kd_loss_fn).__name__}, output chunks: {num_chunks or 'none'}).")

        scaling_cfg = cfg.get("loss_scaling", None)
        self._weighting = kd_scaling.LossWeighting.from_config(
            OmegaConf.to_container(scaling_cfg, resolve=True) if scaling_cfg is not None else None,
            cfg.get("kd_ratio", 0.5),
        )

        self._optimizer = self._setup_optimizer(cfg.optimizer)

        self._dataloader = self._setup_data(
            cfg_dataset=cfg.dataset, shuffle=cfg.shuffle, batch_size=cfg.batch_size
        )
        self._steps_per_epoch = len(self._dataloader) // self._gradient_accumulation_steps
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < self._steps_per_epoch:
            self._steps_per_epoch = self.max_steps_per_epoch
        if self._steps_per_epoch < 1:
            raise ValueError(
                f"batch_size={cfg.batch_size} x gradient_accumulation_steps={self._gradient_accumulation_steps} "
                f"needs more samples than the dataset's {len(self._dataloader) * cfg.batch_size}: lower them"
            )

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
        path = self._output_dir / TRAINING_STATE_DIR / TRAINING_STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"resume_from_checkpoint=True but {path} does not exist: run without resuming first, or point "
                "output_dir at the run to resume"
            )
        state = torch.load(path, map_location="cpu", weights_only=False)
        log.info(f"Resuming from {path} (epochs run: {state[training.EPOCHS_KEY]}).")
        return state

    def _restore_training_state(self, state: Dict[str, Any]) -> None:
        """Restore recipe counters, optimiser, projections, loss-scaling statistics and RNG from ``state``."""
        self.epochs_run = state[training.EPOCHS_KEY]
        if self.max_steps_per_epoch != state[training.MAX_STEPS_KEY]:
            log.warning("max_steps_per_epoch differs from the checkpoint's; using the checkpoint's value.")
            self.max_steps_per_epoch = state[training.MAX_STEPS_KEY]
            if self.max_steps_per_epoch is not None:
                self._steps_per_epoch = min(self._steps_per_epoch, self.max_steps_per_epoch)
        self.global_step = state["global_step"]
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

    def _setup_data(self, cfg_dataset: DictConfig, shuffle: bool, batch_size: int) -> StatefulDataLoader:
        """Map-style dataset(s), the same sampler and collation as torchtune's recipe."""
        if isinstance(cfg_dataset, ListConfig):
            ds = ConcatDataset(datasets=[config.instantiate(c, self._tokenizer) for c in cfg_dataset])
            packed = getattr(ds, "packed", False)
        else:
            ds = config.instantiate(cfg_dataset, self._tokenizer)
            packed = cfg_dataset.get("packed", False)
        # torchtune 0.6.1 fixes the sampler's seed at 0; following the run's seed makes seeds differ in data order
        # too (with seed 0 the order is torchtune's).
        sampler = StatefulDistributedSampler(ds, num_replicas=1, rank=0, shuffle=shuffle, seed=self.seed)
        return StatefulDataLoader(
            dataset=ds,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=(
                partial(padded_collate_sft, padding_idx=self._tokenizer.pad_id, ignore_idx=self._ignore_index)
                if not packed
                else padded_collate_packed
            ),
            # Dropping the last, smaller batch avoids shape changes (recompiles) with compile.
            drop_last=True,
        )

    # ---------------------------------------------------------------- training

    def _loss_step(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Forward both models on one micro-batch and return the loss components as token sums.

        Args:
            batch (Dict[str, torch.Tensor]): ``tokens`` and ``labels`` ``(bsz, seq_len)``; with packing also
                ``mask`` ``(bsz, seq_len, seq_len)`` and ``input_pos`` ``(bsz, seq_len)``.

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
        sums["ce"] = kd_step.ce_token_sum(logits, labels, self._ignore_index)
        sums["kd"], _ = self._kd_loss_fn.token_sum(logits, teacher_logits, labels)
        sums["agree"], sums["teacher_entropy"] = kd_step.kd_health_sums(
            logits, teacher_logits, labels, self._ignore_index
        )
        del logits, teacher_logits

        if self._aligner is not None:
            pair_sums, _ = self._aligner.token_sums(
                self._student_capture.pop(), self._teacher_capture.pop(), self._real_token_mask(tokens)
            )
            sums["ir"] = torch.stack(list(pair_sums.values())).sum() / len(pair_sums)
            for name, value in pair_sums.items():
                sums[f"ir/{name}"] = value
        return sums

    def _real_token_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(bsz, seq_len)`` True at real tokens: the collator pads with the tokenizer's pad id."""
        return tokens != self._tokenizer.pad_id

    def _accumulate_gradients(self, batches: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
        """Forward and backward every micro-batch of one optimiser step.

        Token counts of the whole step are known before the first backward, so each micro-batch contributes
        ``sum / total_tokens`` and the accumulated gradient is that of the step's token mean, whatever the split
        into micro-batches.

        Returns:
            Dict[str, float]: the step's component means, effective weights and diagnostics.
        """
        label_tokens = sum(int((kd_step.shift_labels(b["labels"], self._ignore_index) != self._ignore_index).sum()) for b in batches)
        real_tokens = sum(int(self._real_token_mask(b["tokens"]).sum()) for b in batches)
        n_label = max(label_tokens, 1)
        n_real = max(real_tokens, 1)
        totals: Dict[str, float] = {}
        weights: Optional[Dict[str, float]] = None
        for batch in batches:
            sums = self._loss_step(batch)
            means = {k: v / (n_real if k == "ir" or k.startswith("ir/") else n_label) for k, v in sums.items()}
            if weights is None:
                # Seeds dynamic scaling's running magnitudes on the very first step (scaled up to a step mean).
                weights = self._weighting.weights(
                    {c: float(means[c].detach()) * len(batches) for c in kd_scaling.COMPONENTS if c in means}
                )
            objective = sum(weights[c] * means[c] for c in weights if c in means)
            if objective.requires_grad:
                objective.backward()
            for key, value in means.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach())
            totals["loss"] = totals.get("loss", 0.0) + float(objective.detach())
        self._weighting.update({c: totals[c] for c in kd_scaling.COMPONENTS if c in totals})
        totals["label_tokens"] = float(label_tokens)
        for component, weight in (weights or {}).items():
            totals[f"weight/{component}"] = weight
        return totals

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

    def train(self) -> None:
        """The training loop: one optimiser step per ``gradient_accumulation_steps`` batches."""
        if self._compile:
            log.info("torch.compile is enabled: expect a slow first iteration.")
        self._profiler.start()
        for curr_epoch in range(self.epochs_run, self.total_epochs):
            pbar = tqdm(total=self._steps_per_epoch, desc=f"epoch {curr_epoch + 1}/{self.total_epochs}")
            self._dataloader.sampler.set_epoch(curr_epoch)
            t0 = time.perf_counter()
            for step_in_epoch, batches in enumerate(self._micro_batches()):
                if step_in_epoch >= self._steps_per_epoch:
                    break
                profiling_memory = (
                    curr_epoch == 0
                    and self.profiler_profile_memory
                    and self._device.type == "cuda"
                )
                if profiling_memory and step_in_epoch == self.profiler_wait_steps + self.profiler_warmup_steps:
                    torch.cuda.memory._record_memory_history()

                metrics = self._accumulate_gradients(batches)
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    self._trainable_parameters(),
                    max_norm=float(self._clip_grad_norm) if self._clip_grad_norm is not None else math.inf,
                )
                self._optimizer.step()
                self._optimizer.zero_grad(set_to_none=True)
                if self._lr_scheduler is not None:
                    self._lr_scheduler.step()
                self.global_step += 1

                pbar.update(1)
                pbar.set_description(f"{curr_epoch + 1}|{self.global_step}|Loss: {metrics['loss']:.4f}")
                if self.global_step % self._log_every_n_steps == 0:
                    elapsed = time.perf_counter() - t0
                    self._log_step(metrics, grad_norm=float(grad_norm), elapsed=elapsed)
                t0 = time.perf_counter()

                if profiling_memory and step_in_epoch == (
                    self.profiler_wait_steps + self.profiler_warmup_steps + self.profiler_active_steps
                ):
                    torch.cuda.memory._record_memory_history(enabled=None)
                self._profiler.step()

            pbar.close()
            self.epochs_run += 1
            self.save_checkpoint(epoch=curr_epoch)
        self._profiler.stop()

    def _log_step(self, metrics: Dict[str, float], *, grad_norm: float, elapsed: float) -> None:
        n_label = max(metrics["label_tokens"], 1.0)
        log_dict: Dict[str, float] = {
            "loss": metrics["loss"],
            "ce_loss": metrics["ce"],
            "kd_loss": metrics["kd"],
            "grad_norm": grad_norm,
            "lr": self._optimizer.param_groups[0]["lr"],
            "tokens_per_second": metrics["label_tokens"] / max(elapsed, 1e-9),
            "kd/top1_agreement": metrics["agree"] / n_label,
            "kd/teacher_entropy": metrics["teacher_entropy"],
        }
        if "ir" in metrics:
            log_dict["ir_loss"] = metrics["ir"]
            for key, value in metrics.items():
                if key.startswith("ir/"):
                    log_dict[f"ir_loss/{key[3:]}"] = value
        for key, value in metrics.items():
            if key.startswith("weight/"):
                log_dict[key] = value
        if self._log_peak_memory_stats:
            log_dict.update(self._peak_memory())
        self._metric_logger.log_dict(log_dict, step=self.global_step)

    # -------------------------------------------------------------- checkpoint

    def save_checkpoint(self, epoch: int) -> None:
        """Write this epoch's outputs, each folder or file atomically.

        - ``epoch_{N}/``: the student as a clean Hugging Face model (merged LoRA weights, config, tokenizer files),
          nothing else, so ``lm_eval --model hf`` and transformers load exactly the trained student;
        - ``adapters/epoch_{N}/``: LoRA adapter (PEFT format + torchtune ``.pt``) and its config (LoRA students);
        - ``projections/epoch_{N}/projections.pt``: the learned student->teacher projections (if ``save_projections``);
        - ``training_state/recipe_state.pt``: everything ``resume_from_checkpoint`` needs, written last.
        """
        model_state = {k: v.cpu() for k, v in self._model.state_dict().items()}
        if self._is_lora:
            adapter_state = get_adapter_state_dict(model_state)
            if not self._save_adapter_weights_only:
                merged = get_merged_lora_ckpt(dict(model_state), rank=self._lora_rank, alpha=self._lora_alpha)
                self._export_hf(merged, epoch)
            self._save_adapter(adapter_state, epoch)
            trainable = adapter_state
        else:
            self._export_hf(model_state, epoch)
            trainable = model_state

        projections = None
        if self._aligner is not None:
            projections = {k: v.cpu() for k, v in self._aligner.projections.state_dict().items()}
            if self._save_projections and projections:
                _atomic_torch_save(
                    {"pairs": self._aligner.pairs, "state_dict": projections},
                    self._output_dir / "projections" / f"epoch_{epoch}" / "projections.pt",
                )

        state = {
            training.SEED_KEY: self.seed,
            training.EPOCHS_KEY: self.epochs_run,
            training.TOTAL_EPOCHS_KEY: self.total_epochs,
            training.MAX_STEPS_KEY: self.max_steps_per_epoch,
            "global_step": self.global_step,
            training.OPT_KEY: self._optimizer.state_dict(),
            "trainable": trainable,
            "projections": projections,
            "loss_scaling": self._weighting.state_dict(),
            "rng": {
                "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self._device) if self._device.type == "cuda" else None,
            },
            # The data order of an epoch is fixed by the sampler's seed and the epoch number (set_epoch), and
            # checkpoints are only taken at epoch ends, so no dataloader position needs saving.
        }
        _atomic_torch_save(state, self._output_dir / TRAINING_STATE_DIR / TRAINING_STATE_FILE)
        log.info(f"Saved epoch {epoch} (training state for resume in {self._output_dir / TRAINING_STATE_DIR}).")

    def _export_hf(self, state_dict: Dict[str, torch.Tensor], epoch: int) -> None:
        """Write a Hugging Face model folder via torchtune's checkpointer, staged and then moved into place."""
        staging = self._output_dir / f".staging_epoch_{epoch}"
        shutil.rmtree(staging, ignore_errors=True)
        final_dir = self._output_dir / f"epoch_{epoch}"
        # The checkpointer writes to <its output dir>/epoch_{N}; pointing it at a staging folder makes the export
        # atomic: a crash mid-write never leaves a half-written epoch folder that looks complete.
        original_output_dir = self._checkpointer._output_dir
        self._checkpointer._output_dir = staging
        try:
            self._checkpointer.save_checkpoint({training.MODEL_KEY: state_dict}, epoch=epoch, intermediate_checkpoint=False)
        finally:
            self._checkpointer._output_dir = original_output_dir
        staged = staging / f"epoch_{epoch}"
        # The checkpointer copies every non-weight file of the source folder; adapter files there would make
        # transformers (with peft) apply an adapter on top of merged weights, so they never go into an export.
        for leftover in list(staged.glob("adapter_*")):
            leftover.unlink()
        _replace_dir(staged, final_dir)
        shutil.rmtree(staging, ignore_errors=True)
        log.info(f"Hugging Face model saved to {final_dir}")

    def _save_adapter(self, adapter_state: Dict[str, torch.Tensor], epoch: int) -> None:
        """The LoRA adapter in PEFT format (+ torchtune's ``.pt``) in ``adapters/epoch_{N}/``, never beside merged weights."""
        from safetensors.torch import save_file

        hf_config = self._checkpointer._config
        adapter_config = convert_weights.tune_to_peft_adapter_config(
            adapter_config={
                "r": self._lora_rank,
                "lora_alpha": self._lora_alpha,
                "target_modules": get_lora_module_names(
                    self._lora_attn_modules, self._apply_lora_to_mlp, self._apply_lora_to_output
                ),
                "peft_type": "LORA",
            },
            base_model_name_or_path=getattr(self._checkpointer, "repo_id", None),
        )
        peft_weights = convert_weights.tune_to_peft_adapter_weights(
            dict(adapter_state),
            num_heads=hf_config["num_attention_heads"],
            num_kv_heads=hf_config["num_key_value_heads"],
            dim=hf_config["hidden_size"],
            head_dim=hf_config.get("head_dim", None),
        )
        final_dir = self._output_dir / "adapters" / f"epoch_{epoch}"
        staged = final_dir.with_name(f".{final_dir.name}.staging")
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        torch.save(adapter_state, staged / "adapter_model.pt")
        save_file({k: v.contiguous() for k, v in peft_weights.items()}, staged / "adapter_model.safetensors", metadata={"format": "pt"})
        import json

        (staged / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        _replace_dir(staged, final_dir)

    def cleanup(self) -> None:
        for capture in (self._student_capture, self._teacher_capture):
            if capture is not None:
                capture.remove()
        self._metric_logger.close()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point: ``tune run recipes/knowledge_distillation_single_device.py --config ... [key=value ...]``."""
    config.log_config(recipe_name="KDRecipeSingleDevice", cfg=cfg)
    recipe = KDRecipeSingleDevice(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
