"""Teacher-cache pre-pass: run the teacher once over a distillation config's training data and store its top-k.

Run with the same config as the distillation (teacher model and checkpointer, tokenizer, dataset, ``max_seq_len``,
packing, the KD loss's temperature)::

    tune run recipes/cache_teacher.py --config configs/distillation.yaml teacher_cache.path=cache/teacher_top64 \\
        [teacher_cache.top_k=64] [teacher_cache.dtype=float16] [teacher_cache.samples_per_shard=1024]

then distil from it with ``teacher_cache.path=cache/teacher_top64`` (and ``layer_mapping=null``: the cache holds no
hidden states). The format and what a cache is checked against: ``torchtune_kd.core.teacher_cache``.

The cache folder is this command's output folder (``torchtune_kd.output_folder``, owner ``recipes/cache_teacher.py``):
it is claimed before the teacher loads, each shard and the manifest are claimed before they are written, and only
what the folder's marker lists is ever deleted (a stale cache with ``teacher_cache.overwrite=true``, a damaged shard),
never a file the pre-pass did not write. The manifest records each shard's size and SHA-256.

An interrupted pre-pass resumes when rerun (whole shards are kept; the result is the same); a rerun over a complete
cache verifies every shard's SHA-256 and rewrites any damaged one. With several GPUs,
``tune run --nproc_per_node N recipes/cache_teacher.py ...`` gives each rank every N-th shard (each rank holds a
whole teacher: this is inference, no sharding of weights), and rank 0 writes the manifest when all are done.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torchtune import config, training, utils
from tqdm import tqdm

from torchtune_kd.core import (
    checkpointing, data, fused_output, loss_step, models, preflight, teacher_cache, vocabularies,
)

log = utils.get_logger("INFO")


class TeacherCachePrepass:
    """Writes a teacher cache for a distillation config (see the module docstring).

    Args:
        cfg (DictConfig): the distillation config with ``teacher_cache.path``.

    Raises:
        preflight.ConfigError: every problem of the config, before the teacher loads.
        teacher_cache.CacheError: the folder holds files the pre-pass did not write (refused by the pre-flight, before
            anything is written), or another cache without ``overwrite``.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.world_size, self.rank = self._init_distributed(cfg)
        self._facts = preflight.validate_config(cfg, build_data=True, writing_cache=True)
        for notice in self._facts.notices if self.rank == 0 else []:
            log.warning(f"Notice: {notice}")
        self._cfg = cfg
        self._cache = teacher_cache.settings(cfg.teacher_cache)
        self._top_k = int(self._cache.top_k or teacher_cache.DEFAULTS["top_k"])
        self._padding_mass = [0.0, 0]  # a padded teacher's dropped probability: sum and counted tokens
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        kd_loss, ce_loss = config.instantiate(cfg.kd_loss), config.instantiate(cfg.loss)
        self._temperature = float(getattr(kd_loss, "temperature", 1.0))
        self._ignore_index = int(getattr(ce_loss, "ignore_index", -100))
        self._batch_size = int(self._cache.batch_size or cfg.batch_size)
        self._dataset = self._facts.dataset
        self._collate = data.collate_fn(
            packed=data.is_packed(cfg.dataset, self._dataset), pad_id=self._facts.tokenizer.pad_id,
            ignore_index=self._ignore_index,
        )

    @staticmethod
    def _init_distributed(cfg: DictConfig) -> tuple[int, int]:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if str(cfg.device).startswith("cuda") else "gloo"
            torch.distributed.init_process_group(backend=backend)
        return world_size, int(os.environ.get("RANK", "0"))

    def _barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def run(self) -> None:
        """Fingerprint, claim and prepare the folder, run the teacher over the missing shards, write the manifest."""
        start = time.perf_counter()
        fingerprint, stamps = teacher_cache.fingerprint(
            self._cfg, self._dataset, temperature=self._temperature, ignore_index=self._ignore_index,
            vocab_size=self._facts.kd_vocab, top_k=self._top_k,
        )
        digest = teacher_cache.fingerprint_digest(fingerprint)
        count = len(self._dataset)
        if self.rank == 0:
            # Only rank 0 writes the folder's marker: every shard name is claimed here, before any rank writes one.
            _, damaged = teacher_cache.prepare_folder(self._cache, digest, count)
            if damaged:
                log.warning(f"Rewriting damaged shard(s) of the cache: {', '.join(damaged)}.")
        self._barrier()
        manifest = teacher_cache.read_manifest(self._cache.path)
        if manifest is not None and manifest.get("fingerprint_digest") == digest:
            if self.rank == 0:
                print(f"Teacher cache in {self._cache.path} is complete and current: {teacher_cache.describe(manifest)}")
            return
        done = set(teacher_cache.completed_shards(self._cache, digest, count))
        shards = range(teacher_cache.num_shards(count, self._cache.samples_per_shard))
        todo = [s for s in shards if s % self.world_size == self.rank and s not in done]
        if self.rank == 0 and done:
            log.info(f"Resuming the pre-pass: {len(done)} of {len(shards)} shards are already written.")
        if todo:
            self._teacher = self._build_teacher()
            per_shard = self._cache.samples_per_shard
            items = sum(min(per_shard, count - s * per_shard) for s in todo)
            with tqdm(total=items, desc=f"teacher cache (rank {self.rank})", disable=self.rank != 0) as pbar:
                for shard in todo:
                    self._write_shard(shard, digest, pbar)
        self._barrier()
        if self.rank == 0:
            extra = {"prepass_seconds": time.perf_counter() - start, "world_size": self.world_size}
            if self._facts.shared_vocab is not None and self._padding_mass[1]:
                # This rank's shards: the teacher's probability on its padding rows, dropped by the renormalisation.
                extra["teacher_padding_mass"] = self._padding_mass[0] / self._padding_mass[1]
                print(f"Padded teacher: mean probability on its rows past {self._facts.shared_vocab}: "
                      f"{extra['teacher_padding_mass']:.3g} (dropped; it should be ~0).")
            manifest = teacher_cache.write_manifest(
                self._cache.path, fingerprint_=fingerprint, stamps=stamps, settings_=self._cache, num_items=count,
                extra=extra,
            )
            print(
                f"Teacher cache written to {self._cache.path}: {teacher_cache.describe(manifest)}; pre-pass "
                f"{manifest['prepass_seconds']:.1f} s for the shards written in this run."
            )
            print(f"Train from it with: teacher_cache.path={self._cache.path} layer_mapping=null")

    def _build_teacher(self) -> torch.nn.Module:
        ckpt = config.instantiate(self._cfg.teacher_checkpointer, should_load_recipe_state=False).load_checkpoint()
        teacher = models.build_teacher(
            self._cfg.teacher_model, device=self._device, dtype=self._dtype, state_dict=ckpt[training.MODEL_KEY]
        )
        teacher.set_num_output_chunks(0)
        return teacher

    @torch.no_grad()
    def _write_shard(self, shard: int, digest: str, pbar: tqdm) -> None:
        per_shard = self._cache.samples_per_shard
        first, end = shard * per_shard, min((shard + 1) * per_shard, len(self._dataset))
        rows: List[Dict[str, torch.Tensor]] = []
        hashes: List[int] = []
        # A padded teacher's top-k is that of its distribution on the shared rows, renormalised (core.vocabularies).
        weight = vocabularies.shared_weight(fused_output.output_weight(self._teacher), self._facts.shared_vocab)
        for indices in teacher_cache.iter_shard_batches(first, end, self._batch_size):
            batch = self._collate([self._dataset[i] for i in indices])
            rows_, hashes_ = self._batch_rows(batch, weight)
            rows += rows_
            hashes += hashes_
            pbar.update(len(indices))
        teacher_cache.write_shard(
            self._cache.path, shard, rows, hashes, dtype=self._cache.dtype, digest=digest, first_item=first
        )

    def _batch_rows(self, batch: Dict[str, Any], weight: torch.Tensor) -> tuple[list, list]:
        """Each item's rows (its counted tokens, in order) and hash, from one teacher forward.

        The teacher runs exactly as in the distillation recipe (same collated batch, ``mask`` and ``input_pos`` for
        packs); its output projection is applied per chunk of counted rows, so full logits never exist.
        """
        tokens = batch["tokens"].to(self._device)
        mask, input_pos = batch.get("mask", None), batch.get("input_pos", None)
        with fused_output.hidden_states_out(self._teacher):
            hidden = self._teacher(
                tokens, mask=mask.to(self._device) if mask is not None else None,
                input_pos=input_pos.to(self._device) if input_pos is not None else None,
            )
        labels = loss_step.shift_labels(batch["labels"], self._ignore_index)
        real = batch[loss_step.REAL_TOKENS_KEY]
        if self._facts.shared_vocab is not None:
            full = fused_output.output_weight(self._teacher)
            device_labels = labels.to(self._device)
            self._padding_mass[0] += float(vocabularies.padding_mass_sum_hidden(
                hidden.to(full.dtype), full, self._facts.shared_vocab, device_labels, self._ignore_index
            ))
            self._padding_mass[1] += int((device_labels != self._ignore_index).sum())
        rows, hashes = [], []
        for b in range(tokens.shape[0]):
            positions = (labels[b] != self._ignore_index).nonzero().squeeze(1).to(self._device)
            item_hidden = hidden[b].index_select(0, positions)
            parts = []
            for start in range(0, item_hidden.shape[0], teacher_cache.CHUNK_ROWS):
                # The live recipe's logits: the output projection in the model's dtype, then fp32.
                z = F.linear(item_hidden[start: start + teacher_cache.CHUNK_ROWS].to(weight.dtype), weight).float()
                parts.append({k: v.cpu() for k, v in teacher_cache.topk_rows(z, self._top_k, self._temperature).items()})
            if parts:
                rows.append({key: torch.cat([p[key] for p in parts]) for key in parts[0]})
            else:
                rows.append(self._empty_rows())
            hashes.append(teacher_cache.item_hash(batch["tokens"][b][real[b]], batch["labels"][b][real[b]]))
        return rows, hashes

    def _empty_rows(self) -> Dict[str, torch.Tensor]:
        k = self._top_k
        return {
            "ids": torch.zeros(0, k, dtype=torch.int32), "logprobs": torch.zeros(0, k),
            "log_tail": torch.zeros(0), "entropy": torch.zeros(0),
        }

    def cleanup(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point: ``tune run recipes/cache_teacher.py --config ... teacher_cache.path=DIR [key=value ...]``."""
    prepass = None
    try:
        prepass = TeacherCachePrepass(cfg)
        prepass.run()
    except (preflight.ConfigError, teacher_cache.CacheError, checkpointing.CheckpointError) as err:
        print(f"\nError: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        if prepass is not None:
            prepass.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
