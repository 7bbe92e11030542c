"""The experiment grid's bookkeeping: cells, overrides and the statistics of the summary."""

import math
import statistics

import pytest

from torchtune_kd import experiment


def test_grid_has_a_baseline_per_seed_and_validates_names():
    cells = experiment.grid(["jsd", "tvd"], ["off", "cosine"], [0, 1, 2])
    assert len(cells) == 3 + 2 * 2 * 3
    assert sum(c.divergence == experiment.BASELINE for c in cells) == 3
    assert len({c.name for c in cells}) == len(cells)
    with pytest.raises(ValueError, match="unknown divergence"):
        experiment.grid(["kl"], ["off"], [0])
    with pytest.raises(ValueError, match="unknown IR setting"):
        experiment.grid(["jsd"], ["mse"], [0])


def test_overrides_switch_divergence_ir_and_weights():
    cell = experiment.Cell("tvd", "cosine", 2)
    out = experiment.cell_overrides(cell, chunked=True, mapping="[[0,1],[1,3]]",
                                    scales={"ce": 0.5, "kd": 0.3, "ir": 0.2}, base_kd_keys=["lambda_weight", "num_output_chunks"])
    assert "seed=2" in out and "layer_mapping=[[0,1],[1,3]]" in out
    assert "kd_loss._component_=kd_losses.TVDistanceWithChunkedOutputLoss" in out
    assert "~kd_loss.lambda_weight" in out  # TVD takes no lambda
    assert "loss_scaling.manual_scales.ir=0.2" in out
    base = experiment.cell_overrides(experiment.Cell("ce_only", "off", 0), chunked=False, mapping="auto",
                                     scales={"ce": 0.5, "kd": 0.3, "ir": 0.2}, base_kd_keys=["lambda_weight"])
    assert "loss_scaling.manual_scales.ce=1.0" in base and "loss_scaling.manual_scales.kd=0.0" in base
    assert "layer_mapping=null" in base
    jsd = experiment.cell_overrides(experiment.Cell("jsd", "off", 0), chunked=True, mapping="auto",
                                    scales={"ce": 0.5, "kd": 0.3, "ir": 0.2}, base_kd_keys=["lambda_weight"])
    assert not any(o.startswith("~kd_loss") for o in jsd)
    assert "loss_scaling.manual_scales.ir=0.0" in jsd


def test_a_teacher_cache_serves_every_cell_without_ir():
    scales = {"ce": 0.5, "kd": 0.3, "ir": 0.2}
    for cell in (experiment.Cell("ce_only", "off", 1), experiment.Cell("jsd", "off", 1), experiment.Cell("tvd", "cosine", 1)):
        out = experiment.cell_overrides(cell, chunked=True, mapping="auto", scales=scales, teacher_cache="/c")
        assert ("teacher_cache.path=/c" in out) == experiment.uses_cache(cell) == (cell.ir == "off"), cell
        assert "teacher_cache.path=/c" not in experiment.cell_overrides(cell, chunked=True, mapping="auto", scales=scales)


def test_summary_pairs_by_seed_and_uses_the_t_distribution():
    rows = []
    for seed, base in enumerate([10.0, 12.0, 14.0]):
        rows.append({"setting": "ce_only", "seed": seed, "ppl": base})
        rows.append({"setting": "a", "seed": seed, "ppl": base - 1.0 + 0.1 * seed})  # consistent gain
        rows.append({"setting": "b", "seed": seed, "ppl": base + [-1.0, 1.0, 0.2][seed]})  # noise
    summary = {e["setting"]: e for e in experiment.summarise(rows, ["ppl"])}
    assert summary["ce_only"]["ppl_mean"] == pytest.approx(12.0)
    assert summary["ce_only"]["ppl_se"] == pytest.approx(2.0 / math.sqrt(3))
    # paired differences -1.0, -0.9, -0.8
    assert summary["a"]["ppl_diff"] == pytest.approx(-0.9)
    assert summary["a"]["ppl_diff_se"] == pytest.approx(0.1 / math.sqrt(3))
    assert summary["a"]["ppl_significant"]
    assert not summary["b"]["ppl_significant"]
    # 2.5 standard errors is not enough with 3 seeds (t(2) = 4.30)
    rows2 = [{"setting": "ce_only", "seed": s, "ppl": 0.0} for s in range(3)]
    rows2 += [{"setting": "c", "seed": s, "ppl": v} for s, v in enumerate([1.0, 2.0, 3.0 + 1e-9])]
    c = {e["setting"]: e for e in experiment.summarise(rows2, ["ppl"])}["c"]
    assert c["ppl_diff"] / c["ppl_diff_se"] == pytest.approx(2 * math.sqrt(3), rel=1e-6)  # 3.46 se
    assert not c["ppl_significant"]
    table = experiment.summary_table(experiment.summarise(rows, ["ppl"]), ["ppl"])
    assert "| a | 3 |" in table and " *" in table


def _row(divergence: str, ir: str, seed: int, **metrics: float) -> dict:
    setting = "ce_only" if divergence == "ce_only" else f"{divergence}+ir_{ir}"
    return {"setting": setting, "divergence": divergence, "ir": ir, "seed": seed, **metrics}


def test_ir_effect_pairs_ir_on_with_ir_off_by_seed():
    rows = [_row("ce_only", "off", s, ppl=20.0 + s) for s in range(3)]
    # forward KL: IR lowers ppl by 2 every seed, +-0.1 (significant); JSD: IR changes it by +1, -1, +0.5 (noise).
    rows += [_row("forward_kl", "off", s, ppl=10.0 + 3 * s) for s in range(3)]
    rows += [_row("forward_kl", "cosine", s, ppl=10.0 + 3 * s - 2.0 + [0.1, -0.1, 0.0][s]) for s in range(3)]
    rows += [_row("jsd", "off", s, ppl=15.0 + s) for s in range(3)]
    rows += [_row("jsd", "cosine", s, ppl=15.0 + s + [1.0, -1.0, 0.5][s]) for s in range(3)]
    rows += [_row("tvd", "off", s, ppl=1.0) for s in range(3)]  # no IR counterpart: left out
    rows += [_row("skew_kl", "cosine", 5, ppl=1.0), _row("skew_kl", "off", 4, ppl=1.0)]  # no shared seed: left out
    effects = {e["divergence"]: e for e in experiment.ir_effect(rows, ["ppl"])}
    assert set(effects) == {"forward_kl", "jsd"}
    fkl = effects["forward_kl"]
    assert fkl["n"] == fkl["ppl_pairs"] == 3
    assert fkl["ppl_diff"] == pytest.approx(-2.0)
    assert fkl["ppl_diff_se"] == pytest.approx(statistics.stdev([-1.9, -2.1, -2.0]) / math.sqrt(3))
    assert fkl["ppl_significant"]
    assert effects["jsd"]["ppl_diff"] == pytest.approx(0.5 / 3) and not effects["jsd"]["ppl_significant"]
    table = experiment.difference_table(list(effects.values()), ["ppl"], "divergence", "IR on − off")
    assert "| forward_kl | 3 | -2.000 ± 0.058 * |" in table and "| jsd | 3 |" in table


def test_compare_grids_pairs_the_same_setting_and_seed():
    live = [_row("ce_only", "off", s, kl=1.3 + 0.01 * s) for s in range(3)]
    live += [_row("forward_kl", "off", s, kl=1.0 + 0.02 * s) for s in range(3)]
    live += [_row("forward_kl", "cosine", s, kl=0.9) for s in range(3)]
    cached = [_row("ce_only", "off", s, kl=1.3 + 0.01 * s) for s in range(3)]  # identical: Δ 0, not significant
    cached += [_row("forward_kl", "off", s, kl=1.0 + 0.02 * s + 0.05 + 0.001 * s) for s in (0, 1, 2, 7)]
    out = {e["setting"]: e for e in experiment.compare_grids(live, cached, ["kl"])}
    assert list(out) == ["ce_only", "forward_kl+ir_off"]  # the IR setting is in one grid only
    assert out["ce_only"]["kl_diff"] == 0.0 and not out["ce_only"]["kl_significant"]
    assert out["forward_kl+ir_off"]["n"] == 3  # seed 7 has no live counterpart
    assert out["forward_kl+ir_off"]["teacher"] == "? / ?"  # these rows do not say where their teacher came from
    assert out["forward_kl+ir_off"]["kl_diff"] == pytest.approx(0.051)
    assert out["forward_kl+ir_off"]["kl_significant"]


def test_t_critical_matches_the_printed_t_table():
    # Two-sided 95% values as printed in t tables (3 decimals); scipy computes them for every df.
    for df, value in {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 10: 2.228, 11: 2.201, 30: 2.042}.items():
        assert experiment.t_critical(df) == pytest.approx(value, abs=5e-4)
    assert experiment.t_critical(100_000) == pytest.approx(1.960, abs=5e-4)
    assert experiment.t_critical(0) == math.inf


def test_run_cell_needs_a_recipe_inside_its_working_directory(tmp_path):
    # torchtune turns the recipe path into a module name relative to the working directory: refuse anything else
    # before starting a subprocess.
    (tmp_path / "checkout" / "recipes").mkdir(parents=True)
    outside = tmp_path / "elsewhere.py"
    outside.write_text("")
    for recipe in (outside, tmp_path / "checkout" / "recipes" / "missing.py"):
        with pytest.raises(ValueError, match="is not a file inside workdir"):
            experiment.run_cell(experiment.Cell("jsd", "off", 0), recipe=recipe, workdir=tmp_path / "checkout",
                                config=tmp_path / "c.yaml", out_dir=tmp_path / "out", overrides=[])


def test_compare_grids_script_reads_two_grid_folders(tmp_path, capsys):
    import json

    from torchtune_kd.cli import compare_grids as script
    for grid, shift in (("live", 0.0), ("cache", 0.5)):
        for seed in range(3):
            for row in (_row("ce_only", "off", seed), _row("forward_kl", "off", seed)):
                cell = experiment.Cell(row["divergence"], row["ir"], seed)
                values = {"heldout_ppl": 100.0 + seed + (shift if cell.divergence != "ce_only" else 0.0),
                          "heldout_kl": 1.0, "top1_agreement": 0.4}
                folder = tmp_path / grid / "cells" / cell.name
                folder.mkdir(parents=True)
                (folder / "result.json").write_text(json.dumps({**row, "cell": cell.name, "teacher": grid, **values}))
    out = tmp_path / "compare.md"
    argv = [str(tmp_path / "live"), str(tmp_path / "cache"), "--labels", "live,cache", "--out", str(out)]
    assert script.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| forward_kl+ir_off | 3 | live / cache | 0.500 ± 0.000 * |" in printed
    assert "| ce_only | 3 | live / cache | 0.000 ± 0.000 |" in printed and "Δ heldout_ppl (cache − live)" in printed
    assert out.read_text().startswith("| setting | n |")
    with pytest.raises(SystemExit, match="no finished cells"):
        script.main([str(tmp_path / "live"), str(tmp_path / "nowhere")])


def test_a_finished_grid_is_read_back_without_a_run_and_summarised(tmp_path, monkeypatch, capsys):
    import json

    from torchtune_kd import output_folder, tune_cli

    monkeypatch.setattr(tune_cli, "tune_run", lambda *a, **k: pytest.fail("a finished cell was run again"))
    config = tmp_path / "base.yaml"
    config.write_text("teacher_checkpointer: {checkpoint_dir: /teacher}\n"
                      "kd_loss: {_component_: kd_losses.ForwardKLWithChunkedOutputLoss}\n")
    out = output_folder.claim_output_folder(tmp_path / "grid", owner="test", option="--out")
    out.claim("command.txt", "cells", "results.csv", "summary.csv", "summary.md")
    cells = experiment.grid(["jsd"], ["off"], [0, 1])
    for cell in cells:
        (out.path / "cells" / cell.name).mkdir(parents=True)
        row = _row(cell.divergence, cell.ir, cell.seed, heldout_ppl=10.0 + cell.seed - (cell.divergence == "jsd"),
                   heldout_kl=0.5, top1_agreement=0.4)
        (out.path / "cells" / cell.name / "result.json").write_text(json.dumps(row))

    rows = experiment.run_grid(
        cells, out, checkout=tmp_path, recipe=tmp_path / "recipe.py", config=config, overrides=[], command="grid --x",
        steps=2, mapping="auto", scales={"ce": 0.5, "kd": 0.5, "ir": 0.0}, heldout=tmp_path / "heldout.txt",
        eval_seq_len=8, eval_windows=1,
    )
    assert [(r["setting"], r["seed"]) for r in rows] == [(c.setting, c.seed) for c in cells]
    assert (out.path / "command.txt").read_text() == "grid --x\n"
    assert "done before, skipped" in capsys.readouterr().out

    text = experiment.write_summary(out.path, rows)
    assert (out.path / "summary.md").read_text() == text
    assert text.startswith("| setting | n | heldout_ppl | heldout_kl | top1_agreement |")
    assert "| jsd+ir_off | 2 | 9.500 ± 0.500 |" in text and experiment.SUMMARY_NOTE in text
    assert "IR on − off" not in text  # one IR setting only: no IR effect table
    assert (out.path / "results.csv").read_text().splitlines()[0].startswith("setting,divergence,ir,seed")
    assert (out.path / "summary.csv").is_file()


def test_on_policy_cells_are_written_name_at_fraction():
    cells = experiment.grid(["forward_kl", "reverse_kl@0.5", "gkd_jsd@1"], ["off"], [0, 1])
    assert [c.setting for c in cells if c.seed == 0] == [
        "ce_only", "forward_kl+ir_off", "reverse_kl@0.5+ir_off", "gkd_jsd@1+ir_off"]
    assert len({c.name for c in cells}) == len(cells)
    assert experiment.Cell("forward_kl", "off", 0).name == "forward_kl-ir_off-seed0"  # recorded grids keep their names
    out = experiment.cell_overrides(cells[-1], chunked=True, mapping="auto", scales={"ce": 0, "kd": 1, "ir": 0},
                                    base_kd_keys=["lambda_weight", "num_output_chunks"])
    assert "on_policy.fraction=1" in out and "kd_loss._component_=kd_losses.GeneralizedJSDWithChunkedOutputLoss" in out
    assert "~kd_loss.lambda_weight" in out
    assert not any(o.startswith("on_policy") for o in experiment.cell_overrides(
        cells[1], chunked=True, mapping="auto", scales={"ce": 0, "kd": 1, "ir": 0}))
    for bad in ("reverse_kl@2", "reverse_kl@half"):
        with pytest.raises(ValueError, match="on-policy fraction after '@' must be a number in \\[0, 1\\]"):
            experiment.grid([bad], ["off"], [0])


def test_on_policy_settings_are_compared_with_off_policy_forward_kl_by_seed():
    rows = []
    for seed in range(3):
        rows.append({"setting": "forward_kl+ir_off", "seed": seed, "onpolicy_kl": 1.0 + seed})
        rows.append({"setting": "reverse_kl@1+ir_off", "seed": seed, "onpolicy_kl": 0.5 + seed + 0.01 * seed})
    effects = experiment.on_policy_effect(rows, ["onpolicy_kl"])
    assert [e["setting"] for e in effects] == ["reverse_kl@1+ir_off"] and effects[0]["n"] == 3
    assert effects[0]["onpolicy_kl_diff"] == pytest.approx(-0.5 + 0.01)
    assert effects[0]["onpolicy_kl_significant"]
    assert experiment.on_policy_effect([r for r in rows if "@" not in r["setting"]], ["onpolicy_kl"]) == []


def test_cells_of_a_student_with_another_tokenizer_summarise_bits_per_byte_without_kl(tmp_path, capsys):
    """A cross-tokenizer student has no KL or agreement against the teacher (None): the summary and the grid
    comparison keep perplexity and bits per byte and leave those out."""
    import json

    from torchtune_kd import output_folder
    from torchtune_kd.cli import compare_grids as script

    rows = []
    for seed in range(3):
        for divergence, bpb in (("ce_only", 3.0), ("forward_kl", 2.8)):
            rows.append(_row(divergence, "off", seed, heldout_ppl=700.0 - 100 * (divergence != "ce_only") + seed,
                             heldout_bpb=bpb + 0.01 * seed, heldout_kl=None, top1_agreement=None))
    out = output_folder.claim_output_folder(tmp_path / "grid", owner="test", option="--out")
    out.claim("results.csv", "summary.csv", "summary.md")
    text = experiment.write_summary(out.path, rows)
    assert text.startswith("| setting | n | heldout_ppl | heldout_bpb | Δ heldout_ppl vs ce_only | Δ heldout_bpb vs ce_only |")
    assert "| forward_kl+ir_off | 3 | 601.000 ± 0.577 | 2.810 ± 0.006 | -100.000 ± 0.000 * | -0.200 ± 0.000 * |" in text
    for grid in ("a", "b"):
        for row in rows:
            cell = experiment.Cell(row["divergence"], row["ir"], row["seed"])
            (tmp_path / grid / "cells" / cell.name).mkdir(parents=True)
            (tmp_path / grid / "cells" / cell.name / "result.json").write_text(json.dumps({**row, "cell": cell.name}))
    assert script.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    assert "Δ heldout_bpb (B − A)" in printed and "heldout_kl" not in printed
