"""The benchmarks run end to end (smoke tests; the numbers themselves are never asserted: timing tests lie)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_writes_every_measurement(tmp_path: Path) -> None:
    # One method of each kind (each runs in a fresh process, most of its time importing torch): the baseline, a plain
    # full-logits reference, a chunked divergence and the fused pass.
    methods = ["torchtune_forward_kl_chunked", "full_logits_torch_jsd", "ours_jsd_chunked", "ours_fused_jsd",
               "output_matmuls_floor"]
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_losses.py"), "--quick", "--rounds", "2", "--threads", "1",
         "--methods", ",".join(methods), "--json", str(out)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    report = json.loads(out.read_text())
    rounds = report["cases"]["256x4000"]
    assert len(rounds) == 2
    for measurements in rounds:
        assert sorted(measurements) == sorted(methods)
        for method, result in measurements.items():
            assert result["method"] == method
            assert result["seconds"] > 0 and result["peak_mib"] >= 0


def test_recipe_benchmark_runs_both_recipes(tmp_path: Path) -> None:
    """scripts/bench_recipe.py end to end on a small vocabulary at two sequence lengths, with its plot (a smoke test:
    its numbers are never asserted)."""
    out, png = tmp_path / "bench.json", tmp_path / "curve.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_recipe.py"), "--vocabs", "1280", "--seq-lens", "32,64",
         "--rounds", "1", "--steps", "2", "--warmup", "1", "--variants", "upstream,ours_seed", "--student-dim", "64",
         "--teacher-dim", "128", "--batch-size", "2", "--workdir", str(tmp_path / "work"), "--json", str(out),
         "--plot", str(png)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    points = json.loads(out.read_text())["points"]
    assert [(p["vocab"], p["seq_len"]) for p in points] == [(1280, 32), (1280, 64)]
    for point in points:
        assert sorted(point["rounds"][0]) == ["ours_seed", "upstream"]
        for measurement in point["rounds"][0].values():
            assert measurement["tokens_per_second"] > 0 and measurement["max_rss_mib"] > 0 and measurement["steps"] == 2
        assert point["summary"]["upstream"]["speed_ratio"] == 1.0
    # The default path (fused, chunk size from the shapes) is what ours ran, and the table says so.
    assert "| ours_seed | fused, auto: 256 tokens |" in result.stdout
    assert png.stat().st_size > 10_000


def test_the_gpu_matrix_dry_run_checks_every_config_at_the_real_widths(tmp_path: Path, capsys) -> None:
    """What ``bash scripts/gpu_bench.sh --dry-run`` runs: the recipe matrix at the 1B/3B widths in bf16 on CUDA,
    every config written and ours through the pre-flight on the meta device (no checkpoint, no GPU needed)."""
    from torchtune_kd.cli import bench_recipe

    argv = ["--device", "cuda", "--dtype", "bf16", "--student-dim", "2048", "--teacher-dim", "3072", "--batch-size", "16",
            "--rounds", "2", "--vocabs", "32000,151936", "--workdir", str(tmp_path / "work"), "--dry-run"]
    assert bench_recipe.main(argv) == 0
    said = capsys.readouterr().out
    assert "dry run: 10 configs checked (20 runs of 8 steps with --rounds 2)" in said
    assert said.count("Output pass: fused (fused_output.enabled=auto") == 4  # ours_fkl and ours_seed at both sizes
    assert said.count("Output pass: unfused (fused_output.enabled=false)") == 4
    assert not list((tmp_path / "work").glob("student_*/*.safetensors"))
