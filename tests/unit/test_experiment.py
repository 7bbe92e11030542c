"""The experiment grid's bookkeeping: cells, overrides and the statistics of the summary."""

import math

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
    table = experiment.markdown_table(experiment.summarise(rows, ["ppl"]), ["ppl"])
    assert "| a | 3 |" in table and " *" in table


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
