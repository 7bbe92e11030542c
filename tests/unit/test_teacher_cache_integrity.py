"""A damaged teacher cache is refused by name, never trained on: the row invariants at every lookup, the shard files'
sizes, headers and SHA-256s (in the pre-flight and at first read), the unconditional re-hash of the inputs, and the
pre-pass's output folder (it never deletes or replaces a file it did not write).

Caches here are written by the module's own writer (``prepare_folder`` / ``write_shard`` / ``write_manifest``, as the
pre-pass calls them) from random logits; expectations come from the format (safetensors layout, probabilities) and
are independent of the checks under test.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from torchtune_kd import output_folder
from torchtune_kd.core import loss_step, teacher_cache

VOCAB, K = 50, 6
REBUILD = "tune run recipes/cache_teacher.py"


def _items(count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(count):
        n = 5 + i % 4
        tokens = torch.randint(0, VOCAB, (n,), generator=g)
        labels = tokens.clone()
        labels[0] = -100
        items.append((tokens, labels))
    return items


def _rows(items, k: int, seed: int) -> tuple[list[dict], list[int]]:
    g = torch.Generator().manual_seed(seed)
    rows, hashes = [], []
    for tokens, labels in items:
        shifted = loss_step.shift_labels(labels[None], -100)[0]
        logits = torch.randn(len(tokens), VOCAB, generator=g) * 3
        rows.append(teacher_cache.topk_rows(logits[shifted != -100], k, 1.0))
        hashes.append(teacher_cache.item_hash(tokens, labels))
    return rows, hashes


def make_cache(folder: Path, items, *, k: int = K, dtype: str = "float16", per_shard: int = 3, seed: int = 0,
               overwrite: bool = False, fingerprint: dict | None = None, stamps: dict | None = None,
               stop_after: int | None = None) -> dict | None:
    """Write a cache as the pre-pass does (claim, write the missing shards, the manifest); ``stop_after`` shards:
    an interrupted pre-pass (no manifest). Returns the manifest."""
    fingerprint = fingerprint or {"top_k": k, "temperature": 1.0, "vocab_size": VOCAB, "seed": seed}
    settings = teacher_cache.CacheSettings(folder, k, dtype, per_shard, None, overwrite)
    digest = teacher_cache.fingerprint_digest(fingerprint)
    status, _ = teacher_cache.prepare_folder(settings, digest, len(items))
    if status == "done":
        return teacher_cache.read_manifest(folder)
    done = set(teacher_cache.completed_shards(settings, digest, len(items)))
    for shard in range(teacher_cache.num_shards(len(items), per_shard)):
        if stop_after is not None and shard >= stop_after:
            return None
        if shard in done:
            continue
        chunk = items[shard * per_shard: (shard + 1) * per_shard]
        rows, hashes = _rows(chunk, k, seed * 1000 + shard)
        teacher_cache.write_shard(folder, shard, rows, hashes, dtype=dtype, digest=digest, first_item=shard * per_shard)
    return teacher_cache.write_manifest(folder, fingerprint_=fingerprint, stamps=stamps or {}, settings_=settings,
                                        num_items=len(items), extra={})


def batch_of(items, order):
    """A collated batch of ``order``'s items (padded), as the recipe passes it to ``lookup``."""
    width = max(len(items[i][0]) for i in order)
    tokens = torch.zeros(len(order), width, dtype=torch.long)
    labels = torch.full((len(order), width), -100)
    real = torch.zeros(len(order), width, dtype=torch.bool)
    for b, item in enumerate(order):
        n = len(items[item][0])
        tokens[b, :n], labels[b, :n], real[b, :n] = items[item][0], items[item][1], True
    return torch.tensor(order), loss_step.shift_labels(labels, -100), tokens, real, labels


def rewrite_rows(folder: Path, shard: int, change) -> None:
    """Change a shard's tensors and record the changed file's checksum in the manifest: damage that happened before
    the pre-pass hashed the shard (a bad write, a memory error), which only the row checks can see."""
    path = folder / teacher_cache.shard_name(shard)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = {name: value.clone() for name, value in load_file(path).items()}
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)
    manifest = json.loads((folder / teacher_cache.MANIFEST).read_text())
    manifest["shards"][shard].update(bytes=path.stat().st_size, sha256=teacher_cache.shard_sha256(path))
    (folder / teacher_cache.MANIFEST).write_text(json.dumps(manifest))


def first_row_of(folder: Path, item: int, per_shard: int = 3) -> int:
    offsets = load_file(folder / teacher_cache.shard_name(item // per_shard))["offsets"]
    return int(offsets[item % per_shard])


# ---------------------------------------------------------------------------------------------- row invariants


@pytest.fixture
def cache_and_items(tmp_path):
    items = _items(7)
    make_cache(tmp_path / "c", items)
    return tmp_path / "c", items


def test_a_clean_cache_passes_every_check(cache_and_items):
    folder, items = cache_and_items
    manifest = teacher_cache.read_manifest(folder)
    assert teacher_cache.shard_problems(folder, manifest, checksum=True) == []
    cache = teacher_cache.TeacherCache(folder)
    teacher, _ = cache.lookup(*batch_of(items, [6, 0, 4, 1]))
    assert teacher.shape[0] == 4


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("k", [1, 8, VOCAB])
def test_row_checks_accept_the_rounding_of_each_storage_dtype(dtype, k):
    """Real top-k rows of peaked and flat distributions, stored in each dtype, are all accepted."""
    g = torch.Generator().manual_seed(k)
    for scale in (0.1, 3.0, 30.0):
        rows = teacher_cache.topk_rows(torch.randn(200, VOCAB, generator=g) * scale, k, 1.0)
        stored = rows["logprobs"].to(teacher_cache.DTYPES[dtype])
        assert teacher_cache.row_defect(rows["ids"], stored, rows["log_tail"], rows["entropy"], vocab_size=VOCAB,
                                        dtype=dtype) is None


def _refused_at_lookup(folder: Path, items, order, shard: int, change) -> str:
    rewrite_rows(folder, shard, change)
    cache = teacher_cache.TeacherCache(folder)
    with pytest.raises(teacher_cache.CacheError) as err:
        cache.lookup(*batch_of(items, order))
    return str(err.value)


def test_a_flipped_sign_log_probability_is_refused_naming_the_shard_and_sample(cache_and_items):
    folder, items = cache_and_items
    row = first_row_of(folder, 4) + 2  # sample 4 is in shard 1, its third counted token

    def flip(tensors):
        assert tensors["logprobs"][row, 1] < 0
        tensors["logprobs"][row, 1] = -tensors["logprobs"][row, 1]

    message = _refused_at_lookup(folder, items, [0, 4, 1], 1, flip)
    assert "shard_00001.safetensors" in message and "sample 4 " in message and "counted token 2" in message
    assert "> 0" in message
    assert REBUILD in message and "teacher_cache.overwrite=true" in message


def test_probabilities_that_do_not_sum_to_one_are_refused(cache_and_items):
    folder, items = cache_and_items
    row = first_row_of(folder, 2)

    def shrink(tensors):  # every probability of the row halved: all log-probabilities stay <= 0
        tensors["logprobs"][row] -= math.log(2)
        tensors["log_tail"][row] -= math.log(2)

    message = _refused_at_lookup(folder, items, [2], 0, shrink)
    assert "shard_00000.safetensors" in message and "sample 2 " in message
    assert float(re.search(r"sum to ([0-9.]+)", message).group(1)) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("bad_id", [VOCAB, -1])
def test_an_id_outside_the_vocabulary_is_refused(cache_and_items, bad_id):
    folder, items = cache_and_items
    row = first_row_of(folder, 5) + 1

    def corrupt(tensors):
        tensors["ids"][row, 3] = bad_id

    message = _refused_at_lookup(folder, items, [3, 5], 1, corrupt)
    assert "sample 5 " in message and f"token id {bad_id} is outside the vocabulary [0, {VOCAB})" in message


def test_a_nan_log_probability_is_refused(cache_and_items):
    folder, items = cache_and_items
    row = first_row_of(folder, 0)

    def corrupt(tensors):
        tensors["logprobs"][row, 0] = float("nan")

    assert "NaN" in _refused_at_lookup(folder, items, [0], 0, corrupt)


def test_an_entropy_above_log_vocab_is_refused(cache_and_items):
    folder, items = cache_and_items
    row = first_row_of(folder, 1)

    def corrupt(tensors):
        tensors["entropy"][row] = math.log(VOCAB) + 0.5

    assert "entropy" in _refused_at_lookup(folder, items, [1], 0, corrupt)


def test_ignored_positions_are_not_checked(cache_and_items):
    """Positions without a row hold placeholders (not distributions): a batch of such items still passes."""
    folder, items = cache_and_items
    cache = teacher_cache.TeacherCache(folder)
    ids, labels, tokens, real, unshifted = batch_of(items, [0, 1])
    teacher, entropy = cache.lookup(ids, labels, tokens, real, unshifted)
    assert (entropy[labels == -100] == 0).all()


# ------------------------------------------------------------------------------------------------- shard files


def _damage(path: Path, how: str, sentinel: Path) -> None:
    size = path.stat().st_size
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: size // 2])
    elif how == "junk":
        path.write_bytes(os.urandom(size))
    elif how == "pickle":
        class Unpickled:  # unpickling it would create the sentinel file
            def __reduce__(self):
                return (open, (str(sentinel), "w"))

        path.write_bytes(pickle.dumps({"ids": Unpickled()}, protocol=4))
    elif how == "torch_save":
        torch.save({"ids": torch.zeros(3)}, path)


@pytest.mark.parametrize("how,expected", [
    ("truncated", "truncated"), ("junk", "not a safetensors shard"), ("pickle", "a pickle"),
    ("torch_save", "zip archive"),
])
def test_a_damaged_or_replaced_shard_is_refused_by_the_preflight_check(cache_and_items, tmp_path, how, expected):
    folder, _ = cache_and_items
    sentinel = tmp_path / "unpickled"
    _damage(folder / "shard_00001.safetensors", how, sentinel)
    problems = teacher_cache.shard_problems(folder, teacher_cache.read_manifest(folder))  # the quick default
    assert len(problems) == 1
    assert "shard_00001.safetensors is damaged" in problems[0] and expected in problems[0]
    assert REBUILD in problems[0] and f"teacher_cache.path={folder}" in problems[0]
    assert not sentinel.exists()  # never unpickled


@pytest.mark.parametrize("how", ["truncated", "junk", "pickle"])
def test_a_damaged_shard_is_refused_at_first_read_naming_it(cache_and_items, tmp_path, how):
    """Defence in depth: training reads no shard it has not checked (for a cache damaged after the pre-flight)."""
    folder, items = cache_and_items
    cache = teacher_cache.TeacherCache(folder)
    _damage(folder / "shard_00002.safetensors", how, tmp_path / "unpickled")
    cache.lookup(*batch_of(items, [0, 3]))  # shards 0 and 1 are whole
    with pytest.raises(teacher_cache.CacheError, match="shard_00002.safetensors is damaged"):
        cache.lookup(*batch_of(items, [6]))
    assert not (tmp_path / "unpickled").exists()


def _flip_data_bytes(path: Path) -> None:
    """Random bytes inside the shard's data (its header intact), the size and modification time unchanged."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    (length,) = __import__("struct").unpack("<Q", bytes(data[:8]))
    start = 8 + length
    g = torch.Generator().manual_seed(1)
    for offset in torch.randint(start, len(data), (16,), generator=g).tolist():
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size


def test_random_bytes_inside_a_shard_are_caught_by_its_checksum(cache_and_items):
    folder, items = cache_and_items
    _flip_data_bytes(folder / "shard_00000.safetensors")
    manifest = teacher_cache.read_manifest(folder)
    # The quick pre-flight reads headers only; the full one hashes the shards.
    assert teacher_cache.shard_problems(folder, manifest, checksum=False) == []
    problems = teacher_cache.shard_problems(folder, manifest, checksum=True)
    assert len(problems) == 1 and "shard_00000.safetensors is damaged" in problems[0] and "SHA-256" in problems[0]
    cache = teacher_cache.TeacherCache(folder)
    with pytest.raises(teacher_cache.CacheError, match="shard_00000.safetensors is damaged: its SHA-256 differs"):
        cache.lookup(*batch_of(items, [1]))


def test_a_shard_of_another_cache_is_refused(tmp_path):
    items = _items(6)
    make_cache(tmp_path / "a", items)
    make_cache(tmp_path / "b", items, seed=1)  # other inputs: another fingerprint
    (tmp_path / "a" / "shard_00001.safetensors").write_bytes((tmp_path / "b" / "shard_00001.safetensors").read_bytes())
    problems = teacher_cache.shard_problems(tmp_path / "a", teacher_cache.read_manifest(tmp_path / "a"))
    assert len(problems) == 1 and "shard_00001.safetensors" in problems[0]


def test_a_manifest_naming_files_outside_its_shard_list_is_refused(cache_and_items):
    folder, _ = cache_and_items
    manifest = teacher_cache.read_manifest(folder)
    manifest["shards"][0]["file"] = "../elsewhere.safetensors"
    problems = teacher_cache.shard_problems(folder, manifest)
    assert len(problems) == 1 and "manifest.json is damaged" in problems[0]
    (folder / teacher_cache.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(teacher_cache.CacheError, match="manifest.json is damaged"):
        teacher_cache.TeacherCache(folder)


def test_a_missing_shard_is_named(cache_and_items):
    folder, _ = cache_and_items
    (folder / "shard_00002.safetensors").unlink()
    problems = teacher_cache.shard_problems(folder, teacher_cache.read_manifest(folder))
    assert len(problems) == 1 and "lacks shard_00002.safetensors" in problems[0]


def test_section_problems_name_the_integrity_options():
    problems = teacher_cache.section_problems({"path": "x", "verify": "fast", "rehash_inputs": "yes"}, vocab_size=None)
    text = "\n".join(problems)
    assert "teacher_cache.verify='fast' must be 'quick'" in text and "'full'" in text
    assert "teacher_cache.rehash_inputs='yes' must be true or false" in text
    assert teacher_cache.section_problems({"path": "x", "verify": "full", "rehash_inputs": True}, vocab_size=None) == []
    chosen = teacher_cache.settings({"path": "x", "verify": "full", "rehash_inputs": True})
    assert chosen.verify == "full" and chosen.rehash_inputs is True
    assert teacher_cache.settings({"path": "x"}).verify == "quick"


# ------------------------------------------------------------------ check_cache: the training run's pre-flight


@pytest.fixture
def inputs(tmp_path):
    """A minimal config, dataset and teacher file, and a cache made from them (its fingerprint and file stamps)."""
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "model.safetensors").write_bytes(b"A" * 4096)
    items = _items(5)
    cfg = OmegaConf.create({
        "teacher_model": {"_component_": "builder"},
        "teacher_checkpointer": {"checkpoint_dir": str(teacher), "checkpoint_files": ["model.safetensors"]},
        "tokenizer": {"_component_": "tok", "max_seq_len": 16},
        "dataset": {"_component_": "data"},
        "teacher_cache": {"path": str(tmp_path / "cache")},
    })
    dataset = [{"tokens": tokens.tolist(), "labels": labels.tolist()} for tokens, labels in items]
    fingerprint, stamps = teacher_cache.fingerprint(cfg, dataset, temperature=1.0, ignore_index=-100, vocab_size=VOCAB,
                                                    top_k=K)
    make_cache(tmp_path / "cache", items, fingerprint=fingerprint, stamps=stamps)
    return cfg, dataset, teacher / "model.safetensors"


def check(cfg, dataset, **section):
    cfg = OmegaConf.merge(cfg, {"teacher_cache": section})
    return teacher_cache.check_cache(cfg, dataset, temperature=1.0, ignore_index=-100, vocab_size=VOCAB)


def test_check_cache_passes_a_clean_cache_and_says_what_it_trusted_on_size_and_time(inputs):
    cfg, dataset, weights = inputs
    problems, notices = check(cfg, dataset)
    assert problems == []
    trusted = [n for n in notices if "not re-hashed" in n]
    assert len(trusted) == 1 and str(weights) in trusted[0] and "teacher_cache.rehash_inputs=true" in trusted[0]
    problems, notices = check(cfg, dataset, rehash_inputs=True)
    assert problems == [] and not any("not re-hashed" in n for n in notices)


def test_a_teacher_replaced_with_the_same_size_and_time_is_caught_with_rehash_inputs(inputs):
    cfg, dataset, weights = inputs
    stat = weights.stat()
    weights.write_bytes(b"B" * 4096)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    problems, notices = check(cfg, dataset)
    assert problems == []  # size and time unchanged: trusted, and said so
    assert any("not re-hashed" in n and str(weights) in n for n in notices)
    problems, _ = check(cfg, dataset, rehash_inputs=True)
    assert len(problems) == 1 and "the teacher's weights" in problems[0] and "model.safetensors differ" in problems[0]


def test_check_cache_refuses_a_truncated_shard(inputs, tmp_path):
    cfg, dataset, _ = inputs
    shard = tmp_path / "cache" / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    problems, _ = check(cfg, dataset)
    assert len(problems) == 1 and "shard_00001.safetensors is damaged" in problems[0] and REBUILD in problems[0]


def test_verify_full_refuses_changed_bytes_before_training(inputs, tmp_path):
    cfg, dataset, _ = inputs
    _flip_data_bytes(tmp_path / "cache" / "shard_00000.safetensors")
    assert check(cfg, dataset)[0] == []  # quick: found at first read instead
    problems, _ = check(cfg, dataset, verify="full")
    assert len(problems) == 1 and "shard_00000.safetensors is damaged: its SHA-256 differs" in problems[0]


def test_a_cache_without_checksums_gets_a_notice(inputs, tmp_path):
    cfg, dataset, _ = inputs
    path = tmp_path / "cache" / teacher_cache.MANIFEST
    manifest = json.loads(path.read_text())
    for entry in manifest["shards"]:
        del entry["sha256"]
    path.write_text(json.dumps(manifest))
    problems, notices = check(cfg, dataset, verify="full")
    assert problems == [] and any("records no shard checksums" in n for n in notices)


# ------------------------------------------------------------------------------- the pre-pass's output folder


def test_prepass_refuses_a_folder_holding_a_users_file(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    problems = output_folder.check(folder, owner=teacher_cache.OWNER, option="teacher_cache.path")
    assert problems and "notes.txt" in problems[0]  # what the pre-flight reports before the teacher loads
    with pytest.raises(teacher_cache.CacheError, match="notes.txt.*teacher_cache.overwrite=true"):
        make_cache(folder, _items(4))
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"] and (folder / "notes.txt").read_text() == "mine"


def test_prepass_never_deletes_a_users_file_even_with_overwrite(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    items = _items(7)
    make_cache(folder, items, overwrite=True)  # adopted: writes beside it
    with pytest.raises(teacher_cache.CacheError, match="other inputs or settings"):
        make_cache(folder, items, seed=1)
    make_cache(folder, _items(4), seed=1, overwrite=True)  # replaces its own cache (fewer shards)
    assert (folder / "notes.txt").read_text() == "mine"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [output_folder.MARKER, "manifest.json", "notes.txt", "shard_00000.safetensors",
                     "shard_00001.safetensors"]
    assert teacher_cache.read_manifest(folder)["num_items"] == 4


def test_prepass_never_replaces_a_users_file_under_a_shard_name(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "shard_00001.safetensors").write_text("a user's file")
    with pytest.raises(teacher_cache.CacheError, match="shard_00001.safetensors.*never replaced"):
        make_cache(folder, _items(7), overwrite=True)
    assert (folder / "shard_00001.safetensors").read_text() == "a user's file"
    assert not (folder / "shard_00000.safetensors").exists()  # refused before anything was written


def test_prepass_refuses_another_commands_folder(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / output_folder.MARKER).write_text(json.dumps({"format": 1, "owner": "scripts/prune.py", "written": []}))
    with pytest.raises(teacher_cache.CacheError, match="scripts/prune.py"):
        make_cache(folder, _items(4), overwrite=True)


def test_an_interrupted_prepass_resumes_keeping_its_whole_shards(tmp_path):
    folder, items = tmp_path / "c", _items(7)
    make_cache(folder, items, stop_after=2)
    kept = {name: (folder / name).stat().st_mtime_ns for name in ("shard_00000.safetensors", "shard_00001.safetensors")}
    (folder / ".shard_00002.safetensors.tmp").write_bytes(b"partial")  # a kill during the third write
    (folder / ".notes.tmp").write_text("a user's file that looks like a temporary")
    make_cache(folder, items)
    assert {name: (folder / name).stat().st_mtime_ns for name in kept} == kept
    assert not (folder / ".shard_00002.safetensors.tmp").exists() and (folder / ".notes.tmp").exists()
    straight = make_cache(tmp_path / "straight", items)
    # The same shards (safetensors orders a header's metadata freely, so the bytes and checksums may differ).
    resumed = teacher_cache.read_manifest(folder)["shards"]
    assert [{**e, "sha256": None} for e in resumed] == [{**e, "sha256": None} for e in straight["shards"]]


def test_a_rerun_over_a_complete_cache_writes_nothing(cache_and_items):
    folder, items = cache_and_items
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    make_cache(folder, items)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_a_rerun_rewrites_a_damaged_shard_and_keeps_the_others(cache_and_items):
    folder, items = cache_and_items
    reference = {name: (folder / name).read_bytes() for name in ("shard_00000.safetensors", "shard_00002.safetensors")}
    kept = (folder / "shard_00000.safetensors").stat().st_mtime_ns
    _flip_data_bytes(folder / "shard_00001.safetensors")
    settings = teacher_cache.CacheSettings(folder, K, "float16", 3, None, False)
    manifest = teacher_cache.read_manifest(folder)
    status, damaged = teacher_cache.prepare_folder(settings, manifest["fingerprint_digest"], len(items))
    assert status == "write" and damaged == ["shard_00001.safetensors"]
    assert not (folder / "shard_00001.safetensors").exists() and not (folder / teacher_cache.MANIFEST).exists()
    make_cache(folder, items)
    assert (folder / "shard_00000.safetensors").stat().st_mtime_ns == kept
    assert all((folder / name).read_bytes() == data for name, data in reference.items())
    assert teacher_cache.shard_problems(folder, teacher_cache.read_manifest(folder), checksum=True) == []
