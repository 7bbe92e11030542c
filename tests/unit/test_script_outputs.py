"""Every script that writes follows the output-folder rule (torchtune_kd.output_folder / output_file).

Each ``scripts/<name>.py`` runs ``torchtune_kd.cli.<name>.main``; the tests call that function. Pointed at a folder
holding a user's file (or, for an option naming one file, at a user's file), each command exits non-zero before any
heavy work, naming the folder, and leaves the user's file byte-identical and nothing new beside it. "Before any heavy
work" is checked, not trusted: the calls that start the work (building the stand-ins, loading a model, starting a
run or a subprocess) are replaced by stubs that raise :class:`HeavyWorkStarted`. Pointed at a new folder, a command
marks it as its own (the marker names the script) before that work starts.

Also: every ``argparse.ArgumentParser`` (and sub-parser) in scripts/, recipes/ and src/ is built with
``allow_abbrev=False``, so that a shortened or mistyped option is an error, never silently another option; every
script is a thin entry point of its command module, and no code edits ``sys.path`` or loads a module by file path
(only the install hook ``torchtune_kd.recipes_path`` puts the checkout on ``sys.path``).
"""

from __future__ import annotations

import ast
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

import pytest

from torchtune_kd import output_file
from torchtune_kd.output_folder import MARKER

REPO = Path(__file__).resolve().parents[2]
USER_FILE = "notes.txt"
USER_BYTES = b"the user's own notes\n"


class HeavyWorkStarted(BaseException):
    """Raised by the stubs of heavy calls. A BaseException, so that no script's ``except Exception`` hides it."""


def load_script(name: str) -> ModuleType:
    """The command module behind ``scripts/<name>.py`` (``torchtune_kd.cli.<name>``)."""
    return importlib.import_module(f"torchtune_kd.cli.{name}")


def _resolve(script: ModuleType, spec: str) -> tuple[Any, str]:
    """``"pkg.module:attr"`` (or ``"script:attr"`` for the command module, ``"pkg.module:Class.attr"``) -> (owner
    object, attribute)."""
    module_name, _, dotted = spec.partition(":")
    owner: Any = script if module_name == "script" else importlib.import_module(module_name)
    *parents, attr = dotted.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, attr


def stub_heavy(monkeypatch: pytest.MonkeyPatch, script: ModuleType, specs: tuple[str, ...]) -> None:
    for spec in specs:
        owner, attr = _resolve(script, spec)

        def heavy(*args: Any, _spec: str = spec, **kwargs: Any) -> Any:
            raise HeavyWorkStarted(f"{_spec} was called")

        monkeypatch.setattr(owner, attr, heavy)


def run_main(script: ModuleType, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Run ``script.main(argv)``; its exit status and everything it said (the SystemExit message included)."""
    try:
        code = script.main(argv)
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    text = (code if isinstance(code, str) else "") + captured.err + captured.out
    status = 1 if isinstance(code, str) else int(code or 0)
    return status, text


def tree(folder: Path) -> dict[str, bytes]:
    """Every path under ``folder`` with a file's bytes (b"" for a folder)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"") for p in sorted(folder.rglob("*"))}


@dataclass(frozen=True)
class Case:
    """One output option of one script.

    ``argv(tmp, target, assets)`` builds the command line with ``target`` as the option's value; ``assets`` is the
    tiny stand-ins' root for the cases that need a real config (``needs_assets``), else None.
    """

    script: str
    option: str
    argv: Callable[[Path, Path, Optional[Path]], list[str]]
    heavy: tuple[str, ...]
    kind: str = "folder"  # or "file": the option names one file
    owner: Optional[str] = None  # the marker's owner a new folder gets; None: no fresh-folder check for this case
    fresh_stubs: dict[str, Callable[..., Any]] = field(default_factory=dict)  # cheap stand-ins for the fresh run
    needs_assets: bool = False


BUILD = "torchtune_kd.testing.standins:build_all"
RUN = "torchtune_kd.tune_cli:tune_run"
CASES = {
    "experiment --out": Case(
        "experiment", "--out", lambda tmp, t, a: ["--tiny", "--assets", str(tmp / "assets"), "--out", str(t)],
        (BUILD, RUN), owner="scripts/experiment.py"),
    "experiment --assets": Case(
        "experiment", "--assets", lambda tmp, t, a: ["--tiny", "--assets", str(t), "--out", str(tmp / "out")],
        (BUILD, RUN)),
    "experiment --teacher-cache": Case(
        "experiment", "--teacher-cache",
        lambda tmp, t, a: ["--tiny", "--assets", str(tmp / "assets"), "--out", str(tmp / "out"), "--teacher-cache", str(t)],
        (BUILD, RUN)),
    "compare_grids --out": Case(
        "compare_grids", "--out", lambda tmp, t, a: [str(tmp / "grid_a"), str(tmp / "grid_b"), "--out", str(t)],
        ("script:read_grid",), kind="file"),
    "evaluate --output-dir": Case(
        "evaluate", "--output-dir", lambda tmp, t, a: ["--model", f"m={tmp / 'model'}", "--output-dir", str(t)],
        ("torchtune_kd.evaluation.lm_eval_runner:validate_model_dir", "torchtune_kd.evaluation.lm_eval_runner:run_lm_eval",
         "torchtune_kd.evaluation.lm_eval_runner:write_offline_task_yamls"),
        owner="scripts/evaluate.py",
        # The model folders are validated before the folder is claimed (a refused model leaves no folder behind).
        fresh_stubs={"torchtune_kd.evaluation.lm_eval_runner:validate_model_dir": lambda path, **kw: Path(path)}),
    "evaluate --write-task-yamls": Case(
        "evaluate", "--write-task-yamls", lambda tmp, t, a: ["--write-task-yamls", str(t)],
        ("torchtune_kd.evaluation.lm_eval_tasks:write_offline_task_yamls",), owner="scripts/evaluate.py"),
    "plot_run --out": Case(
        "plot_run", "--out", lambda tmp, t, a: [str(tmp / "run"), "--out", str(t)],
        ("torchtune_kd.evaluation.run_logs:read_run_logs", "torchtune_kd.evaluation.plots:plot_runs"), kind="file"),
    "bench_cache --workdir": Case(
        "bench_cache", "--workdir", lambda tmp, t, a: ["--smoke", "--workdir", str(t)], (BUILD, RUN),
        owner="scripts/bench_cache.py"),
    "bench_recipe --workdir": Case(
        "bench_recipe", "--workdir", lambda tmp, t, a: ["--vocab", "1280", "--workdir", str(t)], (BUILD,),
        owner="scripts/bench_recipe.py"),
    "bench_recipe --json": Case(
        "bench_recipe", "--json",
        lambda tmp, t, a: ["--vocab", "1280", "--workdir", str(tmp / "work"), "--json", str(t)], (BUILD,), kind="file"),
    "bench_on_policy --workdir": Case(
        "bench_on_policy", "--workdir", lambda tmp, t, a: ["--workdir", str(t)],
        ("torchtune_kd.cli.bench_on_policy:bench_generation", BUILD), owner="scripts/bench_on_policy.py"),
    "bench_on_policy --json": Case(
        "bench_on_policy", "--json", lambda tmp, t, a: ["--workdir", str(tmp / "work"), "--json", str(t)],
        ("torchtune_kd.cli.bench_on_policy:bench_generation", BUILD), kind="file"),
    "bench_losses --json": Case(
        "bench_losses", "--json", lambda tmp, t, a: ["--quick", "--json", str(t)], ("subprocess:run",), kind="file"),
    "profile_recipe --output-dir": Case(
        "profile_recipe", "--output-dir",
        lambda tmp, t, a: [str(REPO / "configs" / "tiny_cpu.yaml"), "--output-dir", str(t)],
        ("torchtune_kd.testing.recipes:load_recipe_module",), owner="scripts/profile_recipe.py"),
    "distributed_check equivalence --workdir": Case(
        "distributed_check", "--workdir", lambda tmp, t, a: ["equivalence", "--workdir", str(t)], (BUILD, RUN),
        owner="scripts/distributed_check.py"),
    "distributed_check dummy --workdir": Case(
        "distributed_check", "--workdir",
        lambda tmp, t, a: ["dummy", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--workdir", str(t)],
        (BUILD, RUN, "torchtune_kd.testing.standins:write_random_checkpoint")),
    "pruning_report --out": Case(
        "pruning_report", "--out",
        lambda tmp, t, a: ["--config", str(tmp / "c.yaml"), "--calibration", str(tmp / "c.txt"), "--heldout",
                           str(tmp / "h.txt"), "--depths", "3", "--out", str(t)],
        ("omegaconf:OmegaConf.load", "torchtune_kd.pruning:write_pruned_student"), owner="scripts/pruning_report.py"),
    "build_tiny_assets OUT_DIR": Case(
        "build_tiny_assets", "OUT_DIR", lambda tmp, t, a: [str(t)], ("torchtune_kd.testing.standins:build_tokenizer",),
        owner="torchtune_kd.testing.standins"),
    "prepare_smollm2 CACHE_DIR": Case(
        "prepare_smollm2", "CACHE_DIR", lambda tmp, t, a: [str(t), "--no-gensim"],
        ("torchtune_kd.models.smollm2:convert_smollm2",), owner="scripts/prepare_smollm2.py"),
    "build_bpe_student --out": Case(
        "build_bpe_student", "--out",
        lambda tmp, t, a: ["--out", str(t), "--train-json", str(tmp / "train.json"), "--pretrain-steps", "0"],
        ("torchtune_kd.testing.standin_text:build_tokenizer",), owner="scripts/build_bpe_student.py"),
    "pad_vocab --out": Case(
        "pad_vocab", "--out",
        lambda tmp, t, a: ["--checkpoint", str(a / "teacher"), "--rows", "8", "--out", str(t)],
        ("torchtune_kd.models.padding:load_file",), owner="scripts/pad_vocab.py", needs_assets=True),
    # prune.py and demo.py (kept here so that every writing script is in one table).
    "prune --out": Case(
        "prune", "--out",
        lambda tmp, t, a: ["--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--calibration",
                           str(a / "data" / "alpaca_train.json"), "--num-layers", "2", "--out", str(t)],
        ("torchtune_kd.pruning:block_influence", "torchtune_kd.core.models:build_teacher"), owner="scripts/prune.py",
        needs_assets=True),
    "demo --out": Case(
        "demo", "--out", lambda tmp, t, a: ["--tiny", "--out", str(t), "--cache", str(tmp / "cache")],
        ("script:prepare_tiny", "script:prepare_real", BUILD, RUN), owner="scripts/demo.py"),
    "demo --cache": Case(
        "demo", "--cache", lambda tmp, t, a: ["--tiny", "--out", str(tmp / "out"), "--cache", str(t)],
        ("script:prepare_tiny", "script:prepare_real", BUILD, RUN)),
}


@pytest.fixture()
def case_env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Callable[[Case], Optional[Path]]:
    """Set up what a case needs (the stand-ins for a real config); returns their root or None."""

    def prepare(case: Case) -> Optional[Path]:
        if not case.needs_assets:
            return None
        root = Path(request.getfixturevalue("tiny_assets")["root"])
        monkeypatch.setenv("KD_ASSETS", str(root))
        return root

    return prepare


@pytest.mark.parametrize("name", list(CASES))
def test_a_script_refuses_a_users_folder_or_file_before_any_heavy_work(name, tmp_path, monkeypatch, capsys, case_env):
    case = CASES[name]
    assets = case_env(case)
    monkeypatch.chdir(tmp_path)  # a relative default (e.g. outputs/) must not land in the checkout
    if case.kind == "folder":
        target = tmp_path / "target"
        target.mkdir()
        user_file = target / USER_FILE
    else:
        target = user_file = tmp_path / "user_table.md"
    user_file.write_bytes(USER_BYTES)
    before = tree(tmp_path)
    script = load_script(case.script)
    stub_heavy(monkeypatch, script, case.heavy)

    status, said = run_main(script, case.argv(tmp_path, target, assets), capsys)

    assert status != 0, said
    assert str(target) in said and case.option in said, said
    assert user_file.read_bytes() == USER_BYTES
    # Nothing new anywhere: no marker in the user's folder, no other output folder made before the refusal.
    assert tree(tmp_path) == before


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.owner])
def test_a_script_marks_a_new_folder_as_its_own_before_the_heavy_work(name, tmp_path, monkeypatch, capsys, case_env):
    case = CASES[name]
    assets = case_env(case)
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "new" / "outputs"
    script = load_script(case.script)
    stub_heavy(monkeypatch, script, case.heavy)
    for spec, replacement in case.fresh_stubs.items():
        owner, attr = _resolve(script, spec)
        monkeypatch.setattr(owner, attr, replacement)
    (tmp_path / "model").mkdir()  # the model folder the evaluate case names

    with pytest.raises(HeavyWorkStarted):
        run_main(script, case.argv(tmp_path, target, assets), capsys)

    marker = json.loads((target / MARKER).read_text())
    assert marker["format"] == 1 and marker["owner"] == case.owner


def test_a_rerun_resumes_in_the_experiments_own_folder(tmp_path, monkeypatch, capsys):
    # The grid's folder is its own after the first run: a second run is let in (and would skip finished cells).
    script = load_script("experiment")
    stub_heavy(monkeypatch, script, (BUILD, RUN))
    argv = ["--tiny", "--assets", str(tmp_path / "assets"), "--out", str(tmp_path / "grid")]
    for _ in range(2):
        with pytest.raises(HeavyWorkStarted):
            run_main(script, argv, capsys)
    written = json.loads((tmp_path / "grid" / MARKER).read_text())["written"]
    assert {"cells", "command.txt", "results.csv", "summary.md"} <= set(written)


def test_a_folder_another_command_wrote_is_refused(tmp_path, monkeypatch, capsys):
    script = load_script("bench_recipe")
    stub_heavy(monkeypatch, script, (BUILD,))
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / MARKER).write_text(json.dumps({"format": 1, "owner": "scripts/bench_cache.py", "written": []}))
    status, said = run_main(script, ["--workdir", str(tmp_path / "work")], capsys)
    assert status != 0 and "scripts/bench_cache.py" in said and "--workdir" in said


# ------------------------------------------------------------------------------------------- single output files


def test_overwrite_replaces_the_file_the_user_named(tmp_path, capsys):
    from torchtune_kd.experiment import Cell

    script = load_script("compare_grids")
    for grid in ("a", "b"):
        for seed in range(2):
            for divergence in ("ce_only", "jsd"):
                cell = Cell(divergence, "off", seed)
                folder = tmp_path / grid / "cells" / cell.name
                folder.mkdir(parents=True)
                (folder / "result.json").write_text(json.dumps(
                    {"cell": cell.name, "setting": cell.setting, "divergence": divergence, "ir": "off", "seed": seed,
                     "heldout_ppl": 10.0 + seed}))
    table = tmp_path / "table.md"
    table.write_bytes(USER_BYTES)
    argv = [str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(table)]
    status, said = run_main(script, argv, capsys)
    assert status != 0 and "--overwrite" in said and table.read_bytes() == USER_BYTES
    assert run_main(script, [*argv, "--overwrite"], capsys)[0] == 0
    assert table.read_text().startswith("| setting | n |")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "table.md"]  # no staging file left


def test_an_output_file_is_written_whole_or_not_at_all(tmp_path):
    target = tmp_path / "report.json"
    with pytest.raises(RuntimeError):
        with output_file.staged(target, option="--json") as staging:
            staging.write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    output_file.write(target, "{}", option="--json")
    assert target.read_text() == "{}"
    with pytest.raises(output_file.OutputFileError, match=r"--json=.*report\.json.* exists.*--overwrite"):
        output_file.write(target, "[]", option="--json")
    assert target.read_text() == "{}"
    output_file.write(target, "[]", option="--json", overwrite=True)
    assert target.read_text() == "[]"


def test_an_output_file_that_appears_while_writing_is_never_replaced(tmp_path):
    target = tmp_path / "table.md"
    with pytest.raises(output_file.OutputFileError, match="exists"):
        with output_file.staged(target, option="--out") as staging:
            staging.write_text("ours")
            target.write_bytes(USER_BYTES)  # the user's file, written meanwhile
    assert target.read_bytes() == USER_BYTES
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]


def test_a_folder_is_no_output_file(tmp_path):
    (tmp_path / "plot.png").mkdir()
    assert output_file.check(tmp_path / "plot.png", option="--out", overwrite=True) == [
        f"--out={str(tmp_path / 'plot.png')!r} is a folder: give the path of the file to write"
    ]


# ------------------------------------------------------------------------------------------------- the stand-ins


def test_the_stand_ins_refuse_a_folder_holding_a_users_file(tmp_path, monkeypatch):
    from torchtune_kd.output_folder import OutputFolderError
    from torchtune_kd.testing import standins

    stub_heavy(monkeypatch, standins, ("torchtune_kd.testing.standins:build_tokenizer",))
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / USER_FILE).write_bytes(USER_BYTES)
    before = tree(tmp_path)
    with pytest.raises(OutputFolderError, match=r"--assets=.*holds files"):
        standins.build_all(tmp_path, option="--assets")
    assert tree(tmp_path) == before


def test_the_stand_ins_build_into_a_callers_folder_without_touching_its_other_entries(tmp_path, monkeypatch):
    from torchtune_kd import output_folder
    from torchtune_kd.testing import standins

    stub_heavy(monkeypatch, standins, ("torchtune_kd.testing.standins:build_tokenizer",))
    folder = output_folder.claim_output_folder(tmp_path, owner="scripts/demo.py", option="--cache")
    folder.path_of("student_pruned").mkdir()
    with pytest.raises(HeavyWorkStarted):
        standins.build_all(tmp_path, folder=folder)
    marker = json.loads((tmp_path / MARKER).read_text())
    assert marker["owner"] == "scripts/demo.py"
    assert set(marker["written"]) == {"student_pruned", "manifest.json", "tokenizer", "data", "teacher", "student"}
    assert (tmp_path / "student_pruned").is_dir()


# ------------------------------------------------------------------------------------------------- allow_abbrev


def _parser_calls() -> list[tuple[str, int, Optional[bool]]]:
    """(file, line, allow_abbrev value or None when not a literal False) of every parser built in the repo's code."""
    found = []
    for top in ("scripts", "recipes", "src"):
        for path in sorted((REPO / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
                if name not in ("ArgumentParser", "add_parser"):
                    continue
                value = next((kw.value for kw in node.keywords if kw.arg == "allow_abbrev"), None)
                literal = value.value if isinstance(value, ast.Constant) else None
                found.append((str(path.relative_to(REPO)), node.lineno, literal))
    return found


def test_every_argument_parser_refuses_abbreviated_options():
    calls = _parser_calls()
    commands = {path for path, _, _ in calls if path.startswith("src/torchtune_kd/cli/")}
    assert len(commands) >= 14, commands  # the scan finds the commands' parsers (a broken scan must not pass)
    missing = [f"{path}:{line}" for path, line, value in calls if value is not False]
    assert not missing, f"argparse parsers without allow_abbrev=False: {missing}"


def test_an_abbreviated_option_is_an_error(tmp_path, capsys):
    script = load_script("compare_grids")
    with pytest.raises(SystemExit) as exit:
        script.main([str(tmp_path), str(tmp_path), "--over"])
    assert exit.value.code == 2 and "--over" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ thin scripts


def _script_files() -> list[Path]:
    return sorted((REPO / "scripts").glob("*.py"))


def test_every_script_only_calls_its_command_module():
    scripts = _script_files()
    assert len(scripts) >= 14, scripts
    for path in scripts:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
        command = f"torchtune_kd.cli.{path.stem}"
        found = [ast.unparse(node) for node in imports]
        assert found == ["import sys", f"from {command} import main"], f"{path.name} imports {found}"
        defined = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign))]
        assert not defined, f"{path.name} defines {[getattr(n, 'name', 'a value') for n in defined]}: move it into {command}"
        assert callable(importlib.import_module(command).main)


def _path_edits(path: Path) -> list[str]:
    """Lines of ``path`` that change ``sys.path`` or load a module from a file path."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = ast.unparse(node.func)
            if target.startswith("sys.path.") or node.func.attr in ("spec_from_file_location", "run_path"):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {target}")
    return found


def test_only_the_install_hook_edits_sys_path_or_loads_modules_by_path():
    hook = REPO / "src" / "torchtune_kd" / "recipes_path.py"
    files = [p for top in ("scripts", "recipes", "src", "tests") for p in sorted((REPO / top).rglob("*.py")) if p != hook]
    assert _path_edits(hook), "the scan no longer recognises the hook's own sys.path edit"
    edits = [line for path in files for line in _path_edits(path)]
    assert not edits, edits


def test_the_commands_run_in_the_checkout_the_install_hook_activated():
    from torchtune_kd.cli import checkout_dir

    assert checkout_dir() == REPO


def test_a_recipes_package_outside_a_checkout_is_refused_with_the_fix(tmp_path, monkeypatch):
    # What `import recipes` finds without the install hook: torchtune's own package, in site-packages.
    import importlib.machinery
    import sys
    import types

    from torchtune_kd.cli import checkout_dir

    folder = tmp_path / "site-packages" / "recipes"
    folder.mkdir(parents=True)
    spec = importlib.machinery.ModuleSpec("recipes", None, origin=str(folder / "__init__.py"), is_package=True)
    spec.submodule_search_locations = [str(folder)]
    module = types.ModuleType("recipes")
    module.__spec__ = spec
    monkeypatch.setitem(sys.modules, "recipes", module)
    with pytest.raises(SystemExit, match=r"not a torchtune-kd checkout's.*make setup"):
        checkout_dir()
