"""The shared output-folder rule (torchtune_kd.output_folder): new, empty or own folders only; foreign files never
touched, whatever their names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from torchtune_kd import output_folder
from torchtune_kd.output_folder import MARKER, OutputFolderError, check, claim_output_folder

OWNER = "scripts/example.py"


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (but the marker) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER}


def claim(path: Path, **kwargs) -> output_folder.OwnedFolder:
    return claim_output_folder(path, owner=OWNER, option="--out", overwrite_hint="--overwrite", **kwargs)


def test_a_new_folder_is_created_and_marked_with_its_owner(tmp_path):
    folder = claim(tmp_path / "a" / "b")
    assert folder.path.is_dir()
    marker = json.loads((tmp_path / "a" / "b" / MARKER).read_text())
    assert marker == {"format": 1, "owner": OWNER, "written": []}


def test_an_empty_folder_is_claimed(tmp_path):
    claim(tmp_path)
    assert (tmp_path / MARKER).is_file()


def test_a_file_is_refused_with_the_option_and_value_named(tmp_path):
    target = tmp_path / "results.md"
    target.write_text("mine")
    with pytest.raises(OutputFolderError, match=r"--out=.*results\.md.* is a file"):
        claim(target)
    assert target.read_text() == "mine"


def test_a_folder_with_a_users_files_is_refused_naming_them_and_the_fix(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(OutputFolderError) as err:
        claim(tmp_path)
    message = str(err.value)
    assert "model.safetensors" in message and "notes.txt" in message and "--overwrite" in message
    assert not (tmp_path / MARKER).exists()


def test_overwrite_adopts_a_foreign_folder_but_never_claims_its_files(tmp_path):
    (tmp_path / "results.md").write_text("mine")
    before = snapshot(tmp_path)
    folder = claim(tmp_path, overwrite=True)
    with pytest.raises(OutputFolderError, match="never replaced"):
        folder.claim("results.md")
    (folder.path_of("new.txt")).write_text("ours")
    folder.remove_all()
    assert snapshot(tmp_path) == before


def test_files_that_look_like_ours_by_name_are_still_foreign(tmp_path):
    # Names a command would write (and its temporaries' pattern) prove nothing without the marker.
    for name in ("epoch_0", "results.md", ".epoch_0.tmp", ".x.staging"):
        (tmp_path / name).write_text("user")
    before = snapshot(tmp_path)
    folder = claim(tmp_path, overwrite=True)
    assert folder.remove_temporaries() == []
    assert folder.remove_all() == []
    assert snapshot(tmp_path) == before


def test_a_rerun_sees_its_own_entries_and_may_remove_exactly_those(tmp_path):
    first = claim(tmp_path)
    first.path_of("results.md").write_text("old")
    (first.path_of("run")).mkdir()
    (tmp_path / "run" / "log.txt").write_text("old")
    (tmp_path / "user.txt").write_text("added by the user later")
    again = claim(tmp_path)
    assert again.written == ["results.md", "run"]
    removed = again.remove_all()
    assert sorted(p.name for p in removed) == ["results.md", "run"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER, "user.txt"]
    assert json.loads((tmp_path / MARKER).read_text())["written"] == []


def test_another_commands_folder_is_refused_even_with_overwrite(tmp_path):
    claim_output_folder(tmp_path, owner="scripts/other.py", option="--out").path_of("x").write_text("theirs")
    with pytest.raises(OutputFolderError, match="outputs of scripts/other.py"):
        claim(tmp_path, overwrite=True)


@pytest.mark.parametrize("content", ["not json", json.dumps({"owner": OWNER}), json.dumps(
    {"format": 1, "owner": OWNER, "written": ["../outside"]})])
def test_a_marker_not_written_by_this_project_makes_the_folder_foreign(tmp_path, content):
    (tmp_path / MARKER).write_text(content)
    (tmp_path / "outside").write_text("user")
    assert check(tmp_path, owner=OWNER, option="--out")
    with pytest.raises(OutputFolderError, match="was not written by"):
        claim(tmp_path, overwrite=True)
    assert (tmp_path / MARKER).read_text() == content


def test_remove_refuses_an_entry_it_did_not_claim(tmp_path):
    folder = claim(tmp_path)
    (tmp_path / "later.txt").write_text("user")
    with pytest.raises(OutputFolderError, match="never deleted"):
        folder.remove("later.txt")
    assert (tmp_path / "later.txt").read_text() == "user"


def test_temporaries_of_owned_entries_are_removed_and_look_alikes_kept(tmp_path):
    folder = claim(tmp_path)
    folder.claim("epoch_0")
    (tmp_path / ".epoch_0.staging").mkdir()
    (tmp_path / ".epoch_0.old").write_text("half a save")
    (tmp_path / ".epoch_1.staging").mkdir()  # not derived from an owned entry: not ours
    removed = folder.remove_temporaries()
    assert sorted(p.name for p in removed) == [".epoch_0.old", ".epoch_0.staging"]
    assert (tmp_path / ".epoch_1.staging").is_dir()


def test_a_symlinked_entry_is_unlinked_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("user")
    folder = claim(tmp_path / "out")
    folder.claim("link")
    (tmp_path / "out" / "link").symlink_to(outside, target_is_directory=True)
    folder.remove("link")
    assert (outside / "precious.txt").read_text() == "user"


def test_claim_rejects_paths_that_are_not_plain_names(tmp_path):
    folder = claim(tmp_path)
    for bad in ("a/b", "..", MARKER, ""):
        with pytest.raises(ValueError):
            folder.claim(bad)


def test_claim_or_exit_ends_with_the_message(tmp_path):
    (tmp_path / "mine.txt").write_text("user")
    with pytest.raises(SystemExit, match=r"^error: --out=.*mine\.txt"):
        output_folder.claim_or_exit(tmp_path, owner=OWNER, option="--out")


def test_removing_an_entry_keeps_the_replacement_staged_beside_it(tmp_path):
    # Replace-by-rename: the new version is staged as a temporary of the entry, the old one removed, then renamed.
    folder = claim(tmp_path)
    folder.path_of("teacher").mkdir()
    staged = tmp_path / ".teacher.staging"
    staged.mkdir()
    (staged / "model.safetensors").write_bytes(b"new")
    assert folder.remove("teacher")
    assert (staged / "model.safetensors").read_bytes() == b"new"


def test_remove_all_also_clears_the_temporaries_of_owned_entries(tmp_path):
    folder = claim(tmp_path)
    folder.path_of("run").mkdir()
    (tmp_path / ".run.staging").mkdir()
    (tmp_path / ".other.staging").mkdir()  # no owned entry of that name: not ours
    folder.remove_all()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.staging", MARKER]
