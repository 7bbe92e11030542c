"""The training dataloader: padding and the real-token mask, sample ids, order by seed, replicas, mid-epoch resume."""

from __future__ import annotations

import pickle

import pytest
import torch
from omegaconf import OmegaConf

from torchtune_kd.core import data

PAD, IGNORE = 3, -100


def samples(count: int = 10) -> list[dict]:
    """Unpacked samples of lengths 2..5; sample ``i``'s tokens start with ``100 + i`` so batches show the order."""
    return [{"tokens": [100 + i] + [7] * (1 + i % 4), "labels": [5] * (2 + i % 4)} for i in range(count)]


def loader(dataset, **kwargs) -> torch.utils.data.DataLoader:
    settings = dict(packed=False, batch_size=2, shuffle=False, seed=0, pad_id=PAD, ignore_index=IGNORE)
    return data.build_dataloader(dataset, **{**settings, **kwargs})


def firsts(batches) -> list[int]:
    """The first token of every sample, batch after batch (each sample's own marker)."""
    return [int(t) for batch in batches for t in batch["tokens"][:, 0]]


def test_is_packed_reads_the_section_or_for_a_list_the_concatenated_dataset():
    assert data.is_packed(OmegaConf.create({"packed": True}), dataset=None) is True
    assert data.is_packed(OmegaConf.create({"packed": False}), dataset=None) is False
    assert data.is_packed(OmegaConf.create({"source": "json"}), dataset=None) is False

    class Concat:
        packed = True

    sections = OmegaConf.create([{"packed": False}, {"packed": False}])
    # A list of sections is one ConcatDataset: its own ``packed`` decides, not the sections'.
    assert data.is_packed(sections, Concat()) is True
    assert data.is_packed(sections, object()) is False


def test_each_item_carries_its_index_without_changing_the_wrapped_dataset():
    base = samples(4)
    wrapped = data.WithSampleIds(base)
    assert len(wrapped) == 4
    assert wrapped[2] == {**base[2], data.SAMPLE_ID_KEY: 2}
    assert data.SAMPLE_ID_KEY not in base[2]


class Packs(list):
    """A list of samples that says it is packed, like torchtune's ``PackedDataset``."""

    packed = True


def test_the_wrapper_exposes_the_wrapped_datasets_attributes_and_survives_pickling():
    wrapped = data.WithSampleIds(Packs(samples(3)))
    assert wrapped.packed is True
    with pytest.raises(AttributeError):
        wrapped.no_such_attribute
    # Worker processes receive the dataset pickled; unpickling must not recurse through __getattr__.
    again = pickle.loads(pickle.dumps(wrapped))
    assert again.packed is True and again[1] == wrapped[1]


def test_batches_are_padded_with_the_pad_id_and_mark_the_real_tokens():
    batch = next(iter(loader(samples(2))))
    # Sample 0: 2 tokens, sample 1: 3 tokens; padded to 3.
    assert batch["tokens"].tolist() == [[100, 7, PAD], [101, 7, 7]]
    assert batch["labels"].tolist() == [[5, 5, IGNORE], [5, 5, 5]]
    assert batch["real_tokens"].dtype == torch.bool
    assert batch["real_tokens"].tolist() == [[True, True, False], [True, True, True]]


def test_sample_ids_come_through_as_a_tensor_per_batch():
    batches = list(loader(data.WithSampleIds(samples(6)), batch_size=3, shuffle=True, seed=1))
    for batch in batches:
        assert batch[data.SAMPLE_ID_KEY].shape == (3,)
        assert batch[data.SAMPLE_ID_KEY].tolist() == [t - 100 for t in firsts([batch])]


def test_the_last_smaller_batch_is_dropped():
    # Constant shapes: a compiled model is not recompiled for a last, smaller batch.
    assert len(list(loader(samples(7), batch_size=3))) == 2


def test_order_follows_the_seed_and_is_the_dataset_order_without_shuffling():
    assert firsts(loader(samples(10))) == list(range(100, 110))
    first = firsts(loader(samples(10), shuffle=True, seed=5))
    assert first == firsts(loader(samples(10), shuffle=True, seed=5))
    assert sorted(first) == list(range(100, 110)) and first != list(range(100, 110))
    assert first != firsts(loader(samples(10), shuffle=True, seed=6))


def test_replicas_split_every_epoch_into_disjoint_shares():
    shares = [firsts(loader(samples(8), shuffle=True, seed=3, num_replicas=2, rank=rank)) for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 4
    assert sorted(shares[0] + shares[1]) == list(range(100, 108))


def test_a_loader_restored_mid_epoch_continues_where_the_first_stopped():
    first = loader(samples(10), shuffle=True, seed=2)
    batches = iter(first)
    seen = [next(batches), next(batches)]
    state = first.state_dict()
    rest = list(batches)
    resumed = loader(samples(10), shuffle=True, seed=2)
    resumed.load_state_dict(state)
    assert firsts(list(resumed)) == firsts(rest)
    assert sorted(firsts(seen + rest)) == list(range(100, 110))


def test_a_packs_padding_segment_is_not_real():
    # A pack of max_seq_len 8: samples of 3 and 2 tokens, then PackedDataset's padding segment (id 0, label -100).
    pack = {
        "tokens": torch.tensor([1, 11, 12, 1, 21, 0, 0, 0]),
        "labels": torch.tensor([11, 12, IGNORE, 21, IGNORE, IGNORE, IGNORE, IGNORE]),
        "input_pos": torch.tensor([0, 1, 2, 0, 1, 0, 1, 2]),
        "seq_lens": torch.tensor([3, 2, 3]),
    }
    full = {**pack, "seq_lens": torch.tensor([3, 5])}
    full["tokens"] = torch.tensor([1, 11, 12, 1, 21, 22, 23, 24])
    batch = next(iter(loader([pack, full], packed=True)))
    assert batch["real_tokens"].tolist() == [[True] * 5 + [False] * 3, [True] * 8]
