"""Evaluate exported models with lm-eval and compare them (value ± lm-eval's stderr, Δ to a baseline).

Examples:
    # real benchmarks (GPU machine with hub access): baseline student, teacher, a distilled run
    python scripts/evaluate.py --data online --baseline student \
        --model student=/tmp/Llama-3.2-1B-Instruct --model teacher=/tmp/torchtune/llama3_2_3B/lora_single_device/epoch_0 \
        --model kd=/tmp/torchtune/kd_3B_to_1B/epoch_0 --output-dir outputs/eval
    # offline stand-ins (no hub; the project's own small task files), a quick smoke test on CPU
    python scripts/evaluate.py --model student=cache/standins/student --model teacher=cache/standins/teacher --limit 8
    # only write the offline task YAMLs, for the lm_eval CLI (lm_eval ... --include_path DIR)
    python scripts/evaluate.py --write-task-yamls outputs/lm_eval_tasks

Writes ``OUT/<name>/results.json`` (lm-eval's results dict), ``OUT/comparison.md`` and ``OUT/comparison.csv``
(``--log-samples``: also ``OUT/<name>/samples_<task>.jsonl``).

Output folders (``--output-dir``, ``--write-task-yamls``) must be new, empty, or one this script wrote (its marker
file ``.torchtune_kd_outputs.json`` lists what it wrote); anything else is refused before any model is read, and a
file this script did not write is never replaced or deleted. Evaluating again into the same folder replaces the
earlier results of the same model names.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

# Neither module imports torch or lm_eval at module level (the hub-access variables are set before lm_eval loads).
from torchtune_kd import output_folder
from torchtune_kd.cli import checkout_dir
from torchtune_kd.evaluation import lm_eval_runner, lm_eval_tasks

OWNER = "scripts/evaluate.py"


def _batch_size(text: str) -> Union[int, str]:
    if text == "auto" or text.startswith("auto:"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch_size {text!r}: give a positive integer, 'auto' or 'auto:N'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--batch_size {value} must be >= 1")
    return value


def _limit(text: str) -> Union[int, float]:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--limit {text!r}: give a document count (e.g. 100) or a fraction < 1") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--limit {text} must be positive")
    return int(value) if value >= 1 and value.is_integer() else value


def build_parser(repo: Path) -> argparse.ArgumentParser:
    """The command's parser; ``repo`` (the checkout) gives the default ``--output-dir``."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 1)[1], allow_abbrev=False,
    )
    parser.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                        help="a Hugging Face model folder to evaluate (repeat; table order). A bare DIR is named after the folder.")
    parser.add_argument("--baseline", default=None, help="model NAME the deltas refer to (default: the first --model)")
    parser.add_argument("--tasks", default=",".join(lm_eval_tasks.DEFAULT_TASKS), help="comma-separated lm-eval tasks (default: %(default)s)")
    parser.add_argument("--data", choices=("offline", "online"), default="offline",
                        help="offline: the project's stand-in task files (packaged with torchtune_kd.evaluation), hub access off "
                             "(default); online: the real datasets")
    parser.add_argument("--data-dir", type=Path, default=lm_eval_tasks.OFFLINE_DATA_DIR, help="offline data folder (default: %(default)s)")
    parser.add_argument("--output-dir", type=Path, default=repo / "outputs" / "eval",
                        help="new, empty, or this script's own folder (default: %(default)s)")
    parser.add_argument("--limit", type=_limit, default=None, help="documents per task (smoke tests only; a fraction < 1 allowed)")
    parser.add_argument("--num_fewshot", "--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    parser.add_argument("--batch_size", "--batch-size", type=_batch_size, default=1, help="int, 'auto' or 'auto:N' (default: 1)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="auto: float32 on CPU, bfloat16 on GPU (default)")
    parser.add_argument("--seed", type=int, default=1234, help="lm-eval's python/numpy/torch/few-shot seeds (default: %(default)s)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder for model folders without tokenizer files")
    parser.add_argument("--log-samples", action="store_true",
                        help="also write lm-eval's per-document records to OUT/<name>/samples_<task>.jsonl")
    parser.add_argument("--write-task-yamls", type=Path, default=None, metavar="DIR",
                        help="only write the offline task YAMLs into DIR (new, empty, or this script's own; for "
                             "`lm_eval --include_path DIR`) and exit")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser(checkout_dir())
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        parser.error(f"--tasks {args.tasks!r} names no task")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        parser.error(f"--num_fewshot {args.num_fewshot} must be >= 0")
    try:
        if args.write_task_yamls is not None:
            folder = output_folder.claim_output_folder(args.write_task_yamls, owner=OWNER, option="--write-task-yamls")
            written = lm_eval_tasks.write_offline_task_yamls(folder, tasks, args.data_dir)
            print(f"wrote {len(written)} task YAMLs to {args.write_task_yamls.resolve()}:")
            for path in written.values():
                print(f"  {path}")
            print(f"use: lm_eval --model hf --model_args pretrained=DIR --include_path {args.write_task_yamls.resolve()} --tasks {','.join(tasks)}")
            return 0
        models = lm_eval_runner.parse_model_specs(args.model)
        if args.data == "offline":
            # Before lm_eval / datasets / huggingface_hub are imported: they read these once, at import.
            lm_eval_runner.set_offline_env()
            print(f"[evaluate] --data offline: the project's stand-in task files ({args.data_dir}), NOT the real benchmarks")
        # The output folder is checked before any model folder is read (the weights check reads every file) and
        # claimed before lm-eval starts.
        _, rows = lm_eval_runner.evaluate_models(
            models,
            args.output_dir,
            owner=OWNER,
            option="--output-dir",
            tasks=tasks,
            baseline=args.baseline,
            data=args.data,
            data_dir=args.data_dir,
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            seed=args.seed,
            tokenizer=args.tokenizer,
            log_samples=args.log_samples,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print()
    print((args.output_dir / "comparison.md").read_text(encoding="utf-8"))
    print(f"[evaluate] wrote {args.output_dir / 'comparison.md'}, {args.output_dir / 'comparison.csv'} and "
          f"{', '.join(str(args.output_dir / name / 'results.json') for name in models)}")
    return 0

