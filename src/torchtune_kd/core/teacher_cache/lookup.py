"""A training run's side of a cache: checking it against the run's config before anything heavy loads
(:func:`check_cache`), and reading each batch's teacher rows by sample id (:class:`TeacherCache`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

import kd_losses
from torchtune_kd.core.teacher_cache.fingerprinting import fingerprint, item_hash, mismatches, rebuild_hint, teacher_files
from torchtune_kd.core.teacher_cache.rows import row_defect
from torchtune_kd.core.teacher_cache.section import DTYPES, settings
from torchtune_kd.core.teacher_cache.shards import (
    MANIFEST,
    damaged_message,
    manifest_shard_problem,
    read_manifest,
    shard_defect,
    shard_name,
    shard_problems,
)
from torchtune_kd.errors import CacheError


class TeacherCache:
    """Read access to a complete cache: each batch's teacher rows by sample id, checked against the batch.

    Shards are opened when first read: each is then checked whole once (size, header and the SHA-256 the pre-pass
    recorded), and every batch's rows are checked for what a teacher distribution must satisfy (:func:`row_defect`).

    Args:
        path (Path): the cache folder (its manifest must exist).
        ignore_index (int): label value of tokens without a row.

    Raises:
        CacheError: no complete cache in ``path``, or a damaged manifest.
    """

    def __init__(self, path: Path, ignore_index: int = -100) -> None:
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest is None:
            raise CacheError(
                f"teacher_cache.path={str(self.path)!r} holds no complete teacher cache (no {MANIFEST}): run "
                "tune run recipes/cache_teacher.py --config <your config> first"
            )
        problem = manifest_shard_problem(self.path, manifest)
        if problem:
            raise CacheError(problem)
        self.manifest = manifest
        self.k = int(manifest["top_k"])
        self.temperature = float(manifest["temperature"])
        self.samples_per_shard = int(manifest["samples_per_shard"])
        self.num_items = int(manifest["num_items"])
        self.vocab_size: Optional[int] = (manifest.get("fingerprint") or {}).get("vocab_size")
        self.ignore_index = ignore_index
        count = len(manifest["shards"])
        self._shards: list[Any] = [None] * count
        self._offsets: list[Optional[torch.Tensor]] = [None] * count
        self._hashes: list[Optional[torch.Tensor]] = [None] * count

    def _damaged(self, file: str, defect: str) -> CacheError:
        return CacheError(damaged_message(self.path, file, defect))

    def _open(self, shard: int) -> Any:
        """The shard's memory-mapped handle; the first call checks the file whole (it is read once to hash it)."""
        if self._shards[shard] is not None:
            return self._shards[shard]
        from safetensors import safe_open

        entry = self.manifest["shards"][shard]
        path = self.path / entry["file"]
        if not path.is_file():
            raise CacheError(f"teacher_cache.path={str(self.path)!r} lacks {entry['file']}: {rebuild_hint(self.path)}")
        defect = shard_defect(path, shard, digest=self.manifest.get("fingerprint_digest"), entry=entry,
                              dtype=self.manifest["dtype"], top_k=self.k, checksum=True)
        if defect:
            raise self._damaged(entry["file"], defect)
        try:
            handle = safe_open(str(path), framework="pt")
            offsets, hashes = handle.get_tensor("offsets"), handle.get_tensor("item_hash")
            rows = int(handle.get_slice("ids").get_shape()[0])
        except Exception as err:  # safetensors' own errors: the message says what it could not read
            raise self._damaged(entry["file"], f"it cannot be read ({type(err).__name__}: {err})") from None
        if int(offsets[0]) != 0 or int(offsets[-1]) != rows or bool((offsets[1:] < offsets[:-1]).any()):
            raise self._damaged(entry["file"], "its item offsets do not run from 0 up to its row count")
        self._shards[shard], self._offsets[shard], self._hashes[shard] = handle, offsets, hashes
        return handle

    def item_rows(self, item: int) -> dict[str, torch.Tensor]:
        """The cached rows of one dataset item (read from the memory-mapped shard)."""
        if not 0 <= item < self.num_items:
            raise CacheError(f"sample {item} is not in the teacher cache ({self.num_items} items): the dataset changed; rebuild the cache")
        shard, local = divmod(item, self.samples_per_shard)
        handle = self._open(shard)
        start, end = (int(v) for v in self._offsets[shard][local: local + 2])
        return {name: handle.get_slice(name)[start:end] for name in ("ids", "logprobs", "log_tail", "entropy")}

    def lookup(
        self, sample_ids: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor, real_tokens: torch.Tensor,
        unshifted_labels: torch.Tensor,
    ) -> tuple[kd_losses.TeacherTopK, torch.Tensor]:
        """The teacher's top-k distributions and entropies of one batch, on the labels' device.

        Args:
            sample_ids (torch.Tensor): ``(bsz,)`` dataset indices of the batch's items.
            labels (torch.Tensor): ``(bsz, seq_len)`` shifted labels (rows sit where they are not ignored).
            tokens (torch.Tensor): ``(bsz, seq_len)`` input ids, with ``real_tokens`` and ``unshifted_labels`` to
                check each item against the hash it was cached from.
            real_tokens (torch.Tensor): ``(bsz, seq_len)`` bool.
            unshifted_labels (torch.Tensor): ``(bsz, seq_len)`` the collated labels.

        Returns:
            tuple: a :class:`kd_losses.TeacherTopK` ``(bsz, seq_len, k)`` (uniform placeholders at ignored positions)
            and the teacher's entropy ``(bsz, seq_len)`` (0 at ignored positions).

        Raises:
            CacheError: an item's tokens or its number of counted tokens differ from the cache's, or a shard is
                damaged (its checksum at first read, or a row that is no distribution), naming the shard and item.
        """
        bsz, seq_len = labels.shape
        k = self.k
        keep = (labels != self.ignore_index).cpu()
        cpu_tokens, cpu_real, cpu_labels = tokens.cpu(), real_tokens.cpu(), unshifted_labels.cpu()
        items = sample_ids.tolist()
        parts = []
        for b, item in enumerate(items):
            shard, local = divmod(item, self.samples_per_shard)
            if not 0 <= item < self.num_items:
                self.item_rows(item)  # raises with the message
            self._open(shard)
            expected = int(self._hashes[shard][local])
            real = cpu_real[b]
            if item_hash(cpu_tokens[b][real], cpu_labels[b][real]) != expected:
                raise CacheError(
                    f"sample {item}'s tokens differ from the ones the teacher cache in {str(self.path)!r} was made from: "
                    "the dataset or its tokenisation changed; rebuild the cache (recipes/cache_teacher.py with "
                    "teacher_cache.overwrite=true)"
                )
            rows = self.item_rows(item)
            counted = int(keep[b].sum())
            if counted != rows["ids"].shape[0]:
                raise CacheError(
                    f"sample {item} has {counted} counted tokens but the teacher cache holds "
                    f"{rows['ids'].shape[0]}: the data or max_seq_len changed; rebuild the cache"
                )
            parts.append(rows)
        # One vectorised check of the whole batch's rows, on the training device (cheapest there), in the order
        # boolean indexing places them (item by item, token by token).
        device = labels.device
        rows = {
            name: torch.cat([part[name] for part in parts]).to(device)
            for name in ("ids", "logprobs", "log_tail", "entropy")
        }
        bad = row_defect(rows["ids"], rows["logprobs"], rows["log_tail"], rows["entropy"], vocab_size=self.vocab_size,
                         dtype=self.manifest["dtype"])
        if bad is not None:
            row, reason = bad
            ends = torch.tensor([part["ids"].shape[0] for part in parts]).cumsum(0)
            b = int((ends <= row).sum())
            item, first = items[b], int(ends[b - 1]) if b else 0
            shard = item // self.samples_per_shard
            raise self._damaged(
                shard_name(shard),
                f"sample {item} (its counted token {row - first}) holds no teacher distribution: {reason}",
            )
        ids = torch.arange(k, dtype=torch.int32, device=device).expand(bsz, seq_len, k).clone()
        logprobs = torch.zeros(bsz, seq_len, k, dtype=DTYPES[self.manifest["dtype"]], device=device)
        log_tail = torch.zeros(bsz, seq_len, dtype=torch.float32, device=device)
        entropy = torch.zeros(bsz, seq_len, dtype=torch.float32, device=device)
        keep = keep.to(device)
        ids[keep], logprobs[keep], log_tail[keep], entropy[keep] = (
            rows["ids"], rows["logprobs"], rows["log_tail"], rows["entropy"]
        )
        return kd_losses.TeacherTopK(ids, logprobs, log_tail, self.temperature), entropy


def _listing(names: Sequence[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_cache(
    cfg: Mapping[str, Any], dataset: Any, *, temperature: float, ignore_index: int, vocab_size: int,
    config_hint: str = "<your config>",
) -> tuple[list[str], list[str]]:
    """Problems and notices of a training run's ``teacher_cache`` against its config (nothing heavy is loaded).

    Checks the manifest, the fingerprint (see :func:`fingerprint`; files whose size and modification time are the
    recorded ones are not re-hashed unless ``teacher_cache.rehash_inputs``, and a notice names them) and every shard
    file against the manifest (:func:`shard_problems`: sizes and headers, and with ``teacher_cache.verify=full`` the
    SHA-256s), so a missing, truncated, foreign or pickled shard stops the run before any weights load.

    Returns:
        tuple[list[str], list[str]]: problems (missing, incomplete, stale or damaged cache) and notices.
    """
    cache = settings(cfg["teacher_cache"])
    try:
        manifest = read_manifest(cache.path)
    except CacheError as err:
        return [str(err)], []
    if manifest is None:
        return [
            f"teacher_cache.path={str(cache.path)!r} holds no complete teacher cache: run "
            f"tune run recipes/cache_teacher.py --config {config_hint} teacher_cache.path={cache.path} first (or remove "
            "teacher_cache to distil from the live teacher)"
        ], []
    notices = []
    present = all(path.is_file() for path in teacher_files(cfg))
    if not present:
        notices.append(
            "teacher_cache: the teacher's weight files are absent, so the cache's teacher cannot be verified against "
            "them (everything else is)"
        )
    reused: list[Path] = []
    current, _ = fingerprint(
        cfg, dataset, temperature=temperature, ignore_index=ignore_index, vocab_size=vocab_size, top_k=cache.top_k,
        stamps=None if cache.rehash_inputs else manifest.get("file_stamps"), hash_teacher=present, reused=reused,
    )
    if reused:
        notices.append(
            f"teacher_cache: not re-hashed, as their size and modification time are the ones recorded when the cache "
            f"was made: {_listing([str(path) for path in reused])} (a file replaced with the same size and time would "
            "go unnoticed); set teacher_cache.rehash_inputs=true to hash them"
        )
    problems = mismatches(manifest["fingerprint"], current, path=cache.path, config_hint=config_hint)
    problems += shard_problems(cache.path, manifest, checksum=cache.verify == "full", config_hint=config_hint)
    if not all(isinstance(entry, dict) and entry.get("sha256") for entry in manifest.get("shards") or []):
        notices.append(
            f"teacher_cache.path={str(cache.path)!r} records no shard checksums (made by an earlier version): its "
            "shards are checked by size, header and row only; to add them, rebuild it into a new folder (tune run "
            f"recipes/cache_teacher.py --config {config_hint} teacher_cache.path=<new folder>)"
        )
    return problems, notices


def describe(manifest: Mapping[str, Any]) -> str:
    """One line about a cache: items, rows, k, temperature, dtype, size per token and mean tail mass."""
    return (
        f"{manifest['num_items']} items, {manifest['num_rows']} token rows, k={manifest['top_k']}, "
        f"T={manifest['temperature']}, {manifest['dtype']}, {manifest['bytes'] / 2**20:.1f} MiB "
        f"({manifest['bytes_per_token']:.0f} bytes/token), mean teacher mass outside the top k "
        f"{manifest.get('mean_tail_mass', float('nan')):.3f}"
    )
