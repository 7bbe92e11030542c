"""The pre-flight's per-section validators (``torchtune_kd.core.config_checks``) called on their own, without the
stand-in assets: each is a function from its section to findings, and what it learned for the checks after it."""

from __future__ import annotations

import json
import struct

import pytest
from omegaconf import OmegaConf

import kd_losses
from torchtune_kd.core import data
from torchtune_kd.core.config_checks import cache, common, components, execution, files, losses, output, top_level

KD = "kd_losses.ForwardKLWithChunkedOutputLoss"
CE = "torchtune.modules.loss.CEWithChunkedOutputLoss"


def cfg(**sections):
    return OmegaConf.create(sections)


# ------------------------------------------------------------------------------------------------ common


def test_findings_add_collects_problems_and_notices_and_hands_back_the_part():
    report = common.Findings(problems=["a"])
    part = common.Findings(problems=["b"], notices=["n"])
    assert report.add(part) is part
    assert (report.problems, report.notices, report.ok, common.Findings(notices=["x"]).ok) == (["a", "b"], ["n"], False, True)


@pytest.mark.parametrize("value, number", [("3e-4", 3e-4), (2, 2.0), (True, None), ("nan", None), ("abc", None)])
def test_as_number_refuses_booleans_and_non_finite_values(value, number):
    assert common.as_number(value) == number


# -------------------------------------------------------------------------------------------- components


def test_a_misspelled_component_is_named_with_the_closest_name():
    problems: list[str] = []
    section = cfg(kd_loss={"_component_": "kd_losses.ForwardKLLos"}).kd_loss
    assert components.resolve_component("kd_loss", section, problems, example=KD) is None
    assert problems == ["kd_loss._component_='kd_losses.ForwardKLLos' cannot be imported: did you mean "
                        "'kd_losses.ForwardKLLoss'?"]


def test_a_component_of_a_missing_module_is_named():
    problems: list[str] = []
    section = cfg(optimizer={"_component_": "no_such_module.Adam"}).optimizer
    assert components.resolve_component("optimizer", section, problems, example="torch.optim.AdamW") is None
    assert "module 'no_such_module' cannot be imported" in problems[0]


def test_keywords_are_checked_against_the_class_hierarchy_and_recipe_supplied_ones_refused():
    problems: list[str] = []
    section = cfg(optimizer={"_component_": "torch.optim.AdamW", "lr": 1e-3, "betas_": [0.9, 0.99], "params": []}).optimizer
    import torch

    assert not components.check_kwargs("optimizer", section, torch.optim.AdamW, problems)
    assert problems[0] == "optimizer.betas_=[0.9, 0.99] is not an argument of torch.optim.AdamW: did you mean 'betas'? " \
        "(accepted: " + ", ".join(n for n in components.accepted_kwargs(torch.optim.AdamW) if n != "params") + ")"
    assert problems[1] == "optimizer.params=[] is passed by the recipe itself: remove it"


def test_a_function_taking_any_keyword_accepts_every_key():
    def build(**kwargs):
        return kwargs

    assert components.accepted_kwargs(build) is None
    assert components.check_kwargs("x", cfg(x={"_component_": "f", "anything": 1}).x, build, [])


# ------------------------------------------------------------------------------------------------- files


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"\x01", "1 bytes, too short for the safetensors header length"),
        (struct.pack("<Q", 99) + b"{}", "its header length 99 exceeds the file (10 bytes)"),
        (struct.pack("<Q", 2) + b"[]", "its header is not valid JSON"),
        (struct.pack("<Q", 2) + b"{}", None),
    ],
)
def test_safetensors_header_is_checked_from_its_bytes(tmp_path, content, reason):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    assert files.safetensors_problem(path) == reason


def test_safetensors_size_must_match_the_header(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 7)
    assert files.safetensors_problem(path) == f"{8 + len(header) + 7} bytes, but its header describes {8 + len(header) + 8}"


@pytest.mark.parametrize(
    "content, kind",
    [(b"", "empty"), (b'{"a": 1}', "json"), (b"IQ== 0\nIg== 1\n", "tiktoken"), (b"\xff\xfe\x00", "binary"), (b"hi", "text")],
)
def test_describe_file_says_what_a_file_holds(tmp_path, content, kind):
    path = tmp_path / "f"
    path.write_bytes(content)
    assert files.describe_file(path)[0] == kind


@pytest.mark.parametrize(
    "text, reason",
    [("[]", "it is empty"), ("  ", "it is empty"), ('[{"a": 1}]', None), ('{"a": 1}\n{"a" 2}\n', "line 2, column 6: Expecting ':' delimiter")],
)
def test_json_problem_names_where_a_data_file_stops_parsing(tmp_path, text, reason):
    path = tmp_path / "d.json"
    path.write_text(text)
    assert files.json_problem(path) == reason


# --------------------------------------------------------------------------------------------- top level


def test_unknown_and_missing_top_level_keys_are_named():
    found = top_level.check_keys(cfg(batch_sise=2, output_dir="o"))
    assert found.problems[0] == "unknown key 'batch_sise': did you mean 'batch_size'?"
    assert "missing required key 'model'" in found.problems and "missing required key 'output_dir'" not in found.problems


def test_a_null_optional_component_switches_the_section_off():
    config = cfg(lr_scheduler={"_component_": None, "num_warmup_steps": 2}, optimizer={"_component_": None})
    top_level.disable_null_components(config)
    assert config.lr_scheduler is None and config.optimizer._component_ is None


# ------------------------------------------------------------------------------------------------ losses


def test_losses_hand_on_the_kd_class_and_the_settings_a_cache_needs():
    found = losses.check_losses(cfg(loss={"_component_": CE, "num_output_chunks": 4},
                                    kd_loss={"_component_": KD, "num_output_chunks": 4, "temperature": 2.0}))
    assert found.ok, found.problems
    assert found.kd_class is kd_losses.ForwardKLWithChunkedOutputLoss
    assert found.cache_settings() == (2.0, -100)


def test_a_loss_with_a_problem_is_not_built_and_gives_no_cache_settings():
    found = losses.check_losses(cfg(loss={"_component_": CE}, kd_loss={"_component_": KD, "temperature": 0}))
    assert found.problems == ["kd_loss.temperature=0 must be a finite number > 0 (both logits are divided by it): "
                              "e.g. kd_loss.temperature=1.0"]
    assert found.kd_loss is None and found.cache_settings() is None
    assert found.kd_class is kd_losses.ForwardKLWithChunkedOutputLoss  # still known to the checks that need it


def test_layer_mapping_resolves_and_names_what_it_needs():
    config = cfg(layer_mapping=[[0, 1]], ir_loss=None, model={}, teacher_model={})
    found = losses.check_layer_mapping(config, 2, 4, None)
    assert found.layer_pairs == [(0, 1)]
    assert found.problems[0].startswith("ir_loss is missing (ir_loss=None) but layer_mapping=[[0, 1]] needs it")
    assert found.notices == ["layer_mapping is set, so hidden states are captured although model, teacher_model."
                             "output_hidden_states is not true"]


def test_an_invalid_layer_mapping_gives_no_pairs():
    found = losses.check_layer_mapping(cfg(layer_mapping=[[5, 1]], model={}, teacher_model={}), 2, 4, None)
    assert found.layer_pairs == [] and len(found.problems) == 1


# --------------------------------------------------------------------------------------------- execution


@pytest.mark.parametrize("kd_class, refused", [(kd_losses.ForwardKLLoss, False), (object, True), (None, False)])
def test_fused_output_enabled_needs_a_divergence(kd_class, refused):
    config = cfg(fused_output={"enabled": True}, kd_loss={"_component_": "x.Y"})
    found = execution.check_fused_output(config, kd_class)
    assert any("is not a kd_losses divergence" in p for p in found.problems) is refused
    assert found.fused is not refused


@pytest.mark.parametrize("section", [None, {}, {"enabled": "auto"}, {"enabled": "auto", "chunk_size": "auto"}])
def test_the_default_is_the_fused_pass_with_a_chunk_size_from_the_shapes(section):
    config = cfg(kd_loss={"_component_": "kd_losses.ForwardKLLoss"}, model={})
    if section is not None:
        config.fused_output = section
    found = execution.check_fused_output(config, kd_losses.ForwardKLLoss)
    assert found.ok and found.fused and found.auto and found.chunk_size is None
    assert found.notices == ["Output pass: fused (fused_output.enabled=auto: a kd_losses divergence and a plain "
                             "student output layer); chunk size auto (about vocab / hidden chunks per step)."]


@pytest.mark.parametrize("kd_class, model, why", [
    (object, {}, "kd_loss._component_='x.Y' is not a kd_losses divergence"),
    (kd_losses.ForwardKLLoss, {"apply_lora_to_output": True}, "model.apply_lora_to_output=true"),
])
def test_auto_takes_the_unfused_pass_where_the_fused_one_cannot_run_and_says_why(kd_class, model, why):
    found = execution.check_fused_output(cfg(kd_loss={"_component_": "x.Y"}, model=model), kd_class)
    assert found.ok and not found.fused and found.auto
    assert len(found.notices) == 1 and found.notices[0].startswith("Output pass: unfused (fused_output.enabled=auto, and ")
    assert why in found.notices[0]


def test_an_explicit_setting_wins():
    off = execution.check_fused_output(cfg(fused_output={"enabled": False}, kd_loss={}), kd_losses.ForwardKLLoss)
    assert off.ok and not off.fused and off.notices == ["Output pass: unfused (fused_output.enabled=false)."]
    sized = execution.check_fused_output(cfg(fused_output={"chunk_size": 96}, kd_loss={}), kd_losses.ForwardKLLoss)
    assert sized.fused and sized.chunk_size == 96 and sized.notices[0].endswith("chunk size 96 tokens.")


def test_fsdp_keys_are_a_notice_for_one_device_and_checked_for_many():
    config = cfg(fsdp_cpu_offload="yes")
    assert execution.check_fsdp(config, None).notices and execution.check_fsdp(config, None).ok
    assert execution.check_fsdp(config, 2).problems == ["fsdp_cpu_offload='yes' must be true or false"]


# ------------------------------------------------------------------------------------------------ output


def test_a_refused_folder_is_flagged_so_its_training_state_is_not_read(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    found = output.check_output_dir(cfg(output_dir=str(tmp_path / "out"), epochs=1))
    assert not found.ok and not found.folder_ok


def test_an_input_inside_the_folder_is_a_problem_but_the_folder_itself_is_usable(tmp_path):
    from torchtune_kd.core import checkpointing

    out = tmp_path / "out"
    folder, _ = checkpointing.claim_output_dir(out, resume=False, overwrite=False)
    folder.claim("epoch_0")  # an earlier run's export, which this run may replace
    data_file = out / "epoch_0" / "d.json"
    data_file.parent.mkdir()
    data_file.write_text("[]")
    found = output.check_output_dir(cfg(output_dir=str(out), epochs=1, overwrite_output_dir=True,
                                        dataset={"data_files": str(data_file)}))
    assert found.problems == [f"dataset.data_files={str(data_file)!r} lies inside {str(out / 'epoch_0')!r}, which this "
                              "run writes (and would replace): point output_dir elsewhere or move the input out of it"]
    assert found.folder_ok


def test_an_unwritable_folder_is_flagged(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    found = output.check_output_dir(cfg(output_dir=str(blocker / "run")))
    assert not found.folder_ok and "is a file, not a folder" in found.problems[0]


# ------------------------------------------------------------------------------------------------- cache


def test_a_malformed_cache_section_stops_the_contents_check():
    found = cache.check_section(cfg(teacher_cache={"path": ""}), teacher_vocab=None, layer_pairs=[], kd_class=None,
                                writing=False)
    assert not found.section_ok and not found.ok


def test_ir_with_a_cache_is_refused_for_training_and_a_notice_for_the_prepass(tmp_path):
    config = cfg(teacher_cache={"path": str(tmp_path / "c")}, layer_mapping="auto", kd_loss={"_component_": KD})
    training = cache.check_section(config, teacher_vocab=10, layer_pairs=[(0, 1)], kd_class=kd_losses.ForwardKLLoss,
                                   writing=False)
    assert training.section_ok and "needs the teacher's hidden states" in training.problems[0]
    prepass = cache.check_section(config, teacher_vocab=10, layer_pairs=[(0, 1)], kd_class=None, writing=True)
    assert prepass.ok and "(IR) needs the teacher's hidden states" in prepass.notices[0]


def test_a_cache_needs_a_divergence(tmp_path):
    config = cfg(teacher_cache={"path": str(tmp_path / "c")}, kd_loss={"_component_": "torch.nn.KLDivLoss"})
    found = cache.check_section(config, teacher_vocab=None, layer_pairs=[], kd_class=object, writing=False)
    assert found.problems == ["teacher_cache needs a kd_losses divergence (they take the cache's top-k form), but "
                              "kd_loss._component_='torch.nn.KLDivLoss' is not one: use e.g. kd_losses.ForwardKLLoss"]


# ------------------------------------------------------------------------------------------- core.data


def test_dataset_sections_name_each_dataset_of_a_list():
    assert [key for key, _ in data.dataset_sections(cfg(d=[{"a": 1}, {"b": 2}]).d)] == ["dataset[0]", "dataset[1]"]
    assert [key for key, _ in data.dataset_sections(cfg(d={"a": 1}).d)] == ["dataset"]
    assert data.dataset_sections(None) == []


def test_a_list_of_datasets_is_concatenated_and_a_single_one_kept():
    assert data.combine_datasets(cfg(d={"a": 1}).d, ["only"]) == "only"
    combined = data.combine_datasets(cfg(d=[{}, {}]).d, [[1, 2], [3]])
    assert len(combined) == 3 and combined[2] == 3
