"""Evaluation path: offline lm-eval task stand-ins, scripts/evaluate.py, the comparison table, run-log parsing, plots.

The end-to-end test runs lm-eval's real hellaswag / commonsense_qa / truthfulqa_mc2 tasks on the project's local data
with the tiny stand-in models, and re-scores the documents independently (transformers, float64, from the metric
definitions) to show lm-eval scored the folder we gave on the documents we ship.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import math
import shutil
from pathlib import Path

import pytest

from torchtune_kd.evaluation import lm_eval_runner, lm_eval_tasks, plots, run_logs, tables
from torchtune_kd.testing.crafted_files import NAN_TENSOR, poison, write_disk_log



def _load_script(name: str):
    """The command module behind ``scripts/<name>.py``."""
    return importlib.import_module(f"torchtune_kd.cli.{name}")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ offline data
def test_local_data_follows_each_task_schema():
    data = lm_eval_tasks.OFFLINE_DATA_DIR
    hellaswag = _jsonl(data / "hellaswag" / "validation.jsonl") + _jsonl(data / "hellaswag" / "train.jsonl")
    csqa = _jsonl(data / "commonsense_qa" / "validation.jsonl") + _jsonl(data / "commonsense_qa" / "train.jsonl")
    truthful = _jsonl(data / "truthfulqa_mc2" / "validation.jsonl")
    for rows in (hellaswag, csqa, truthful):
        assert 30 <= len(rows) <= 40
    for row in hellaswag:
        assert {"ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id", "split", "split_type", "label"} <= set(row)
        assert row["ctx"] == f"{row['ctx_a']} {row['ctx_b']}"
        assert len(row["endings"]) == 4 and len(set(row["endings"])) == 4
        assert isinstance(row["label"], str) and row["label"] in {"0", "1", "2", "3"}  # a string, as on the hub
    for row in csqa:
        assert row["choices"]["label"] == list("ABCDE") and len(set(row["choices"]["text"])) == 5
        assert row["answerKey"] in row["choices"]["label"]
    for row in truthful:
        mc1, mc2 = row["mc1_targets"], row["mc2_targets"]
        assert mc1["labels"][0] == 1 and sum(mc1["labels"]) == 1 and len(mc1["labels"]) == len(mc1["choices"])
        assert len(mc2["labels"]) == len(mc2["choices"]) and 0 < sum(mc2["labels"]) < len(mc2["labels"])
        assert mc2["labels"] == sorted(mc2["labels"], reverse=True)  # true answers first, like the real dataset
    # Questions are unique across splits, so few-shot examples never repeat a scored document.
    assert len({r["question"] for r in csqa}) == len(csqa)
    assert len({r["ctx"] for r in hellaswag}) == len(hellaswag)
    assert (data / "README.md").is_file()


def test_task_files_are_package_data():
    # Found through importlib.resources inside the package, so a wheel install carries and finds them too.
    package_dir = Path(lm_eval_tasks.__file__).resolve().parent
    assert lm_eval_tasks.offline_data_dir() == lm_eval_tasks.OFFLINE_DATA_DIR == package_dir / "task_data"
    for spec in lm_eval_tasks.OFFLINE_TASKS.values():
        for split in spec.splits.values():
            assert (lm_eval_tasks.OFFLINE_DATA_DIR / spec.folder / f"{split}.jsonl").is_file()


def test_offline_yamls_include_lm_eval_tasks_and_override_only_the_data(tmp_path):
    from lm_eval.tasks._yaml_loader import load_yaml

    written = lm_eval_tasks.write_offline_task_yamls(tmp_path, lm_eval_tasks.DEFAULT_TASKS)
    assert sorted(written) == sorted(lm_eval_tasks.DEFAULT_TASKS)
    tasks_dir = lm_eval_tasks.lm_eval_tasks_dir()
    for task, path in written.items():
        own = load_yaml(path, resolve_func=False, recursive=False)
        include = Path(own["include"])
        assert include.is_absolute() and tasks_dir in include.parents
        merged = load_yaml(path, resolve_func=True, recursive=True)
        upstream = load_yaml(include, resolve_func=True, recursive=True)
        assert merged["task"] == task and merged["dataset_path"] == "json" and merged["dataset_name"] is None
        for split_file in merged["dataset_kwargs"]["data_files"].values():
            assert Path(split_file).is_file() and lm_eval_tasks.OFFLINE_DATA_DIR in Path(split_file).parents
        # Prompt building and scoring are lm-eval's own, unchanged.
        dataset_keys = {"include", "dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split", "test_split"}
        for key, value in upstream.items():
            if key not in dataset_keys:
                assert merged[key] == value, (task, key)

    from lm_eval.tasks.hellaswag import utils as hellaswag_utils
    from lm_eval.tasks.truthfulqa import utils as truthfulqa_utils

    # `!function utils.x` inside the included YAMLs resolves next to the *included* file, i.e. lm-eval's own module.
    assert load_yaml(written["hellaswag"])["process_docs"] is hellaswag_utils.process_docs
    assert load_yaml(written["truthfulqa_mc2"])["process_results"] is truthfulqa_utils.process_results_mc2


def test_offline_yamls_reject_unknown_tasks_and_missing_data(tmp_path):
    with pytest.raises(ValueError, match=r"mmlu.*--data online"):
        lm_eval_tasks.write_offline_task_yamls(tmp_path / "a", ["hellaswag", "mmlu"])
    with pytest.raises(ValueError, match=r"lacks hellaswag/(train|validation).jsonl"):
        lm_eval_tasks.write_offline_task_yamls(tmp_path / "b", ["hellaswag"], data_dir=tmp_path / "empty")


# ------------------------------------------------------------------------------------------------ model folders
def _copy_model(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "extra", ["adapter_model.safetensors", "adapter_config.json", "adapter_0.pt", "projections.pt"]
)
def test_refuses_folder_with_adapter_or_projection_files(tiny_assets, tmp_path, extra, capsys):
    folder = _copy_model(tiny_assets["student_dir"], tmp_path / "epoch_0")
    lm_eval_runner.validate_model_dir(folder)  # clean: accepted
    (folder / extra).write_bytes(b"\0")
    with pytest.raises(ValueError, match=rf"{extra}.*peft.*merged weights"):
        lm_eval_runner.validate_model_dir(folder)
    # The script refuses before loading anything (and before any other model is evaluated).
    evaluate = _load_script("evaluate")
    rc = evaluate.main(["--model", f"ok={tiny_assets['student_dir']}", "--model", f"bad={folder}", "--output-dir", str(tmp_path / "out")])
    assert rc == 2
    assert extra in capsys.readouterr().err
    assert not (tmp_path / "out" / "ok").exists()


def test_refuses_incomplete_folders(tiny_assets, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        lm_eval_runner.validate_model_dir(tmp_path / "missing")
    no_weights = _copy_model(tiny_assets["student_dir"], tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weights"):
        lm_eval_runner.validate_model_dir(no_weights)
    sharded = _copy_model(tiny_assets["student_dir"], tmp_path / "sharded")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match="missing shards"):
        lm_eval_runner.validate_model_dir(sharded)
    no_tok = _copy_model(tiny_assets["student_dir"], tmp_path / "no_tok")
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        (no_tok / name).unlink()
    with pytest.raises(ValueError, match="--tokenizer"):
        lm_eval_runner.validate_model_dir(no_tok)
    assert lm_eval_runner.validate_model_dir(no_tok, require_tokenizer=False) == no_tok.resolve()
    (no_tok / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        lm_eval_runner.validate_model_dir(no_tok)


def _shard(folder: Path) -> list[str]:
    """Split the folder's model.safetensors into two shards plus an index, as large exports are written."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, folder / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in shard_names})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return list(shards)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_refuses_non_finite_weights(tiny_assets, tmp_path, value):
    folder = _copy_model(tiny_assets["student_dir"], tmp_path / "epoch_0")
    poison(folder, value=value, count=3)
    expected = (
        f"model folder {str(folder.resolve())!r}: model.safetensors tensor '{NAN_TENSOR}' has 3 non-finite values "
        r"\(NaN/inf\) out of \d+: the run diverged \(or the export is corrupt\); evaluate an earlier checkpoint."
    )
    with pytest.raises(ValueError, match=expected):
        lm_eval_runner.validate_model_dir(folder)
    with pytest.raises(ValueError, match=expected):
        lm_eval_runner.check_finite_weights(folder)
    with pytest.raises(ValueError, match=expected):  # run_lm_eval checks before lm-eval loads anything
        lm_eval_runner.run_lm_eval(folder, ["hellaswag"], limit=1)
    assert lm_eval_runner.validate_model_dir(folder, check_weights=False) == folder.resolve()


def test_refuses_non_finite_weights_in_a_sharded_folder(tiny_assets, tmp_path):
    folder = _copy_model(tiny_assets["student_dir"], tmp_path / "sharded")
    first, second = _shard(folder)
    lm_eval_runner.validate_model_dir(folder)  # clean shards: accepted
    from safetensors import safe_open

    with safe_open(str(folder / second), framework="pt") as handle:
        tensor = sorted(handle.keys())[-1]
    poison(folder, file_name=second, tensor=tensor, count=1)
    with pytest.raises(ValueError, match=rf"{second} tensor '{tensor}' has 1 non-finite values"):
        lm_eval_runner.validate_model_dir(folder)


def test_refuses_unreadable_safetensors(tiny_assets, tmp_path):
    folder = _copy_model(tiny_assets["student_dir"], tmp_path / "lfs")
    # What a clone without git-lfs leaves behind.
    (folder / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    with pytest.raises(ValueError, match=r"model.safetensors cannot be read as safetensors .*git-lfs"):
        lm_eval_runner.validate_model_dir(folder)


def test_online_data_refused_while_hub_access_is_off(tiny_assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    evaluate = _load_script("evaluate")
    rc = evaluate.main(["--model", f"s={tiny_assets['student_dir']}", "--data", "online", "--output-dir", str(tmp_path)])
    assert rc == 2 and "HF_HUB_OFFLINE=1" in capsys.readouterr().err


def test_parse_model_specs():
    models = lm_eval_runner.parse_model_specs(["base=/a/student", "/runs/kd_jsd/epoch_2", "/x/teacher"])
    assert list(models) == ["base", "kd_jsd_epoch_2", "teacher"]
    assert models["base"] == Path("/a/student")
    with pytest.raises(ValueError, match="given twice"):
        lm_eval_runner.parse_model_specs(["a=/x", "a=/y"])
    with pytest.raises(ValueError, match="must start with"):
        lm_eval_runner.parse_model_specs(["../evil=/x"])
    with pytest.raises(ValueError, match="no folder"):
        lm_eval_runner.parse_model_specs(["a="])
    with pytest.raises(ValueError, match="no model"):
        lm_eval_runner.parse_model_specs([])


# ------------------------------------------------------------------------------------------------ comparison table
def _fake_results(scores: dict, n: int = 100, shots: int = 0, data: str = "offline") -> dict:
    results = {}
    for task, metrics in scores.items():
        results[task] = {"alias": task}
        for metric, (value, stderr) in metrics.items():
            results[task][f"{metric},none"] = value
            results[task][f"{metric}_stderr,none"] = stderr
    return {
        "results": results,
        "n-samples": {t: {"original": 500, "effective": n} for t in scores},
        "n-shot": {t: shots for t in scores},
        "torchtune_kd": {"data": data},
    }


BASE = {
    "truthfulqa_mc2": {"acc": (0.40, 0.02)},
    "hellaswag": {"acc": (0.30, 0.01), "acc_norm": (0.35, 0.011)},
    "commonsense_qa": {"acc": (0.50, 0.03)},
}
KD = {
    "truthfulqa_mc2": {"acc": (0.45, 0.021)},
    "hellaswag": {"acc": (0.28, 0.012), "acc_norm": (0.36, "N/A")},
    "commonsense_qa": {"acc": (0.52, 0.029)},
}


def test_build_comparison_deltas_and_stderr():
    results = {"student": _fake_results(BASE), "kd": _fake_results(KD)}
    rows = tables.build_comparison(results, baseline="student")
    assert [(r.model, r.task, r.metric) for r in rows][:4] == [
        ("student", "truthfulqa_mc2", "acc"), ("student", "hellaswag", "acc"),
        ("student", "hellaswag", "acc_norm"), ("student", "commonsense_qa", "acc"),
    ]
    by_key = {(r.model, r.task, r.metric): r for r in rows}
    for task, metrics in KD.items():
        for metric, (value, stderr) in metrics.items():
            row = by_key[("kd", task, metric)]
            base_value, base_se = BASE[task][metric]
            assert row.value == value and row.n == 100
            assert math.isclose(row.delta, value - base_value, abs_tol=1e-15)
            if stderr == "N/A":
                assert row.stderr is None and row.delta_stderr is None
            else:
                assert math.isclose(row.delta_stderr, math.sqrt(stderr**2 + base_se**2), rel_tol=1e-12)
    assert all(r.delta is None for r in rows if r.model == "student")

    md = tables.comparison_markdown(rows, "student")
    assert "| student (baseline) | 0.4000 ± 0.0200 | 0.3000 ± 0.0100 | 0.3500 ± 0.0110 | 0.5000 ± 0.0300 |" in md
    assert "0.4500 ± 0.0210 (Δ +0.0500 ± 0.0290)" in md
    assert "0.2800 ± 0.0120 (Δ -0.0200 ± 0.0156)" in md
    assert "0.3600 ± n/a (Δ +0.0100 ± n/a)" in md
    assert "hellaswag acc_norm" in md.splitlines()[-4]

    parsed = list(csv.DictReader(io.StringIO(tables.comparison_csv(rows, "student"))))
    assert len(parsed) == 8 and tuple(parsed[0]) == tables.CSV_FIELDS
    for line, row in zip(parsed, rows):
        assert float(line["value"]) == row.value  # full precision survives
        assert (line["delta"] == "") == (row.delta is None)

    # Another baseline flips the signs; the default baseline is the first model.
    flipped = {(r.model, r.task, r.metric): r.delta for r in tables.build_comparison(results, baseline="kd")}
    assert math.isclose(flipped[("student", "truthfulqa_mc2", "acc")], -0.05, abs_tol=1e-15)
    assert tables.build_comparison(results)[0].delta is None


def test_build_comparison_refuses_incomparable_results():
    with pytest.raises(ValueError, match="baseline='nope'"):
        tables.build_comparison({"a": _fake_results(BASE)}, baseline="nope")
    with pytest.raises(ValueError, match="different numbers of documents"):
        tables.build_comparison({"a": _fake_results(BASE), "b": _fake_results(KD, n=50)})
    with pytest.raises(ValueError, match="few-shot"):
        tables.build_comparison({"a": _fake_results(BASE), "b": _fake_results(KD, shots=5)})
    with pytest.raises(ValueError, match="different data"):
        tables.build_comparison({"a": _fake_results(BASE), "b": _fake_results(KD, data="online")})
    partial = _fake_results(KD)
    del partial["results"]["hellaswag"]["acc_norm,none"]
    with pytest.raises(ValueError, match="'acc_norm,none' is missing for task 'hellaswag'"):
        tables.build_comparison({"a": _fake_results(BASE), "b": partial})


# ------------------------------------------------------------------------------------------------ end to end


# ------------------------------------------------------------------------------------------------ run logs and plots


def test_parse_disk_log_reads_torchtune_format(tmp_path):
    path = tmp_path / "run" / "logs" / "log_1.txt"
    logged = write_disk_log(path, range(1, 6), with_ir=True)
    with open(path, "a") as handle:
        handle.write("Writing logs to somewhere\nStep 9 | loss:nan? broken\n")
    parsed = run_logs.parse_disk_log(path)
    assert set(parsed) == set(logged)
    for name, points in logged.items():
        assert parsed[name] == [(s, pytest.approx(v, rel=1e-15)) for s, v in points]
    with pytest.raises(ValueError, match="does not exist"):
        run_logs.parse_disk_log(tmp_path / "nope.txt")


def test_read_run_logs_merges_resumed_launches(tmp_path):
    logs = tmp_path / "kd_run" / "logs"
    write_disk_log(logs / "log_100.txt", range(1, 5), with_ir=False)
    write_disk_log(logs / "log_200.txt", range(4, 7), with_ir=False, offset=10.0)  # resumed at step 4
    for target in (tmp_path / "kd_run", logs):
        label, metrics = run_logs.read_run_logs(target)
        assert label == "kd_run"
        assert [s for s, _ in metrics["loss"]] == [1, 2, 3, 4, 5, 6]
        assert metrics["loss"][3][1] == pytest.approx(3.0 / 4 + 10.0)  # the later launch wins
    assert run_logs.read_run_logs(logs / "log_100.txt")[0] == "kd_run"
    with pytest.raises(ValueError, match="no log_"):
        run_logs.read_run_logs(tmp_path)


def test_select_plot_panels_groups_weights_and_skips_absent_metrics():
    runs = {"a": {"loss": [(1, 1.0)], "weight/kd": [(1, 0.3)], "weight/ce": [(1, 0.5)], "lr": [(1, 0.1)]},
            "b": {"grad_norm": [(1, 2.0)], "kd_loss": []}}
    assert plots.select_plot_panels(runs) == [("loss", ["loss"]), ("weight/*", ["weight/ce", "weight/kd"]), ("grad_norm", ["grad_norm"])]
    assert plots.select_plot_panels(runs, ["lr", "kd/*", "ir_loss"]) == [("lr", ["lr"])]


def test_a_plot_never_replaces_an_existing_file_unasked(tmp_path):
    from torchtune_kd.output_file import OutputFileError

    runs = {"a": {"loss": [(1, 1.0), (2, 0.5)]}}
    png = tmp_path / "curves.png"
    png.write_bytes(b"the user's picture")
    with pytest.raises(OutputFileError, match=r"curves\.png.* exists.*overwrite=True"):
        plots.plot_runs(runs, png)
    with pytest.raises(OutputFileError, match="exists"):
        plots.plot_metrics_by_step({"a": [(1, {"ppl": 2.0})]}, png, [("ppl", "p")])
    assert png.read_bytes() == b"the user's picture"
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no staging file left behind
    plots.plot_runs(runs, png, overwrite=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_models_refuses_a_users_folder_before_reading_any_model(tmp_path, monkeypatch):
    from torchtune_kd.output_folder import OutputFolderError

    def heavy(*args, **kwargs):
        raise AssertionError("a model folder was read before the output folder was checked")

    monkeypatch.setattr(lm_eval_runner, "validate_model_dir", heavy)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match=r"output_dir=.* holds files .* did not write \(notes\.txt\)"):
        lm_eval_runner.evaluate_models({"m": tmp_path / "model"}, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_plot_metrics_by_step_draws_each_curve_in_step_order_and_the_references(tmp_path, monkeypatch):
    import matplotlib.figure

    drawn = []
    real_savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (drawn.append(fig), real_savefig(fig, *a, **k)))
    curves = {
        "ce_only": [(10, {"ppl": 120.0, "kl": 1.3}), (0, {"ppl": 184.0, "kl": 1.5}), (5, {"ppl": 140.0, "kl": 1.2})],
        "distilled": [(0, {"ppl": 184.0, "kl": 1.5}), (5, {"ppl": 130.0, "kl": 1.1}), (10, {"ppl": 112.0, "kl": 1.0})],
    }
    out = tmp_path / "by_step" / "curves.png"
    plots.plot_metrics_by_step(curves, out, [("ppl", "perplexity"), ("kl", "KL")], references={"teacher": {"ppl": 53.4, "kl": 0.0}})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = drawn
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["perplexity", "KL"]
    lines = {line.get_label(): line for line in axes[0].get_lines()}
    assert list(lines["ce_only"].get_xdata()) == [0, 5, 10]
    assert list(lines["ce_only"].get_ydata()) == [184.0, 140.0, 120.0]
    assert list(lines["distilled"].get_ydata()) == [184.0, 130.0, 112.0]
    assert set(lines["teacher"].get_ydata()) == {53.4}
    assert set({line.get_label(): line for line in axes[1].get_lines()}["teacher"].get_ydata()) == {0.0}
    with pytest.raises(ValueError, match=r"'distilled' at step 5 lacks metric\(s\) \['agreement'\]"):
        plots.plot_metrics_by_step({"distilled": [(5, {"ppl": 1.0})]}, out, [("ppl", "p"), ("agreement", "a")])
    with pytest.raises(ValueError, match="at least one curve"):
        plots.plot_metrics_by_step({}, out, [("ppl", "p")])
