"""scripts/demo.py's output folder: an earlier demo's files are replaced (so old metric logs never merge into new
curves), anything else is refused and left untouched."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _demo():
    spec = importlib.util.spec_from_file_location("demo_script", REPO / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_earlier_demos_outputs_are_cleared(tmp_path):
    demo = _demo()
    out = tmp_path / "demo"
    (out / "ce_only" / "logs").mkdir(parents=True)
    (out / "ce_only" / "logs" / "log_1.txt").write_text("Step 21 | loss:5.0\n")
    (out / "results.md").write_text("old")
    demo.claim_output_folder(out)
    assert out.is_dir() and list(out.iterdir()) == []
    demo.claim_output_folder(tmp_path / "new" / "folder")  # created
    assert (tmp_path / "new" / "folder").is_dir()


def test_a_folder_with_other_files_is_refused_and_untouched(tmp_path):
    demo = _demo()
    out = tmp_path / "mine"
    (out / "ce_only").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match=r"holds files the demo did not write \(notes.txt\)"):
        demo.claim_output_folder(out)
    assert (out / "notes.txt").read_text() == "keep me" and (out / "ce_only").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="is a file"):
        demo.claim_output_folder(tmp_path / "file")
