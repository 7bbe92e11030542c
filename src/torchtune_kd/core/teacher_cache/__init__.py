"""Teacher cache: the teacher's top-k next-token log-probabilities, computed once and read back by sample id.

``recipes/cache_teacher.py`` runs the teacher over the training data of a distillation config and writes, for every
counted token (a shifted label that is not ``ignore_index``) of every dataset item (a sample, or a pack), the
teacher's ``k`` most probable token ids and their log-probabilities at the loss's temperature, plus the exact log of
the remaining mass (the tail: a ``logsumexp`` over the other logits minus the full log-normaliser, so
``k = vocab`` gives ``-inf`` and the distribution is exact) and the teacher's entropy at T = 1 (the recipe's
diagnostic). A distillation run with ``teacher_cache: {path: DIR}`` then never builds the teacher: each batch's
rows are looked up by the samples' dataset indices, so batch size, shuffling, seeds and gradient accumulation are
free to change.

Layout of ``DIR``::

    .torchtune_kd_outputs.json    the output-folder marker: the entries the pre-pass claimed (and may delete)
    manifest.json                 written last: format, fingerprint (what the cache was made from), each shard's
                                  size and SHA-256, totals
    shard_00000.safetensors       items [0, S), S = samples_per_shard; memory-mapped when read
    shard_00001.safetensors       ...

Each shard holds ``ids`` ``(rows, k)`` int32, ``logprobs`` ``(rows, k)`` (fp16 by default), ``log_tail`` and
``entropy`` ``(rows,)`` fp32, ``offsets`` ``(items + 1,)`` int64 (item ``i``'s rows are
``offsets[i]:offsets[i + 1]``, in token order) and ``item_hash`` ``(items,)`` int64 (a hash of the item's real tokens
and labels, checked at every lookup). Shards are written to a temporary name and renamed, so an interrupted pre-pass
leaves only whole shards, and a rerun continues with the missing ones (the result is identical: a shard's batches
never cross its boundary). The folder is the pre-pass's output folder (:mod:`torchtune_kd.output_folder`, owner
:data:`OWNER`): it writes, replaces and deletes only the entries its marker lists.

Integrity: the manifest records each shard's size and SHA-256. The training pre-flight checks every shard's size and
safetensors header against the manifest before any weights load (``teacher_cache.verify=full``: also the SHA-256);
a shard's SHA-256 is checked when training first reads it; and every looked-up row is checked for what a teacher
distribution must satisfy (:func:`row_defect`), so a damaged shard is refused by name instead of training silently.

The fingerprint names everything the cache depends on: the teacher (builder and a SHA-256 of each weight file), the
tokenizer (its settings and files), ``max_seq_len``, the dataset (its config, a SHA-256 of local data files, the item
count and the tokens of evenly spaced items), ``ignore_index``, the vocabulary size, ``k`` and the temperature. A
distillation run compares it with its own config before anything heavy happens and names what differs.

Modules: :mod:`.section` (the config section), :mod:`.fingerprinting` (what a cache was made from), :mod:`.rows` (the
stored rows and their check), :mod:`.shards` (manifest, shard files and their integrity), :mod:`.prepass` (the
pre-pass's folder and writes), :mod:`.lookup` (a training run's checks and reads). Every name below is importable from
this package (``teacher_cache.TeacherCache``), as the recipes use them.
"""

from torchtune_kd.core.teacher_cache.fingerprinting import (
    FINGERPRINT_ITEMS,
    file_sha256,
    fingerprint,
    fingerprint_digest,
    item_hash,
    mismatches,
    rebuild_hint,
    teacher_files,
)
from torchtune_kd.core.teacher_cache.lookup import TeacherCache, check_cache, describe
from torchtune_kd.core.teacher_cache.prepass import (
    OWNER,
    completed_shards,
    iter_shard_batches,
    prepare_folder,
    write_manifest,
    write_shard,
)
from torchtune_kd.core.teacher_cache.rows import (
    CHUNK_ROWS,
    ENTROPY_SLACK,
    LOGPROB_SLACK,
    row_defect,
    sum_tolerance,
    topk_rows,
)
from torchtune_kd.core.teacher_cache.section import (
    DEFAULTS,
    DTYPES,
    KEYS,
    VERIFY_MODES,
    CacheSettings,
    section_problems,
    settings,
)
from torchtune_kd.core.teacher_cache.shards import (
    FORMAT_VERSION,
    MANIFEST,
    SHARD_PREFIX,
    SHARD_SUFFIX,
    damaged_message,
    manifest_shard_problem,
    num_shards,
    read_manifest,
    shard_defect,
    shard_name,
    shard_problems,
    shard_sha256,
)
from torchtune_kd.errors import CacheError

__all__ = [
    "CHUNK_ROWS", "CacheError", "CacheSettings", "DEFAULTS", "DTYPES", "ENTROPY_SLACK", "FINGERPRINT_ITEMS",
    "FORMAT_VERSION", "KEYS", "LOGPROB_SLACK", "MANIFEST", "OWNER", "SHARD_PREFIX", "SHARD_SUFFIX", "TeacherCache",
    "VERIFY_MODES", "check_cache", "completed_shards", "damaged_message", "describe", "file_sha256", "fingerprint",
    "fingerprint_digest", "item_hash", "iter_shard_batches", "manifest_shard_problem", "mismatches", "num_shards",
    "prepare_folder", "read_manifest", "rebuild_hint", "row_defect", "section_problems", "settings", "shard_defect",
    "shard_name", "shard_problems", "shard_sha256", "sum_tolerance", "teacher_files", "topk_rows", "write_manifest",
    "write_shard",
]
