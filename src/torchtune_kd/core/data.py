"""The training dataloader: torchtune's sampler and collation, plus a real-token mask from the collator.

One builder for every recipe: the single-device recipe uses one replica; a distributed recipe passes its rank and
world size. The loader is torchdata's ``StatefulDataLoader``, whose ``state_dict`` records the position inside an
epoch, so a mid-epoch checkpoint resumes exactly where it stopped.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Union

from omegaconf import DictConfig, ListConfig
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune.data import padded_collate_packed, padded_collate_sft

from torchtune_kd.core import loss_step


def is_packed(cfg_dataset: Union[DictConfig, ListConfig], dataset: Any) -> bool:
    """Whether the configured dataset (or list of datasets, concatenated) yields packs."""
    if isinstance(cfg_dataset, ListConfig):
        return bool(getattr(dataset, "packed", False))
    return bool(cfg_dataset.get("packed", False))


def build_dataloader(
    dataset: Any,
    *,
    packed: bool,
    batch_size: int,
    shuffle: bool,
    seed: int,
    pad_id: int,
    ignore_index: int,
    num_replicas: int = 1,
    rank: int = 0,
) -> StatefulDataLoader:
    """A dataloader with torchtune's sampler and collators whose batches also carry ``real_tokens``.

    Args:
        dataset (Any): a map-style torchtune dataset (or ``ConcatDataset``).
        packed (bool): the dataset yields packs (``PackedDataset``).
        batch_size (int): samples per micro-batch (per replica).
        shuffle (bool): shuffle each epoch (the order is fixed by ``seed`` and the epoch).
        seed (int): the sampler's seed. torchtune 0.6.1 fixes it at 0; following the run's seed makes seeds differ
            in data order too (with seed 0 the order is torchtune's).
        pad_id (int): the tokenizer's pad id (unpacked batches are padded with it).
        ignore_index (int): label value of tokens that do not count.
        num_replicas (int): data-parallel world size. Default 1.
        rank (int): this replica's rank. Default 0.
    """
    sampler = StatefulDistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
    collate = (
        padded_collate_packed
        if packed
        else partial(padded_collate_sft, padding_idx=pad_id, ignore_idx=ignore_index)
    )
    return StatefulDataLoader(
        dataset=dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=partial(loss_step.collate_with_real_tokens, collate_fn=collate, packed=packed, ignore_index=ignore_index),
        # Dropping the last, smaller batch avoids shape changes (recompiles) with compile.
        drop_last=True,
    )
