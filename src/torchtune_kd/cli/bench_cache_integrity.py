"""What the teacher cache's integrity checks cost: SHA-256 of a shard, its size + header check, the per-row checks.

    python scripts/bench_cache_integrity.py                       # one shard of 262,144 tokens at k=64, fp16
    python scripts/bench_cache_integrity.py --tokens 65536 --top-k 256 --dtype float32

Writes one shard of random teacher rows (log-softmax of random logits) with the pre-pass's own writer into a
temporary folder that is removed at the end (nothing else is written), then times each check once per round and
prints the fastest and slowest round: per token and, for the hash, in GiB/s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from torchtune_kd.core import teacher_cache


def measure(tokens: int, top_k: int, vocab: int, dtype: str) -> dict[str, float]:
    """Seconds of each check on one freshly written shard, and its size in bytes."""
    torch.manual_seed(0)
    logprobs = torch.log_softmax(torch.randn(tokens, top_k + 1) * 3, -1)
    rows = {"ids": torch.randint(0, vocab, (tokens, top_k), dtype=torch.int32),
            "logprobs": logprobs[:, :top_k].to(getattr(torch, dtype)), "log_tail": logprobs[:, top_k],
            "entropy": torch.rand(tokens) * 5}
    with tempfile.TemporaryDirectory() as folder:
        size = teacher_cache.write_shard(Path(folder), 0, [rows], [0], dtype=dtype, digest="bench", first_item=0)
        path = Path(folder) / teacher_cache.shard_name(0)
        stamps = [time.perf_counter()]
        teacher_cache.shard_sha256(path)
        stamps.append(time.perf_counter())
        teacher_cache.shard_defect(path, 0, digest="bench")
        stamps.append(time.perf_counter())
        defect = teacher_cache.row_defect(rows["ids"], rows["logprobs"], rows["log_tail"], rows["entropy"],
                                          vocab_size=vocab, dtype=dtype)
        stamps.append(time.perf_counter())
    if defect is not None:
        raise SystemExit(f"error: the row checks refused a valid row: {defect}")
    sha, header, row = (b - a for a, b in zip(stamps, stamps[1:]))
    return {"sha256": sha, "header": header, "rows": row, "bytes": size}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--tokens", type=int, default=262144, help="tokens (rows) in the shard")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=128256, help="vocabulary size (Llama 3's by default)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    for name in ("tokens", "top_k", "vocab", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    if args.top_k > args.vocab:
        parser.error(f"--top-k={args.top_k} must not exceed --vocab={args.vocab}")
    runs = [measure(args.tokens, args.top_k, args.vocab, args.dtype) for _ in range(args.rounds)]
    size = runs[0]["bytes"]
    print(f"one shard of {args.tokens} tokens at k={args.top_k} ({args.dtype}, {size / 2**20:.1f} MiB, "
          f"{size / args.tokens:.0f} bytes/token), {args.rounds} rounds (min-max):")

    def span(key: str, scale: float, unit: str) -> str:
        values = sorted(run[key] * scale for run in runs)
        return f"{values[0]:.3g}-{values[-1]:.3g} {unit}"

    print(f"  SHA-256:        {span('sha256', 1, 's')} per shard, {span('sha256', 1e9 / args.tokens, 'ns')} per token "
          f"({size / max(r['sha256'] for r in runs) / 2**30:.2f}-{size / min(r['sha256'] for r in runs) / 2**30:.2f} GiB/s)")
    print(f"  size + header:  {span('header', 1e3, 'ms')} per shard")
    print(f"  row checks:     {span('rows', 1e9 / args.tokens, 'ns')} per token")
    return 0

