"""Benchmark every chunked divergence against torchtune 0.6.1's chunked forward KL and against full logits.

Each measurement runs in a fresh process (so peak memory is that case's alone): the logits come from an output
projection, ``hidden (tokens, dim) @ weight (vocab, dim)^T``, split into chunks the way torchtune's
``set_num_output_chunks`` does, and forward + backward go through the projection, as in a recipe. Two unchunked
baselines: plain PyTorch (``F.kl_div`` on full logits, autograd; and JSD written the same way) and our ``ForwardKLLoss``
on full logits. The fused rows (``fused_output``: logits, CE and KD chunk by chunk from the hidden states, never the
full logits; CE with weight 0, still computed) are also compared with the plain case of their divergence. Reported per
method: median wall time of forward+backward over ``--repeats`` (after one warm-up) and the peak resident memory
above the process's memory once the inputs exist (``ru_maxrss``), each also as a ratio to torchtune's
``ForwardKLWithChunkedOutputLoss``.

These machines are noisy, so ``--rounds`` repeats the whole sweep (every method once per round, interleaved) and
each ratio is taken against torchtune's time *from the same round*; the table shows the median ratio over rounds
and its range, the memory columns the largest peak seen.

    python scripts/bench_losses.py                      # (2048, 32000) and (1024, 128256), fp32, 8 chunks
    python scripts/bench_losses.py --quick              # a tiny case, for a smoke test

``--json FILE`` names one file: an existing file is never replaced unless ``--overwrite`` is given (checked before
the first measurement), and the report is written beside it and moved into place.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from torchtune_kd import output_file

METHODS = ["torchtune_forward_kl_chunked", "full_logits_torch_kl_div", "full_logits_ours_forward_kl"] + [
    f"ours_{name}_chunked" for name in ("forward_kl", "reverse_kl", "symmetric_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl")
] + ["full_logits_torch_jsd", "ours_fused_forward_kl", "ours_fused_jsd", "output_matmuls_floor"]
PLAIN = "full_logits_torch_kl_div"
# Each measurement runs as `python -m CHILD_MODULE --child ...` (this module), so peak memory is that case's alone.
CHILD_MODULE = "torchtune_kd.cli.bench_losses"
# The plain full-logits case each fused row is compared with: the same divergence, written the obvious way.
PLAIN_OF = {"ours_fused_forward_kl": PLAIN, "ours_fused_jsd": "full_logits_torch_jsd"}


def child(method: str, tokens: int, vocab: int, dim: int, chunks: int, repeats: int, threads: int,
          device: str = "cpu", dtype: str = "fp32", teacher_dim: int = 0) -> dict:
    import resource
    import statistics
    import time

    import torch

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    teacher_dim = teacher_dim or dim
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]

    def make(*shape, scale):
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dt)

    hidden = make(tokens, dim, scale=dim**-0.5).requires_grad_(True)
    student_w = make(vocab, dim, scale=2.0).requires_grad_(True)
    teacher_w = make(vocab, teacher_dim, scale=2.0)
    teacher_hidden = make(tokens, teacher_dim, scale=teacher_dim**-0.5)
    labels = torch.randint(0, vocab, (1, tokens), generator=generator)
    labels[0, ::7] = -100
    labels = labels.to(device)
    cuda = device.startswith("cuda")

    if method == "torchtune_forward_kl_chunked":
        from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss

        loss_fn, chunked = ForwardKLWithChunkedOutputLoss(num_output_chunks=chunks), True
    elif method == "full_logits_torch_kl_div":
        # What one writes without chunking: plain PyTorch on the full logits, autograd for the backward.
        import torch.nn.functional as F

        def loss_fn(student, teacher, labels):
            per_token = F.kl_div(F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1),
                                 log_target=True, reduction="none").sum(-1)
            keep = labels != -100
            return (per_token * keep).sum() / keep.sum().clamp(min=1)

        chunked = False
    elif method == "full_logits_torch_jsd":
        # JSD (λ = 1/2) the obvious way on full logits: log-mixture with logaddexp, F.kl_div, autograd.
        import math

        import torch.nn.functional as F

        def loss_fn(student, teacher, labels):
            s_logp, t_logp = F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1)
            log_m = torch.logaddexp(s_logp + math.log(0.5), t_logp + math.log(0.5))
            per_token = 0.5 * (F.kl_div(log_m, s_logp, log_target=True, reduction="none").sum(-1)
                               + F.kl_div(log_m, t_logp, log_target=True, reduction="none").sum(-1))
            keep = labels != -100
            return (per_token * keep).sum() / keep.sum().clamp(min=1)

        chunked = False
    elif method == "full_logits_ours_forward_kl":
        import kd_losses

        loss_fn, chunked = kd_losses.ForwardKLLoss(), False
    elif method.startswith("ours_fused_"):
        # fused_output: logits, CE and KD chunk by chunk from the hidden states; the logits never exist in full.
        # It computes CE as well (weight 0 here), work the other methods do not do.
        import kd_losses
        from torchtune_kd.core.fused_output import fused_output_token_sums

        divergence = kd_losses.DIVERGENCES[method[len("ours_fused_"):]][0]()
        counted = (labels != -100).sum()

        def fused_step():
            sums = fused_output_token_sums(hidden, student_w, teacher_hidden, teacher_w, labels[0], divergence,
                                           ce_coef=0.0, kd_coef=1.0 / counted, chunk_size=-(-tokens // chunks))
            return sums["objective"]

        loss_fn, chunked = None, None
    elif method == "output_matmuls_floor":
        # Only the matrix products every exact path makes, chunk by chunk: student and teacher logits, and a
        # logits-sized gradient back through the student's output layer (to its input and its weight). No softmax,
        # no loss: the time no divergence implementation can go below at this shape.
        rows = -(-tokens // chunks)

        def fused_step():
            with torch.no_grad():
                grad_w = torch.zeros_like(student_w)
                for start in range(0, tokens, rows):
                    h = hidden[start:start + rows]
                    z = h @ student_w.T
                    z_t = teacher_hidden[start:start + rows] @ teacher_w.T
                    grad = z.sub_(z_t)  # stands in for the logit gradient: same shape, one elementwise pass
                    hidden_grad = grad @ student_w
                    grad_w.addmm_(grad.T, h)
                    del z, z_t, grad, hidden_grad
            return None

        loss_fn, chunked = None, None
    else:
        import kd_losses

        name = method[len("ours_") : -len("_chunked")]
        loss_fn, chunked = kd_losses.DIVERGENCES[name][1](num_output_chunks=chunks), True

    def step() -> float:
        hidden.grad = None
        student_w.grad = None
        start = time.perf_counter()
        if chunked is None:
            loss = fused_step()
            if loss is not None:
                loss.backward()
            elapsed = time.perf_counter() - start
            del loss
            return elapsed
        if chunked:
            s = [h @ student_w.T for h in hidden[None].chunk(chunks, dim=1)]
            with torch.no_grad():
                t = [h @ teacher_w.T for h in teacher_hidden[None].chunk(chunks, dim=1)]
        else:
            s = (hidden @ student_w.T)[None]
            with torch.no_grad():
                t = (teacher_hidden @ teacher_w.T)[None]
        loss = loss_fn(s, t, labels)
        loss.backward()
        elapsed = time.perf_counter() - start
        del s, t, loss
        return elapsed

    def timed() -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if cuda:
        base = torch.cuda.memory_allocated()
        timed()  # warm-up
        torch.cuda.reset_peak_memory_stats()
        times = [timed() for _ in range(repeats)]
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        timed()  # warm-up
        times = [timed() for _ in range(repeats)]
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    return {"method": method, "seconds": statistics.median(times), "peak_mib": peak_mib}


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Measure every method of every case in fresh processes and print the tables (``--child``: one measurement)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog=__doc__.strip().split("\n\n")[-1])
    parser.add_argument("--cases", default="2048x32000,1024x128256", help="comma list of TOKENSxVOCAB")
    parser.add_argument("--dim", type=int, default=512, help="hidden size of the output projection")
    parser.add_argument("--teacher-dim", type=int, default=0, help="the teacher's hidden size (default: --dim)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (peak memory: RSS on CPU, allocated on CUDA)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="sweeps over all methods, interleaved")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--quick", action="store_true", help="one tiny case, one repeat")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write every measurement to this JSON file (an existing file only with --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace the --json file if it exists")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.cases, args.repeats, args.dim = "256x4000", 1, 64

    if args.child:
        method, tokens, vocab = args.child.split(":")
        print(json.dumps(child(method, int(tokens), int(vocab), args.dim, args.chunks, args.repeats, args.threads,
                               args.device, args.dtype, args.teacher_dim)))
        return

    methods = args.methods.split(",")
    baseline = "torchtune_forward_kl_chunked"
    if baseline not in methods:
        parser.error(f"--methods must include {baseline}, the baseline of every ratio")
    if args.json is not None:
        output_file.check_or_exit(args.json, option="--json", overwrite=args.overwrite)
    print(f"{args.dtype}, {args.device}, {args.threads} threads, dim {args.dim}/{args.teacher_dim or args.dim}, "
          f"{args.chunks} chunks, median of {args.repeats} "
          f"forward+backward passes (after a warm-up), each method in a fresh process, {args.rounds} round(s)")
    report: dict[str, list[dict[str, dict]]] = {}
    for case in args.cases.split(","):
        tokens, vocab = (int(x) for x in case.lower().split("x"))
        rounds: list[dict[str, dict]] = []
        report[f"{tokens}x{vocab}"] = rounds
        for _ in range(args.rounds):
            results = {}
            for method in methods:
                out = subprocess.run(
                    [sys.executable, "-m", CHILD_MODULE, "--child", f"{method}:{tokens}:{vocab}", "--dim", str(args.dim),
                     "--teacher-dim", str(args.teacher_dim), "--device", args.device, "--dtype", args.dtype,
                     "--chunks", str(args.chunks), "--repeats", str(args.repeats), "--threads", str(args.threads)],
                    capture_output=True, text=True, check=True,
                )
                results[method] = json.loads(out.stdout.strip().splitlines()[-1])
            rounds.append(results)
        print(f"\n(tokens, vocab) = ({tokens}, {vocab})")
        plain = PLAIN in methods
        print("| method | time (s) | peak memory (MiB) | time / torchtune | (range over rounds) | memory / torchtune |"
              + (" time / plain | memory / plain |" if plain else ""))
        print("|---|---|---|---|---|---|" + ("---|---|" if plain else ""))
        base_peak = max(r[baseline]["peak_mib"] for r in rounds)
        for method in methods:
            reference = PLAIN_OF.get(method, PLAIN) if PLAIN_OF.get(method) in methods else PLAIN
            plain_peak = max(r[reference]["peak_mib"] for r in rounds) if plain else float("nan")
            seconds = statistics.median(r[method]["seconds"] for r in rounds)
            ratios = sorted(r[method]["seconds"] / r[baseline]["seconds"] for r in rounds)
            peak = max(r[method]["peak_mib"] for r in rounds)
            m_ratio = peak / base_peak if base_peak > 0 else float("nan")
            row = (f"| {method} | {seconds:.3f} | {peak:.0f} | {statistics.median(ratios):.2f} | "
                   f"{ratios[0]:.2f}–{ratios[-1]:.2f} | {m_ratio:.2f} |")
            if plain:
                vs_plain = statistics.median(r[method]["seconds"] / r[reference]["seconds"] for r in rounds)
                row += f" {vs_plain:.2f} | {peak / plain_peak if plain_peak > 0 else float('nan'):.2f} |"
            print(row)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "overwrite")}
        output_file.write(args.json, json.dumps({"settings": settings, "cases": report}, indent=1, default=str),
                          option="--json", overwrite=args.overwrite)



if __name__ == "__main__":
    # A measurement's fresh process: ``python -m torchtune_kd.cli.bench_losses --child ...``.
    main()
