"""What the recipe benchmarks share (``scripts/bench_recipe.py``, ``scripts/bench_cache.py``): model shapes as
overrides, ~256-token samples from the stand-in corpus, and one measured ``tune run`` in a fresh process."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from pathlib import Path

from torchtune_kd import output_folder


def shapes(vocab: int, student_dim: int = 256, teacher_dim: int = 512) -> list[str]:
    """Teacher 4 layers, LoRA student 2 layers; 64-wide heads, SwiGLU width 8/3 of the model width."""
    def block(key: str, layers: int, dim: int) -> list[str]:
        heads = max(dim // 64, 1)
        return [f"{key}.vocab_size={vocab}", f"{key}.num_layers={layers}", f"{key}.embed_dim={dim}",
                f"{key}.num_heads={heads}", f"{key}.num_kv_heads={max(heads // 2, 1)}",
                f"{key}.intermediate_dim={(dim * 8 // 3 + 15) // 16 * 16}"]

    return [*block("model", 2, student_dim), *block("teacher_model", 4, teacher_dim)]


def long_samples(assets: Path, out: Path, target_words: int = 190) -> Path:
    """Alpaca records of ~256 tokens: consecutive stand-in records joined until about ``target_words`` words."""
    records = json.loads((assets / "data" / "alpaca_train.json").read_text())
    joined, current = [], None
    for record in records * 4:
        if current is None:
            current = dict(record)
            continue
        current["output"] += " " + record["output"]
        if len((current["instruction"] + current["input"] + current["output"]).split()) >= target_words:
            joined.append(current)
            current = None
    out.write_text(json.dumps(joined))
    return out


def runs_folder(workdir: output_folder.OwnedFolder) -> output_folder.OwnedFolder:
    """The benchmark's ``runs/`` folder inside its workdir, claimed (with its own marker) so that each run's folder
    in it can be replaced by :func:`run_once`."""
    workdir.claim("runs")
    return output_folder.claim_output_folder(workdir.path / "runs", owner=workdir.owner, option="--workdir")


def run_once(recipe: str, config: Path, warmup: int, log: Path, runs: output_folder.OwnedFolder, *,
             checkout: Path) -> dict:
    """One fresh ``tune run`` in the checkout ``checkout``: median tokens/s after ``warmup`` steps and the process
    tree's peak RSS.

    The config's ``output_dir`` must be an entry of ``runs`` (:func:`runs_folder`); an earlier run there is removed
    first (its metric logs would otherwise be read with the new ones).
    """
    from omegaconf import OmegaConf

    from torchtune_kd import tune_cli
    from torchtune_kd.evaluation import run_logs

    out = Path(OmegaConf.load(config).output_dir)
    if out.parent.resolve() != runs.path.resolve():
        raise ValueError(f"output_dir={str(out)!r} of {config} is not inside the benchmark's runs folder {runs.path}")
    runs.claim(out.name)
    runs.remove(out.name)
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with log.open("w") as stdout:
        process = subprocess.Popen(tune_cli.tune_run_command(recipe, config), cwd=checkout, env=env, stdout=stdout,
                                   stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"{recipe} failed (status {status}); see {log}")
    metrics = run_logs.read_disk_log(out / "logs")
    key = "tokens_per_second" if "tokens_per_second" in metrics else "tokens_per_second_per_gpu"
    rates = [value for step, value in metrics[key] if step > warmup]
    result = {"tokens_per_second": statistics.median(rates), "max_rss_mib": usage.ru_maxrss / 1024,
              "steps": len(metrics[key])}
    if "peak_memory_alloc" in metrics:  # CUDA: both recipes log torchtune's memory stats
        result["gpu_peak_alloc_gib"] = max(value for _, value in metrics["peak_memory_alloc"])
    return result
