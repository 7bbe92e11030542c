"""scripts/demo.py's (torchtune_kd.cli.demo) folders: --out and --cache are new, empty or the demo's own (torchtune_kd.output_folder); a rerun
replaces exactly what the demo's marker lists in --out and reuses the cache; a folder holding anything else is
refused before stage 1, untouched; the set-up's library calls claim their cache entries before writing them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from torchtune_kd import output_folder
from torchtune_kd.cli import demo as demo_command
from torchtune_kd.output_folder import MARKER

OWNER = "scripts/demo.py"


@pytest.fixture()
def demo(monkeypatch):
    """The demo's command module, with every stage-1 set-up failing the test if reached."""
    module = demo_command

    def heavy(*args, **kwargs):
        raise AssertionError("stage 1 started before the refusal")

    monkeypatch.setattr(module, "prepare_tiny", heavy)
    monkeypatch.setattr(module, "prepare_real", heavy)
    return module


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (the marker included) and its bytes: equal before and after means untouched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refusal(demo, *argv: str) -> str:
    with pytest.raises(SystemExit) as err:
        demo.main(["--tiny", *argv])
    return str(err.value.code)


def mark(folder: Path, written: list[str], owner: str = OWNER) -> None:
    """What an earlier demo run leaves: its marker listing the entries it wrote."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(json.dumps({"format": 1, "owner": owner, "written": written}))


def test_a_rerun_replaces_only_what_the_demos_marker_lists(demo, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    (out / "ce_only" / "logs").mkdir(parents=True)
    (out / "ce_only" / "logs" / "log_1.txt").write_text("Step 21 | loss:5.0\n")
    (out / "results.md").write_text("old")
    (out / "notes.txt").write_text("the user's, added later")
    mark(out, ["ce_only", "results.md"])
    demo.claim_folders(out, cache, ["teacher"])
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "notes.txt"]
    assert (out / "notes.txt").read_text() == "the user's, added later"
    # Every output is claimed before stage 1, so the recipe's run folders start new.
    assert json.loads((out / MARKER).read_text())["written"] == list(demo.OUT_ENTRIES)


def test_a_new_out_folder_is_created_and_claimed(demo, tmp_path):
    demo.claim_folders(tmp_path / "new" / "out", tmp_path / "new" / "cache", ["teacher"])
    marker = json.loads((tmp_path / "new" / "out" / MARKER).read_text())
    assert marker["owner"] == OWNER and marker["written"] == list(demo.OUT_ENTRIES)


def test_out_with_a_users_files_is_refused_before_stage_1_naming_them(demo, tmp_path):
    out = tmp_path / "out"
    (out / "distilled").mkdir(parents=True)
    (out / "distilled" / "README.txt").write_text("my notes on the run")
    (out / "results.md").write_text("my results")
    before = snapshot(out)
    message = refusal(demo, "--out", str(out), "--cache", str(tmp_path / "cache"))
    assert message.startswith(f"error: --out={str(out)!r} holds files scripts/demo.py did not write")
    assert "distilled" in message and "results.md" in message and "new or empty folder" in message
    assert snapshot(out) == before
    assert not (tmp_path / "cache").exists()  # nothing at all was written


def test_a_cache_holding_a_users_data_is_refused_and_never_replaced(demo, tmp_path):
    cache = tmp_path / "cache"
    (cache / "data").mkdir(parents=True)
    (cache / "data" / "alpaca_train.json").write_text('[{"instruction": "mine", "input": "", "output": "mine"}]')
    before = snapshot(cache)
    message = refusal(demo, "--cache", str(cache), "--out", str(tmp_path / "out"))
    assert message.startswith(f"error: --cache={str(cache)!r} holds files scripts/demo.py did not write (data)")
    assert snapshot(cache) == before
    assert not (tmp_path / "out").exists()


def test_a_demo_cache_holding_a_foreign_entry_the_set_up_would_write_is_refused(demo, tmp_path):
    cache = tmp_path / "cache"
    mark(cache, ["teacher"])
    (cache / "data").mkdir()
    (cache / "data" / "alpaca_train.json").write_text("[]")
    before = snapshot(cache)
    message = refusal(demo, "--cache", str(cache), "--out", str(tmp_path / "out"))
    assert "holds data, which scripts/demo.py did not write and never replaces" in message
    assert snapshot(cache) == before


def test_the_cache_is_reused_on_a_rerun_not_emptied(demo, tmp_path):
    cache = tmp_path / "cache"
    mark(cache, ["teacher"])
    (cache / "teacher").mkdir()
    (cache / "teacher" / "conversion.json").write_text("{}")
    _, folder = demo.claim_folders(tmp_path / "out", cache, ["teacher", "text", "student_20L_bi"])
    assert (cache / "teacher" / "conversion.json").read_text() == "{}"
    assert folder.written == ["teacher", "text", "student_20L_bi"]


def test_another_commands_folder_is_refused(demo, tmp_path):
    out = tmp_path / "run"
    mark(out, [], owner="torchtune-kd recipe")
    before = snapshot(out)
    assert "holds the outputs of torchtune-kd recipe" in refusal(demo, "--out", str(out), "--cache",
                                                                 str(tmp_path / "c"))
    assert snapshot(out) == before


@pytest.mark.parametrize("option", ["--out", "--cache"])
def test_a_file_given_as_a_folder_is_refused(demo, tmp_path, option):
    target = tmp_path / "file"
    target.write_text("mine")
    other = "--cache" if option == "--out" else "--out"
    message = refusal(demo, option, str(target), other, str(tmp_path / "other"))
    assert message.startswith(f"error: {option}={str(target)!r} is a file")
    assert target.read_text() == "mine" and not (tmp_path / "other").exists()


@pytest.mark.parametrize("out, cache", [("same", "same"), ("cache/out", "cache"), ("out", "out/cache")])
def test_out_and_cache_must_be_separate_folders(demo, tmp_path, out, cache):
    message = refusal(demo, "--out", str(tmp_path / out), "--cache", str(tmp_path / cache))
    assert "must be separate folders, neither inside the other" in message
    assert list(tmp_path.iterdir()) == []


# The set-up's library calls, given the demo's claimed cache, claim their entries and never touch a foreign one.

def test_text_preparation_claims_its_entries_in_the_demos_cache(tmp_path):
    from torchtune_kd.data import text as text_data

    demo = demo_command
    folder = output_folder.claim_output_folder(tmp_path / "cache", owner=OWNER, option="--cache")
    paths = text_data.prepare_text_data(folder, use_gensim=False, max_train=8)
    assert paths["train"].is_file()
    assert set(folder.written) == {"text"}
    assert {p.name for p in folder.path.iterdir()} - {MARKER} <= set(demo.REAL_CACHE_ENTRIES)


def test_text_preparation_never_overwrites_files_it_does_not_own(tmp_path):
    from torchtune_kd.data import text as text_data

    (tmp_path / "cache" / "text").mkdir(parents=True)
    (tmp_path / "cache" / "text" / "train.json").write_text("the user's")
    folder = output_folder.claim_output_folder(tmp_path / "other", owner=OWNER, option="--cache")
    (folder.path / "text").mkdir()
    with pytest.raises(output_folder.OutputFolderError, match="did not write it"):
        text_data.prepare_text_data(folder, use_gensim=False, max_train=8)
    # A plain path (no folder claimed): a file already there is never overwritten either.
    with pytest.raises(output_folder.OutputFolderError, match=r"holds train\.json.*never overwrites"):
        text_data.prepare_text_data(tmp_path / "cache", use_gensim=False, max_train=8)
    assert (tmp_path / "cache" / "text" / "train.json").read_text() == "the user's"


def test_the_conversion_refuses_a_teacher_folder_it_does_not_own_before_loading_anything(tmp_path, monkeypatch):
    from torchtune_kd.models import smollm2

    monkeypatch.setattr(smollm2, "find_smollm2_gguf", lambda: pytest.fail("the conversion started"))
    folder = output_folder.claim_output_folder(tmp_path / "cache", owner=OWNER, option="--cache", overwrite=True)
    (folder.path / "teacher").mkdir()
    (folder.path / "teacher" / "model.safetensors").write_bytes(b"the user's")
    with pytest.raises(output_folder.OutputFolderError, match="did not write it"):
        smollm2.convert_smollm2(folder)
    # Without a claimed cache an existing teacher folder that is no finished conversion is never deleted.
    with pytest.raises(output_folder.OutputFolderError, match="never deletes a folder it was not given to own"):
        smollm2.convert_smollm2(folder.path)
    assert (folder.path / "teacher" / "model.safetensors").read_bytes() == b"the user's"


def test_the_conversion_reuses_its_own_finished_teacher(tmp_path, monkeypatch):
    from torchtune_kd.models import smollm2

    monkeypatch.setattr(smollm2, "find_smollm2_gguf", lambda: pytest.fail("converted again"))
    folder = output_folder.claim_output_folder(tmp_path / "cache", owner=OWNER, option="--cache")
    teacher = folder.path_of("teacher")
    teacher.mkdir()
    (teacher / "conversion.json").write_text("{}")
    assert smollm2.convert_smollm2(folder) == teacher
    assert folder.written == ["teacher"]
