"""scripts/bench_on_policy.py end to end at a toy size: both measurements run, agree on what they measure, and
write their figures by name."""

from __future__ import annotations

import json

from torchtune_kd.cli import bench_on_policy


def test_both_measurements_run_and_report_by_name(tmp_path, capsys):
    out = tmp_path / "bench.json"
    status = bench_on_policy.main([
        "--rounds", "1", "--layers", "1", "--new-tokens", "6", "--prompt-len", "8", "--batch-size", "2", "--steps", "2",
        "--vocab", "1280", "--workdir", str(tmp_path / "work"), "--json", str(out),
    ])
    assert status == 0
    result = json.loads(out.read_text())
    generation = result["generation"]["summary"]
    assert generation["same_tokens"] == 1.0  # the no-cache baseline samples exactly what the cached loop does
    assert generation["kv_cache_tokens_per_second"] > 0 and generation["ratio"] > 0
    split = result["step_split"]["summary"]
    assert split["off_policy"]["generate"] == 0.0 and split["on_policy"]["generate"] > 0
    assert 0 < split["on_policy"]["tokens"] <= 2 * 6  # only the generated tokens count
    assert split["ratio_per_step"] > 0 and split["ratio_per_token"] > 0
    printed = capsys.readouterr().out
    assert "KV cache / no cache" in printed and "on-policy / off-policy" in printed
