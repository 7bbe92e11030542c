"""What the install must (not) contain, and which checkout's code runs."""

import importlib
import importlib.util
from pathlib import Path


def test_peft_is_absent():
    # With peft installed, transformers 5 would apply a torchtune LoRA folder's adapter files on top of the merged
    # weights (logits off by ~0.4), and lm-eval would silently score the wrong model.
    assert importlib.util.find_spec("peft") is None


def test_pinned_versions():
    import torch
    import torchao
    import torchtune

    assert torchtune.__version__.startswith("0.6.1")
    assert torch.__version__.startswith("2.13.")
    major, minor = (int(x) for x in torchao.__version__.split(".")[:2])
    assert (major, minor) <= (0, 14) and (major, minor) != (0, 12)


def test_modules_import_from_the_checkouts_src():
    # kd_losses stays a top-level name (YAML says `_component_: kd_losses.X`); the rest is the torchtune_kd package.
    # An editable install must run this checkout's files, not a copy in site-packages.
    src = Path(__file__).resolve().parents[2] / "src"
    for name in ("kd_losses", "torchtune_kd", "torchtune_kd.errors"):
        module = importlib.import_module(name)
        assert src in Path(module.__file__).resolve().parents, module.__file__
