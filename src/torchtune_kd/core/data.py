"""The tokenizer, the dataset and the training dataloader: torchtune's sampler and collation, plus a real-token
mask from the collator.

The tokenizer and dataset are built from their config sections as the recipes use them (a list of datasets becomes
one ``ConcatDataset``); the pre-flight builds them once, explains what fails, and hands them to the recipe.

One dataloader builder for every recipe: the single-device recipe uses one replica; a distributed recipe passes its
rank and world size. The loader is torchdata's ``StatefulDataLoader``, whose ``state_dict`` records the position
inside an epoch, so a mid-epoch checkpoint resumes exactly where it stopped.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional, Sequence, Union

from omegaconf import DictConfig, ListConfig
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune import config as tt_config
from torchtune.data import padded_collate_packed, padded_collate_sft
from torchtune.datasets import ConcatDataset

from torchtune_kd.core import loss_step


def dataset_sections(cfg_dataset: Optional[Union[DictConfig, ListConfig]]) -> list[tuple[str, Any]]:
    """(config key, section) of each dataset: ``dataset``, or ``dataset[i]`` for a list (none when absent)."""
    if isinstance(cfg_dataset, ListConfig):
        return [(f"dataset[{index}]", section) for index, section in enumerate(cfg_dataset)]
    return [("dataset", cfg_dataset)] if cfg_dataset is not None else []


def packed_sections(cfg_dataset: Any) -> list[str]:
    """The config key of each dataset section that sets ``packed: true``."""
    if not isinstance(cfg_dataset, (DictConfig, ListConfig)):
        return []
    return [where for where, ds in dataset_sections(cfg_dataset) if isinstance(ds, DictConfig) and ds.get("packed", False)]


def build_tokenizer(cfg_tokenizer: DictConfig) -> Any:
    """The tokenizer of the ``tokenizer`` section (its builder's own errors propagate)."""
    return tt_config.instantiate(cfg_tokenizer)


def build_dataset(cfg_one: DictConfig, tokenizer: Any) -> Any:
    """One dataset section built with ``tokenizer`` (a ``PackedDataset`` when it says ``packed: true``)."""
    return tt_config.instantiate(cfg_one, tokenizer)


def combine_datasets(cfg_dataset: Union[DictConfig, ListConfig], built: Sequence[Any]) -> Any:
    """The dataset the recipe trains on: the one built, or the ``ConcatDataset`` of a list of sections.

    Raises:
        ValueError: the datasets cannot be concatenated (packed and unpacked mixed).
    """
    if isinstance(cfg_dataset, ListConfig):
        return ConcatDataset(datasets=list(built))
    return built[0]


def is_packed(cfg_dataset: Union[DictConfig, ListConfig], dataset: Any) -> bool:
    """Whether the configured dataset (or list of datasets, concatenated) yields packs."""
    if isinstance(cfg_dataset, ListConfig):
        return bool(getattr(dataset, "packed", False))
    return bool(cfg_dataset.get("packed", False))


SAMPLE_ID_KEY = "sample_id"


class WithSampleIds(Dataset):
    """A map-style dataset whose items also carry their index (``sample_id``), which batches then hold as a
    ``(bsz,)`` tensor: the key a teacher cache is read by, whatever the shuffling and batching."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        item[SAMPLE_ID_KEY] = index
        return item

    def __getattr__(self, name: str) -> Any:
        # Attributes such as ``packed`` are the wrapped dataset's; ``dataset`` itself may not exist yet when unpickled.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def collate_fn(*, packed: bool, pad_id: int, ignore_index: int) -> Callable[[Sequence[dict]], dict]:
    """torchtune's collator for packs or samples, plus the ``real_tokens`` mask (and ``sample_id`` when present)."""
    collate = (
        padded_collate_packed
        if packed
        else partial(padded_collate_sft, padding_idx=pad_id, ignore_idx=ignore_index)
    )
    return partial(loss_step.collate_with_real_tokens, collate_fn=collate, packed=packed, ignore_index=ignore_index)


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
    return StatefulDataLoader(
        dataset=dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn(packed=packed, pad_id=pad_id, ignore_index=ignore_index),
        # Dropping the last, smaller batch avoids shape changes (recompiles) with compile.
        drop_last=True,
    )
