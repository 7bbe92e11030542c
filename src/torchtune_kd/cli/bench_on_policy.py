"""On-policy distillation benchmark: where an on-policy step's time goes, with ratios from one run.

Two measurements, each against its baseline in the same process, interleaved over ``--rounds``:

1. **Generation**: ``core.on_policy.sample_continuations`` (batched, KV caches) against a sampling loop without a
   cache (each new token re-runs the whole left-padded batch), on a SmolLM2-135M-shaped student cut to
   ``--layers`` layers (random weights: the cost does not depend on them; ``--model-dir`` loads a real folder from
   ``scripts/prepare_smollm2.py`` instead). Greedy decoding, no stop token, so both produce every token and must
   produce the same ones (checked). Reported: generated tokens/s of each and the ratio.
2. **Step split**: the recipe (in-process, the tiny stand-ins at ``--vocab`` with a 2-layer student and a 4-layer
   teacher as in ``scripts/bench_recipe.py``) on the same data for ``--steps`` steps, once off-policy
   (``on_policy.fraction=0``) and once on-policy (``fraction=1``, ``--new-tokens`` new tokens): per step, the seconds
   spent generating, in the teacher's scoring forward and in the student's forward + backward (the rest of the
   step), the counted tokens, and the on-policy step's time as a ratio to the off-policy step's, per step and per
   counted token.

    python scripts/bench_on_policy.py                     # both, defaults (about 6 minutes on 2 CPU cores)
    python scripts/bench_on_policy.py --only generation --new-tokens 128 --batch-size 4

Every file goes under ``--workdir`` (default ``cache/bench_on_policy``), which must be new, empty, or a folder this
script wrote; ``--json FILE`` is never replaced unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from torchtune_kd import output_file, output_folder
from torchtune_kd.cli import checkout_dir

OWNER = "scripts/bench_on_policy.py"


# ------------------------------------------------------------------------------------------------ 1. generation


@torch.no_grad()
def sample_without_cache(model: torch.nn.Module, prompts: Sequence[torch.Tensor], max_new_tokens: int,
                         pad_id: int) -> torch.Tensor:
    """Greedy continuations without a KV cache: every step runs the whole left-padded batch so far (the baseline)."""
    from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask

    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    real = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = prompt
        real[row, width - len(prompt):] = True
    model.eval()
    out = []
    for _ in range(max_new_tokens):
        mask = get_causal_mask_from_padding_mask(real)
        logits = model(tokens, mask=mask, input_pos=get_position_ids_from_padding_mask(real))
        token = logits[:, -1].argmax(-1)
        out.append(token)
        tokens = torch.cat((tokens, token[:, None]), dim=1)
        real = torch.cat((real, torch.ones_like(real[:, :1])), dim=1)
    return torch.stack(out, dim=1)


def student_model(layers: int, model_dir: Optional[Path]) -> torch.nn.Module:
    """The SmolLM2-135M-shaped student: ``--layers`` layers of random weights, or a folder's real ones."""
    from torchtune_kd.models import smollm2

    if model_dir is not None:
        return smollm2.load_torchtune_model(model_dir)
    torch.manual_seed(0)
    return smollm2.smollm2_135m(num_layers=layers)


def bench_generation(args: argparse.Namespace) -> dict[str, Any]:
    from torchtune_kd.core import on_policy

    model = student_model(args.layers, args.model_dir)
    model.set_num_output_chunks(0)
    vocab = model.tok_embeddings.num_embeddings
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (args.batch_size,), generator=gen).tolist()
    prompts = [torch.randint(1, vocab, (n,), generator=gen) for n in lengths]
    rows = []
    for index in range(args.rounds):
        started = time.perf_counter()
        cached = on_policy.sample_continuations(
            model, prompts, max_new_tokens=args.new_tokens, temperature=1.0, top_k=1, top_p=1.0, stop_tokens=[],
            pad_id=0, generator=torch.Generator(), dtype=torch.float32,
        )
        cached_s = time.perf_counter() - started
        started = time.perf_counter()
        plain = sample_without_cache(model, prompts, args.new_tokens, pad_id=0)
        plain_s = time.perf_counter() - started
        agree = float((plain == cached.tokens).float().mean())
        tokens = args.batch_size * args.new_tokens
        rows.append({"kv_cache_tokens_per_second": tokens / cached_s, "no_cache_tokens_per_second": tokens / plain_s,
                     "ratio": plain_s / cached_s, "same_tokens": agree})
        print(f"generation round {index + 1}: {rows[-1]}", flush=True)
    summary = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    return {"prompt_lengths": lengths, "rounds": rows, "summary": summary}


# ------------------------------------------------------------------------------------------------ 2. step split


def timed_recipe(module: Any) -> type:
    """The recipe, recording per optimiser step the generation, teacher-scoring and training seconds."""
    from torchtune_kd.core import loss_step, on_policy

    class Timed(module.KDRecipeSingleDevice):
        def setup(self, cfg: Any) -> None:
            super().setup(cfg)
            self.step_times: list[dict[str, float]] = []
            source = self._teacher_source
            live = source.teacher if isinstance(source, on_policy.GeneratingTeacher) else source
            signal: Callable = live.signal

            def timed_signal(*a: Any, **k: Any) -> Any:
                started = time.perf_counter()
                result = signal(*a, **k)
                self._score_seconds += time.perf_counter() - started
                return result

            live.signal = timed_signal

        def _accumulate_gradients(self, batches: list) -> tuple:
            self._score_seconds = 0.0
            source = self._teacher_source
            generate = source.stats.generate_seconds if isinstance(source, on_policy.GeneratingTeacher) else 0.0
            started = time.perf_counter()
            result = super()._accumulate_gradients(batches)
            total = time.perf_counter() - started
            tokens = sum(int(loss_step.label_token_count(b["labels"], self._ignore_index)) for b in batches)
            self.step_times.append({"generate": generate, "score": self._score_seconds,
                                    "train": total - self._score_seconds, "tokens": tokens})
            return result

    return Timed


def bench_step_split(args: argparse.Namespace, workdir: output_folder.OwnedFolder) -> dict[str, Any]:
    from torchtune_kd.testing import standins
    from torchtune_kd.testing.benchmarks import shapes
    from torchtune_kd.testing.recipes import LORA_OVERRIDES, load_recipe_module, tiny_config

    root = workdir.path.resolve()
    workdir.claim("assets", "student", "teacher", "runs")
    assets = root / "assets"
    standins.build_all(assets)
    common = [
        *LORA_OVERRIDES, *shapes(args.vocab), "dataset.train_on_input=False", f"batch_size={args.batch_size}",
        "epochs=1", f"max_steps_per_epoch={args.steps}", "gradient_accumulation_steps=1", "seed=0", "shuffle=false",
        "log_peak_memory_stats=false", "overwrite_output_dir=true", "layer_mapping=null", "loss_scaling.enabled=false",
        "kd_ratio=0.5", "kd_loss._component_=kd_losses.ReverseKLWithChunkedOutputLoss", "~kd_loss.lambda_weight",
        "model.output_hidden_states=false", "teacher_model.output_hidden_states=false",
    ]
    probe = tiny_config(assets, root / "runs" / "probe", common)
    for seed, key in enumerate(("model", "teacher_model")):
        folder = root / ("student" if key == "model" else "teacher")
        if not (folder / "model.safetensors").is_file():
            standins.write_random_checkpoint(probe[key], folder, dtype=torch.float32, seed=seed)
    common += [f"checkpointer.checkpoint_dir={root / 'student'}", f"teacher_checkpointer.checkpoint_dir={root / 'teacher'}"]
    variants = {
        "off_policy": ["on_policy.fraction=0"],
        "on_policy": ["on_policy.fraction=1", f"on_policy.max_new_tokens={args.new_tokens}"],
    }
    recipe_class = timed_recipe(load_recipe_module())
    measured: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for index in range(args.rounds):
        for name, extra in variants.items():
            cfg = tiny_config(assets, root / "runs" / name, [*common, *extra])
            recipe = recipe_class(cfg=cfg)
            recipe.setup(cfg=cfg)
            recipe.train()
            recipe.cleanup()
            steps = recipe.step_times[1:]  # the first step warms up
            mean = {key: statistics.mean(s[key] for s in steps) for key in steps[0]}
            measured[name].append(mean)
            print(f"step split round {index + 1}: {name}: {mean}", flush=True)
    summary = {name: {key: statistics.median(r[key] for r in rounds) for key in rounds[0]} for name, rounds in measured.items()}
    off, on = summary["off_policy"], summary["on_policy"]
    step = lambda s: s["generate"] + s["score"] + s["train"]  # noqa: E731
    summary["ratio_per_step"] = step(on) / step(off)
    summary["ratio_per_token"] = (step(on) / on["tokens"]) / (step(off) / off["tokens"])
    return {"rounds": measured, "summary": summary}


def split_table(result: dict[str, Any]) -> str:
    summary = result["summary"]
    lines = ["| step | generation s | teacher scoring s | student fwd+bwd s | total s | counted tokens | s / 1k tokens |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("off_policy", "on_policy"):
        s = summary[name]
        total = s["generate"] + s["score"] + s["train"]
        lines.append(f"| {name.replace('_', '-')} | {s['generate']:.3f} | {s['score']:.3f} | {s['train']:.3f} | "
                     f"{total:.3f} | {s['tokens']:.0f} | {1000 * total / max(s['tokens'], 1):.3f} |")
    lines.append(f"\non-policy / off-policy: {summary['ratio_per_step']:.2f}x per step, "
                 f"{summary['ratio_per_token']:.2f}x per counted token")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    repo = checkout_dir()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog=__doc__.strip().split("\n\n")[-2])
    parser.add_argument("--only", choices=("generation", "step"), default=None, help="run one of the two measurements")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens sampled per sequence (default %(default)s)")
    parser.add_argument("--prompt-len", type=int, default=32, help="longest prompt (generation; the shortest is half)")
    parser.add_argument("--layers", type=int, default=20, help="student depth for the generation benchmark")
    parser.add_argument("--model-dir", type=Path, default=None, help="a SmolLM2 folder (prepare_smollm2.py) to load")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary of the step-split models (SmolLM2's)")
    parser.add_argument("--steps", type=int, default=4, help="steps per step-split run (the first is left out)")
    parser.add_argument("--workdir", type=Path, default=repo / "cache" / "bench_on_policy",
                        help="every file goes here: a new, empty, or this script's own folder (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="also write the measurements to this file")
    parser.add_argument("--overwrite", action="store_true", help="replace the --json file if it exists")
    args = parser.parse_args(argv)
    if min(args.rounds, args.batch_size, args.new_tokens, args.prompt_len, args.layers, args.steps) < 1 or args.steps < 2:
        parser.error("--rounds, --batch-size, --new-tokens, --prompt-len and --layers must be >= 1, --steps >= 2")
    if args.json is not None:
        output_file.check_or_exit(args.json, option="--json", overwrite=args.overwrite)
    workdir = output_folder.claim_or_exit(args.workdir, owner=OWNER, option="--workdir")
    header = f"CPU fp32, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, {args.rounds} round(s), medians"
    results: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items() if k != "overwrite"}}
    if args.only in (None, "generation"):
        results["generation"] = bench_generation(args)
    if args.only in (None, "step"):
        try:
            results["step_split"] = bench_step_split(args, workdir)
        except output_folder.OutputFolderError as err:
            raise SystemExit(f"error: {err}") from None
    print(f"\n{header}")
    if "generation" in results:
        g = results["generation"]["summary"]
        print(f"\n## generation: SmolLM2-135M-shaped student, {args.layers} layers, batch {args.batch_size}, prompts of "
              f"{args.prompt_len // 2}-{args.prompt_len} tokens, {args.new_tokens} new tokens (greedy)\n\n"
              "| loop | generated tokens/s |\n|---|---:|\n"
              f"| no cache (re-runs the whole batch per token) | {g['no_cache_tokens_per_second']:.1f} |\n"
              f"| KV cache, batched (`core.on_policy`) | {g['kv_cache_tokens_per_second']:.1f} |\n\n"
              f"KV cache / no cache: {g['ratio']:.2f}x (same tokens: {g['same_tokens']:.0%})")
    if "step_split" in results:
        print(f"\n## one optimiser step: LoRA student 2x256, teacher 4x512, vocab {args.vocab:,}, batch "
              f"{args.batch_size}, {args.new_tokens} new tokens on-policy, reverse KL, unfused/fused per the config "
              f"default\n\n{split_table(results['step_split'])}")
    if args.json is not None:
        output_file.write(args.json, json.dumps(results, indent=1), option="--json", overwrite=args.overwrite)
    return 0
