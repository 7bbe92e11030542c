"""scripts/prune.py's (torchtune_kd.cli.prune) output folder and arguments: a user's files are never replaced, every
problem is named (option or file, value, fix) before the teacher is loaded, and an identical earlier pruning is
reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from torchtune_kd import output_folder, pruning
from torchtune_kd.cli import prune
from torchtune_kd.testing.recipes import tiny_config


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (the marker included) and its bytes: equal before and after means untouched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def config(assets_root, tmp_path) -> Path:
    path = tmp_path / "cfg.yaml"
    OmegaConf.save(tiny_config(assets_root, tmp_path / "o"), path)
    return path


@pytest.fixture()
def no_heavy_work(monkeypatch):
    """Loading or building the teacher fails the test: refusals must come before it."""
    from torchtune.training import FullModelHFCheckpointer

    from torchtune_kd.core import models

    def heavy(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the refusal")

    monkeypatch.setattr(FullModelHFCheckpointer, "load_checkpoint", heavy)
    monkeypatch.setattr(models, "build_teacher", heavy)


def run(config: Path, out: Path, *extra: str, calibration: str | Path | None = None, layers: str = "2",
        tiny_assets=None) -> int:
    calibration = calibration if calibration is not None else tiny_assets["data"]["heldout_text"]
    return prune.main(["--config", str(config), "--calibration", str(calibration), "--num-layers", layers,
                       "--out", str(out), "--seq-len", "32", "--windows", "2", *extra])


def refused(*args, **kwargs) -> str:
    """The message of the SystemExit a run ends with."""
    with pytest.raises(SystemExit) as err:
        run(*args, **kwargs)
    return str(err.value.code)


def users_model_folder(tmp_path: Path) -> Path:
    out = tmp_path / "my_model"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the user's weights")
    (out / "config.json").write_text('{"mine": true}')
    (out / "notes.txt").write_text("keep me")
    return out


def test_prune_refuses_a_folder_holding_a_users_model(config, tiny_assets, tmp_path, no_heavy_work):
    out = users_model_folder(tmp_path)
    before = snapshot(out)
    message = refused(config, out, tiny_assets=tiny_assets)
    assert message.startswith("error: --out=") and "scripts/prune.py did not write" in message
    for name in ("config.json", "model.safetensors", "notes.txt", "--overwrite", "new or empty folder"):
        assert name in message
    assert snapshot(out) == before


def test_prune_overwrite_still_refuses_to_replace_a_users_model_file(config, tiny_assets, tmp_path, no_heavy_work):
    out = users_model_folder(tmp_path)
    before = snapshot(out)
    message = refused(config, out, "--overwrite", tiny_assets=tiny_assets)
    assert "model.safetensors" in message and "config.json" in message and "never replaces" in message
    assert "notes.txt" not in message  # not in the student's way: it would be written beside it
    assert snapshot(out) == before


def test_prune_overwrite_writes_beside_foreign_files_never_touching_them(config, tiny_assets, tmp_path):
    out = tmp_path / "shared"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert run(config, out, "--overwrite", tiny_assets=tiny_assets) == 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert json.loads((out / pruning.MARKER).read_text())["num_layers"] == 2
    marker = json.loads((out / output_folder.MARKER).read_text())
    assert marker["owner"] == "scripts/prune.py" and "notes.txt" not in marker["written"]
    assert {"model.safetensors", "config.json", pruning.MARKER} <= set(marker["written"])


def test_prune_reuses_an_identical_earlier_pruning_in_its_own_folder(config, tiny_assets, tmp_path):
    out = tmp_path / "student"
    assert run(config, out, tiny_assets=tiny_assets) == 0
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert run(config, out, tiny_assets=tiny_assets) == 0
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_prune_refuses_other_settings_in_its_own_folder_without_overwrite(config, tiny_assets, tmp_path,
                                                                          monkeypatch):
    out = tmp_path / "student"
    assert run(config, out, tiny_assets=tiny_assets) == 0
    before = snapshot(out)
    from torchtune_kd.core import models

    monkeypatch.setattr(models, "build_teacher", lambda *a, **k: pytest.fail("teacher built before the refusal"))
    message = refused(config, out, layers="3", tiny_assets=tiny_assets)
    assert "holds a student scripts/prune.py wrote with other settings" in message
    assert "num_layers 2 -> 3" in message and "--overwrite" in message
    assert snapshot(out) == before


def test_prune_overwrite_replaces_its_own_earlier_student(config, tiny_assets, tmp_path):
    out = tmp_path / "student"
    assert run(config, out, tiny_assets=tiny_assets) == 0
    assert run(config, out, "--overwrite", layers="3", tiny_assets=tiny_assets) == 0
    assert json.loads((out / pruning.MARKER).read_text())["num_layers"] == 3
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3


def test_prune_force_is_the_same_flag_as_overwrite(config, tiny_assets, tmp_path):
    out = tmp_path / "student"
    assert run(config, out, tiny_assets=tiny_assets) == 0
    assert run(config, out, "--force", layers="3", tiny_assets=tiny_assets) == 0
    assert json.loads((out / pruning.MARKER).read_text())["num_layers"] == 3


def test_prune_refuses_another_commands_folder(config, tiny_assets, tmp_path, no_heavy_work):
    out = tmp_path / "run"
    output_folder.claim_output_folder(out, owner="torchtune-kd recipe", option="output_dir")
    before = snapshot(out)
    message = refused(config, out, "--overwrite", tiny_assets=tiny_assets)
    assert "holds the outputs of torchtune-kd recipe" in message
    assert snapshot(out) == before


def test_prune_refuses_an_out_that_is_a_file_or_the_teacher(config, tiny_assets, tmp_path, no_heavy_work):
    target = tmp_path / "file"
    target.write_text("mine")
    assert "is a file" in refused(config, target, tiny_assets=tiny_assets)
    assert target.read_text() == "mine"
    teacher = Path(tiny_assets["teacher_dir"])
    before = snapshot(teacher)
    assert "is the teacher's folder" in refused(config, teacher, "--overwrite", tiny_assets=tiny_assets)
    assert snapshot(teacher) == before


def test_prune_names_a_missing_teacher_folder(config, tiny_assets, tmp_path, no_heavy_work):
    message = refused(config, tmp_path / "out", "teacher_checkpointer.checkpoint_dir=/nowhere/teacher",
                      tiny_assets=tiny_assets)
    assert message == ("error: teacher_checkpointer.checkpoint_dir='/nowhere/teacher' (from --config) does not exist: "
                       "point it at the teacher's Hugging Face folder, e.g. with the override "
                       "teacher_checkpointer.checkpoint_dir=DIR")
    assert not (tmp_path / "out").exists()


def test_prune_names_a_teacher_folder_without_config_or_weights(config, tiny_assets, tmp_path, no_heavy_work):
    empty = tmp_path / "empty_teacher"
    empty.mkdir()
    message = refused(config, tmp_path / "out", f"teacher_checkpointer.checkpoint_dir={empty}",
                      tiny_assets=tiny_assets)
    assert "has no config.json" in message and str(empty) in message
    (empty / "config.json").write_text(json.dumps({"num_hidden_layers": 4}))
    message = refused(config, tmp_path / "out", f"teacher_checkpointer.checkpoint_dir={empty}",
                      tiny_assets=tiny_assets)
    assert "teacher_checkpointer.checkpoint_files: model.safetensors not found" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layers, expected", [
    ("0", "--num-layers=0 must be at least 1"),
    ("5", "--num-layers=5 must be from 1 to the teacher's depth 4"),
])
def test_prune_refuses_a_depth_out_of_range(config, tiny_assets, tmp_path, no_heavy_work, layers, expected):
    assert expected in refused(config, tmp_path / "out", layers=layers, tiny_assets=tiny_assets)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, value, expected", [
    ("--seq-len", "1", "--seq-len=1 must be at least 2"),
    ("--seq-len", "0", "--seq-len=0 must be at least 2"),
    ("--windows", "0", "--windows=0 must be at least 1"),
])
def test_prune_refuses_windows_and_sequence_lengths_below_one_window(config, tiny_assets, tmp_path, no_heavy_work,
                                                                     option, value, expected):
    assert expected in refused(config, tmp_path / "out", option, value, tiny_assets=tiny_assets)


@pytest.mark.parametrize("name, content, expected", [
    ("missing.txt", None, "does not exist"),
    ("empty.txt", "", "holds no text"),
    ("blank.json", "[]", "is an empty list ([])"),
    ("broken.json", "[{", "is not valid JSON (line 1"),
    ("object.json", '{"a": 1}', "is JSON but not a list of records"),
    ("short.txt", "Too short.", "fewer than one window of --seq-len=32"),
])
def test_prune_names_the_calibration_file_it_refuses(config, tiny_assets, tmp_path, no_heavy_work, name, content,
                                                      expected):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    message = refused(config, tmp_path / "out", calibration=path, tiny_assets=tiny_assets)
    assert message.startswith(f"error: --calibration={str(path)!r}") and expected in message
    assert not (tmp_path / "out").exists()


def test_prune_refuses_an_abbreviated_option(config, tiny_assets, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        prune.main(["--config", str(config), "--calibration", tiny_assets["data"]["heldout_text"], "--num", "2",
                    "--out", str(tmp_path / "out")])
    assert err.value.code == 2 and "--num" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_prune_names_a_missing_config(tiny_assets, tmp_path, no_heavy_work):
    message = refused(tmp_path / "nope.yaml", tmp_path / "out", tiny_assets=tiny_assets)
    assert message.startswith(f"error: --config={str(tmp_path / 'nope.yaml')!r} does not exist")
