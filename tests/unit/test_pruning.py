"""Depth pruning: block-influence scores against an independent float64 computation in transformers, the written
student against the teacher, and the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from torchtune_kd import pruning
from torchtune_kd.cli import prune, pruning_report
from torchtune_kd.testing.recipes import tiny_config


def load_llama(folder: str, kwargs: dict, scratch: Path):
    """A torchtune Llama 3 from a Hugging Face folder (the checkpointer's output folder is scratch space)."""
    from torchtune.models.llama3 import llama3
    from torchtune.training import FullModelHFCheckpointer, MODEL_KEY

    state = FullModelHFCheckpointer(checkpoint_dir=folder, checkpoint_files=["model.safetensors"], model_type="LLAMA3",
                                    output_dir=str(scratch)).load_checkpoint()[MODEL_KEY]
    model = llama3(**kwargs).eval()
    model.load_state_dict(state)
    return model


def torchtune_teacher(tiny_assets, scratch: Path):
    return load_llama(tiny_assets["teacher_dir"], tiny_assets["teacher_kwargs"], scratch)


def reference_block_influence(folder: str, windows: torch.Tensor) -> list[float]:
    """transformers' Llama in float64, hooks on each decoder layer: 1 − mean cos(input, output) over all tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    distances: dict[int, list[torch.Tensor]] = {}

    def hook(index):
        def record(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            cos = (x_in * x_out).sum(-1) / (x_in.norm(dim=-1) * x_out.norm(dim=-1))
            distances.setdefault(index, []).append((1 - cos).reshape(-1))
        return record

    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(hook(i), with_kwargs=True)
    with torch.no_grad():
        model(windows)
    return [torch.cat(distances[i]).mean().item() for i in range(len(model.model.layers))]


def windows_for(tiny_assets, seq_len=48, count=6) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    body = torch.randint(3, 1000, (count, seq_len - 1), generator=g)
    return torch.cat([torch.full((count, 1), tiny_assets["bos_id"]), body], dim=1)


def test_block_influence_matches_an_independent_float64_computation(tiny_assets, tmp_path):
    windows = windows_for(tiny_assets)
    ours = pruning.block_influence(torchtune_teacher(tiny_assets, tmp_path), windows, batch_size=4)
    reference = reference_block_influence(tiny_assets["teacher_dir"], windows)
    assert ours.dtype == torch.float64 and len(ours) == 4
    assert ours.tolist() == pytest.approx(reference, rel=1e-4, abs=1e-6)
    # Only real tokens count: a mask over the first half equals scoring the first half alone.
    mask = torch.zeros_like(windows, dtype=torch.bool)
    mask[:3] = True
    half = pruning.block_influence(torchtune_teacher(tiny_assets, tmp_path), windows, real_tokens=mask)
    assert half.tolist() == pytest.approx(reference_block_influence(tiny_assets["teacher_dir"], windows[:3]), rel=1e-4)


def test_choices():
    scores = [0.5, 0.1, 0.3, 0.3, 0.9]
    assert pruning.most_influential(scores, 3) == [0, 2, 4]  # the tie 2/3 goes to the earlier layer
    assert pruning.most_influential(scores, 5) == [0, 1, 2, 3, 4]
    assert pruning.evenly_spaced(30, 6) == [0, 6, 12, 17, 23, 29]
    assert pruning.evenly_spaced(5, 1) == [0]
    assert pruning.layer_mapping([0, 4, 9]) == [[0, 0], [1, 4], [2, 9]]
    with pytest.raises(ValueError, match="num_layers=6 must be an integer from 1 to the teacher's depth 5"):
        pruning.most_influential(scores, 6)
    with pytest.raises(ValueError, match="num_layers=0"):
        pruning.evenly_spaced(5, 0)


def test_student_with_every_layer_reproduces_the_teacher_exactly(tiny_assets, tmp_path):
    from transformers import AutoModelForCausalLM

    teacher_dir = tiny_assets["teacher_dir"]
    record = pruning.write_pruned_student(teacher_dir, tmp_path / "all", [0, 1, 2, 3])
    assert record["layer_mapping"] == [[0, 0], [1, 1], [2, 2], [3, 3]]
    tokens = windows_for(tiny_assets, count=2)
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()(tokens).logits
        b = AutoModelForCausalLM.from_pretrained(str(tmp_path / "all"), dtype=torch.float32).eval()(tokens).logits
    assert torch.equal(a, b)


def test_student_holds_the_kept_layers_renumbered(tiny_assets, tmp_path):
    teacher_dir = Path(tiny_assets["teacher_dir"])
    record = pruning.write_pruned_student(teacher_dir, tmp_path / "s", [1, 3], info={"method": "test"})
    out = Path(record["out_dir"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert json.loads((out / pruning.MARKER).read_text())["method"] == "test"
    teacher, student = load_file(teacher_dir / "model.safetensors"), load_file(out / "model.safetensors")
    for key, value in student.items():
        source = key
        if key.startswith("model.layers."):
            index, rest = key[len("model.layers."):].split(".", 1)
            source = f"model.layers.{[1, 3][int(index)]}.{rest}"
        assert torch.equal(value, teacher[source]), key
    assert {k for k in teacher if not k.startswith("model.layers.")} <= set(student)
    # Idempotent; a different choice rewrites; bad choices are refused.
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    pruning.write_pruned_student(teacher_dir, out, [1, 3], info={"method": "test"})
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    for bad in ([3, 1], [0, 4], []):
        with pytest.raises(ValueError, match="strictly increasing"):
            pruning.write_pruned_student(teacher_dir, tmp_path / "bad", bad)
    with pytest.raises(ValueError, match="teacher's folder"):
        pruning.write_pruned_student(teacher_dir, teacher_dir, [0])


def test_prune_command_prints_scores_and_writes_a_loadable_student(tiny_assets, assets_root, tmp_path, capsys):
    from omegaconf import OmegaConf

    cfg = tiny_config(assets_root, tmp_path / "o")
    OmegaConf.save(cfg, tmp_path / "cfg.yaml")
    out = tmp_path / "student"
    assert prune.main(["--config", str(tmp_path / "cfg.yaml"), "--calibration", tiny_assets["data"]["heldout_text"],
                       "--num-layers", "2", "--out", str(out), "--seq-len", "64", "--windows", "8"]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / pruning.MARKER).read_text())
    scores = record["block_influence"]
    assert len(scores) == 4 and record["kept_layers"] == pruning.most_influential(scores, 2)
    for layer, score in enumerate(scores):
        assert f"| {layer} | {score:.5f} |" in printed
    # Training data (an alpaca JSON list) works as calibration text too.
    assert prune.main(["--config", str(tmp_path / "cfg.yaml"), "--calibration", tiny_assets["data"]["train"],
                       "--num-layers", "3", "--out", str(tmp_path / "from_json"), "--windows", "4"]) == 0
    assert json.loads((tmp_path / "from_json" / pruning.MARKER).read_text())["calibration"]["windows"] == 4
    mapping = json.dumps(record["layer_mapping"]).replace(" ", "")
    assert f"layer_mapping={mapping}" in printed and "model.num_layers=2" in printed
    # The student loads as the teacher's architecture with 2 layers and equals the teacher restricted to them.
    teacher = torchtune_teacher(tiny_assets, tmp_path / "x")
    student = load_llama(str(out), {**tiny_assets["teacher_kwargs"], "num_layers": 2}, tmp_path / "y")
    teacher.layers = torch.nn.ModuleList([teacher.layers[i] for i in record["kept_layers"]])
    tokens = windows_for(tiny_assets, count=2)
    with torch.no_grad():
        torch.testing.assert_close(student(tokens), teacher(tokens), rtol=0, atol=0)


def test_pruning_report_prunes_both_ways_and_prints_the_metrics(tiny_assets, assets_root, tmp_path, capsys):
    from omegaconf import OmegaConf

    cfg = tiny_config(assets_root, tmp_path / "o")
    OmegaConf.save(cfg, tmp_path / "cfg.yaml")
    assert pruning_report.main([
        "--config", str(tmp_path / "cfg.yaml"), "--calibration", tiny_assets["data"]["train"],
        "--heldout", tiny_assets["data"]["heldout_text"], "--depths", "2,3", "--out", str(tmp_path / "pruned"),
        "--windows", "4", "--eval-seq-len", "40", "--eval-windows", "3",
    ]) == 0
    printed = capsys.readouterr().out
    for name in ("2L_block_influence", "2L_even", "3L_block_influence", "3L_even"):
        assert f"| {name} | [" in printed and (tmp_path / "pruned" / name / "model.safetensors").is_file()
    assert "| teacher | – |" in printed and "| 1.000 |" in printed
    even = json.loads((tmp_path / "pruned" / "2L_even" / pruning.MARKER).read_text())
    assert even["kept_layers"] == pruning.evenly_spaced(4, 2)
