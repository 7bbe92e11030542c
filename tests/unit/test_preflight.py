"""Pre-flight checks that need the tiny stand-in files: losses, optimiser, profiler, kd_ratio, checkpoint files,
output folder, tokenizer and data. Each bad input must fail in ``validate_config`` with one line naming the key, the
value and the fix, before any weights load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest

from torchtune_kd.core import preflight
from omegaconf import OmegaConf

from torchtune_kd.testing.recipes import TINY_CONFIG, tiny_config


def validate(assets_root: Path, tmp_path: Path, *overrides: str, **kwargs):
    cfg = tiny_config(assets_root, tmp_path / "out", overrides)
    return preflight.validate_config(cfg, check_device=False, **kwargs)


def problems(assets_root: Path, tmp_path: Path, *overrides: str, **kwargs) -> str:
    with pytest.raises(preflight.ConfigError) as info:
        validate(assets_root, tmp_path, *overrides, **kwargs)
    return str(info.value)


def expect(message: str, pattern: str) -> None:
    assert re.search(pattern, message), message


# ------------------------------------------------------------------------------------------------- a. losses


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (
            ["kd_loss.lamda_weight=0.5"],
            r"kd_loss\.lamda_weight=0\.5 is not an argument of kd_losses\.JSDistanceWithChunkedOutputLoss: did you "
            r"mean 'lambda_weight'\? \(accepted: ignore_index, lambda_weight, num_output_chunks, temperature\)",
        ),
        (["kd_loss.temperature=0"], r"kd_loss\.temperature=0 must be a finite number > 0"),
        (["kd_loss.temperature=-2.0"], r"kd_loss\.temperature=-2\.0 must be a finite number > 0"),
        (["kd_loss.lambda_weight=1.5"], r"kd_loss\.lambda_weight=1\.5 must be a number in \[0, 1\]"),
        (["kd_loss.lambda_weight=-0.1"], r"kd_loss\.lambda_weight=-0\.1 must be a number in \[0, 1\]"),
        (
            ["kd_loss._component_=kd_losses.JSDistanceLos", "~kd_loss.num_output_chunks",
             "loss._component_=torch.nn.CrossEntropyLoss", "~loss.num_output_chunks"],
            r"kd_loss\._component_='kd_losses\.JSDistanceLos' cannot be imported: did you mean "
            r"'kd_losses\.JSDistanceLoss'\?",
        ),
        (
            ["kd_loss._component_=kd_losses.JSDistanceWithChunkedOutputLos"],
            r"did you mean 'kd_losses\.JSDistanceWithChunkedOutputLoss'\?",
        ),
        (
            ["ir_loss.layer_nrom=true"],
            r"ir_loss\.layer_nrom=True is not an argument of kd_losses\.CosineIRLoss: did you mean 'layer_norm'\?",
        ),
        (["ir_loss._component_=kd_losses.CosineIRLos"], r"did you mean 'kd_losses\.CosineIRLoss'\?"),
        (["kd_loss.num_output_chunks=0", "loss.num_output_chunks=0"], r"kd_loss\.num_output_chunks=0 must be an integer >= 1"),
    ],
)
def test_loss_arguments_are_checked(assets_root, tmp_path, overrides, pattern):
    message = problems(assets_root, tmp_path, *overrides)
    expect(message, pattern)
    # A misspelled class is one problem, not also a chunked/unchunked mismatch.
    assert "both be chunked" not in message


# ------------------------------------------------------------------------------------------------ b. ir_loss


def test_ir_loss_null_with_layer_mapping_is_named(assets_root, tmp_path):
    message = problems(assets_root, tmp_path, "ir_loss=None")
    expect(
        message,
        r"ir_loss is missing \(ir_loss=None\) but layer_mapping=\[\[0, 1\], \[1, 3\]\] needs it: add ir_loss: "
        r"\{_component_: kd_losses\.CosineIRLoss\} or set layer_mapping=null",
    )
    assert "1 problem(s)" in message


NO_IR = ("layer_mapping=null", "model.output_hidden_states=false", "teacher_model.output_hidden_states=false",
         "loss_scaling.manual_scales.ir=0")


def test_ir_loss_null_without_layer_mapping_is_fine_and_an_unused_one_is_a_notice(assets_root, tmp_path):
    facts = validate(assets_root, tmp_path, *NO_IR, "ir_loss=None")
    assert facts.layer_pairs == []
    assert not any("ir_loss" in n for n in facts.notices)
    facts = validate(assets_root, tmp_path, *NO_IR)
    assert any("ir_loss is set but layer_mapping is empty" in n for n in facts.notices), facts.notices


def test_ir_loss_that_is_not_a_mapping_is_named(assets_root, tmp_path):
    # YAML only: on the command line `ir_loss=X` sets ir_loss._component_.
    yaml = OmegaConf.load(TINY_CONFIG)
    yaml.ir_loss = "kd_losses.CosineIRLoss"
    OmegaConf.save(yaml, tmp_path / "scalar_ir_loss.yaml")
    with pytest.raises(preflight.ConfigError) as info:
        preflight.validate_config(tiny_config(assets_root, tmp_path / "out", config=tmp_path / "scalar_ir_loss.yaml"))
    expect(str(info.value), r"ir_loss='kd_losses\.CosineIRLoss' must be a mapping with a _component_")


# ---------------------------------------------------------------------------------------------- c. optimizer


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["optimizer.lr=-1"], r"optimizer\.lr=-1 must be a number >= 0"),
        (["optimizer.lr=abc"], r"optimizer\.lr='abc' must be a number >= 0"),
        (
            ["optimizer._component_=torch.optim.AdamWW"],
            r"optimizer\._component_='torch\.optim\.AdamWW' cannot be imported: did you mean 'torch\.optim\.AdamW'\?",
        ),
        (
            ["optimizer.betas_=[0.9,0.99]"],
            r"optimizer\.betas_=\[0\.9, 0\.99\] is not an argument of torch\.optim\.AdamW: did you mean 'betas'\?",
        ),
    ],
)
def test_optimizer_is_checked(assets_root, tmp_path, overrides, pattern):
    expect(problems(assets_root, tmp_path, *overrides), pattern)


# ------------------------------------------------------------------------------------- d. profiler, e. kd_ratio


def test_unsupported_profiler_is_named(assets_root, tmp_path):
    expect(
        problems(assets_root, tmp_path, "profiler._component_=torchtune.training.setup_profiler"),
        r"profiler\._component_='torchtune\.training\.setup_profiler' is not supported: set "
        r"profiler\._component_=torchtune\.training\.setup_torch_profiler",
    )


@pytest.mark.parametrize("scaling", ["true", "false"])
def test_kd_ratio_not_a_number_is_named(assets_root, tmp_path, scaling):
    message = problems(assets_root, tmp_path, "kd_ratio=abc", f"loss_scaling.enabled={scaling}")
    expect(message, r"kd_ratio='abc' must be a number in \[0, 1\]")
    assert "could not convert" not in message


# ------------------------------------------------------------------------------------------- f. loss section


@pytest.mark.parametrize("override", ["loss.label_smoothing=0.1", "loss.reduction=sum", "loss.weight=null"])
def test_loss_keys_the_recipe_ignores_are_rejected(assets_root, tmp_path, override):
    key, value = override.split("=")
    message = problems(assets_root, tmp_path, override)
    expect(message, rf"{re.escape(key)}=.* is not applied: the recipe computes the cross-entropy itself")


UNCHUNKED = ("loss._component_=torch.nn.CrossEntropyLoss", "kd_loss._component_=kd_losses.JSDistanceLoss",
             "~kd_loss.num_output_chunks")


def test_num_output_chunks_only_with_the_chunked_ce(assets_root, tmp_path):
    validate(assets_root, tmp_path, *UNCHUNKED, "~loss.num_output_chunks")
    expect(
        problems(assets_root, tmp_path, *UNCHUNKED),
        r"loss\.num_output_chunks=4 is not applied: .*only with torchtune\.modules\.loss\.CEWithChunkedOutputLoss",
    )


# ----------------------------------------------------------------------------------------- g. kd_ratio notice


def test_kd_ratio_with_loss_scaling_is_a_notice(assets_root, tmp_path):
    facts = validate(assets_root, tmp_path, "kd_ratio=0.5")
    assert any(n.startswith("kd_ratio=0.5 is ignored: loss_scaling.enabled=true") for n in facts.notices), facts.notices
    # The shipped config leaves kd_ratio out while loss scaling is on, so the notice does not fire by default.
    for overrides in ([], ["kd_ratio=0.5", "loss_scaling.enabled=false"]):
        facts = validate(assets_root, tmp_path, *overrides)
        assert not any(n.startswith("kd_ratio") for n in facts.notices), facts.notices


# ----------------------------------------------------------------------------------------- h. checkpoint files


def copy_model(tiny_assets, tmp_path: Path, which: str = "student") -> Path:
    folder = tmp_path / f"copy_{which}"
    shutil.copytree(tiny_assets[f"{which}_dir"], folder)
    return folder


def test_truncated_safetensors_is_named(tiny_assets, assets_root, tmp_path):
    folder = copy_model(tiny_assets, tmp_path)
    weights = folder / "model.safetensors"
    full = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.truncate(full - 1000)
    message = problems(assets_root, tmp_path, f"checkpointer.checkpoint_dir={folder}")
    expect(
        message,
        rf"checkpointer\.checkpoint_files: '{re.escape(str(weights))}' is truncated or corrupt: {full - 1000} bytes, "
        rf"but its header describes {full}: download or copy it again",
    )
    # Only the pre-flight reads it (the header, not the weights): check_files=False does not look.
    preflight.validate_config(
        tiny_config(assets_root, tmp_path / "out", [f"checkpointer.checkpoint_dir={folder}"]),
        check_files=False, check_device=False,
    )


@pytest.mark.parametrize(
    "content, pattern",
    [
        (b"\x01\x02", r"is truncated or corrupt: 2 bytes, too short for the safetensors header length"),
        (struct.pack("<Q", 10**6) + b"{}", r"is truncated or corrupt: its header length 1000000 exceeds the file"),
        (struct.pack("<Q", 4) + b"{oop", r"is truncated or corrupt: its header is not valid JSON"),
    ],
)
def test_corrupt_safetensors_header_is_named(tiny_assets, assets_root, tmp_path, content, pattern):
    folder = copy_model(tiny_assets, tmp_path)
    (folder / "model.safetensors").write_bytes(content)
    expect(problems(assets_root, tmp_path, f"checkpointer.checkpoint_dir={folder}"), pattern)


def test_checkpoint_config_that_does_not_match_the_builder_is_named(tiny_assets, assets_root, tmp_path):
    message = problems(
        assets_root, tmp_path,
        f"checkpointer.checkpoint_dir={tiny_assets['teacher_dir']}",
        f"teacher_checkpointer.checkpoint_dir={tiny_assets['student_dir']}",
    )
    expect(
        message,
        rf"checkpointer\.checkpoint_dir='{re.escape(tiny_assets['teacher_dir'])}' does not match model: its "
        r"config\.json has hidden_size=128, num_hidden_layers=4, intermediate_size=352 but model builds "
        r"embed_dim=64, num_layers=2, intermediate_dim=176: point checkpointer\.checkpoint_dir at the matching model "
        r"or fix model\.embed_dim, model\.num_layers, model\.intermediate_dim",
    )
    expect(message, r"teacher_checkpointer\.checkpoint_dir='.*' does not match teacher_model: its config\.json has "
                    r"hidden_size=64")
    assert "2 problem(s)" in message


def test_checkpoint_config_vocabulary_and_heads_are_compared(tiny_assets, assets_root, tmp_path):
    folder = copy_model(tiny_assets, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(vocab_size=2048, num_key_value_heads=4)
    (folder / "config.json").write_text(json.dumps(config))
    expect(
        problems(assets_root, tmp_path, f"checkpointer.checkpoint_dir={folder}"),
        r"vocab_size=2048, num_key_value_heads=4 but model builds vocab_size=1280, num_kv_heads=2",
    )


# ------------------------------------------------------------------------------------------------ i. output_dir


def test_output_dir_below_a_file_is_named(assets_root, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cfg = tiny_config(assets_root, blocker / "run", [])
    with pytest.raises(preflight.ConfigError) as info:
        preflight.validate_config(cfg, check_device=False)
    expect(
        str(info.value),
        rf"output_dir='{re.escape(str(blocker / 'run'))}' cannot be created: '{re.escape(str(blocker))}' is a file, "
        r"not a folder: point output_dir at a folder you can write to",
    )


def test_output_dir_not_writable_is_named_and_nothing_is_created(assets_root, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    target = locked / "deeper" / "run"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == locked else real_access(path, mode, **kw))
    cfg = tiny_config(assets_root, target, [])
    with pytest.raises(preflight.ConfigError) as info:
        preflight.validate_config(cfg, check_device=False)
    expect(
        str(info.value),
        rf"output_dir='{re.escape(str(target))}' is not writable: its nearest existing folder "
        rf"'{re.escape(str(locked))}' does not allow this user to create files: point output_dir elsewhere or fix "
        r"the folder's permissions",
    )
    assert not (locked / "deeper").exists()


def test_writable_output_dir_is_not_created_by_the_check(assets_root, tmp_path):
    target = tmp_path / "new" / "run"
    preflight.validate_config(tiny_config(assets_root, target, []), check_device=False)
    assert not (tmp_path / "new").exists()


def test_output_dir_holding_a_users_epoch_folder_is_refused_with_overwrite_too(assets_root, tmp_path):
    (tmp_path / "out" / "epoch_0").mkdir(parents=True)
    for overwrite in ("false", "true"):
        message = problems(assets_root, tmp_path, f"overwrite_output_dir={overwrite}")
        expect(message, rf"output_dir='{re.escape(str(tmp_path / 'out'))}' holds epoch_0, which this run writes, but "
                        r"torchtune-kd recipe did not write it: never replaced")
    assert list((tmp_path / "out").iterdir()) == [tmp_path / "out" / "epoch_0"]  # the check writes nothing


def test_output_dir_holding_other_files_needs_overwrite_which_keeps_them(assets_root, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    expect(problems(assets_root, tmp_path), r"holds files torchtune-kd recipe did not write \(notes\.txt\).*"
                                            r"overwrite_output_dir=True to write beside them")
    validate(assets_root, tmp_path, "overwrite_output_dir=true")


def _recipe_state(out: Path, **entries) -> Path:
    """A training state as the recipe leaves it (in a folder it claimed), with the entries a resume checks."""
    from torchtune_kd.core import checkpointing

    folder, _ = checkpointing.claim_output_dir(out, resume=False, overwrite=False)
    folder.claim(checkpointing.TRAINING_STATE_DIR)
    state = {"seed": 0, "epochs_run": 0, "global_step": 2, "optimizer": {}, "trainable": {}, "dataloader": None,
             "loss_scaling": {"method": "manual", "scales": {}, "running": {}}, **entries}
    return checkpointing.save_training_state(state, out, step=2, keep_last_n=1)


def test_resume_with_a_changed_loss_scaling_method_is_named_before_weights_load(assets_root, tmp_path):
    path = _recipe_state(tmp_path / "out")
    validate(assets_root, tmp_path, "resume_from_checkpoint=true")
    message = problems(assets_root, tmp_path, "resume_from_checkpoint=true", "loss_scaling.method=dynamic")
    expect(message, rf"resume_from_checkpoint=True with loss_scaling.method=dynamic, but the training state "
                    rf"'{re.escape(str(path))}' was trained with loss_scaling.method=manual: .* Resume with "
                    r"loss_scaling.method=manual, or start a new run")


def test_resume_mid_epoch_with_another_global_batch_is_named_before_weights_load(assets_root, tmp_path):
    _recipe_state(tmp_path / "out", dataloader={"yielded": 8}, global_batch=4, world_size=1,
                  settings={"batch_size": 4, "gradient_accumulation_steps": 1})
    validate(assets_root, tmp_path, "resume_from_checkpoint=true", "batch_size=2", "gradient_accumulation_steps=2")
    message = problems(assets_root, tmp_path, "resume_from_checkpoint=true", "batch_size=2")
    expect(message, r"saved mid-epoch by a run on 1 process\(es\) with a global batch of 4 samples \(batch_size=4 x "
                    r"gradient_accumulation_steps=1 x 1 process\(es\)\); this run has 1 with 2 .*Resume with a global "
                    r"batch of 4 samples")


def test_resume_of_a_folder_the_recipe_did_not_write_is_named(assets_root, tmp_path):
    (tmp_path / "out" / "training_state").mkdir(parents=True)
    for overwrite in ("false", "true"):
        message = problems(assets_root, tmp_path, "resume_from_checkpoint=true", f"overwrite_output_dir={overwrite}")
        expect(message, r"resume_from_checkpoint=True but output_dir=.* was not written by torchtune-kd recipe")


# ------------------------------------------------------------------------------------- j. tokenizer and data


def test_build_data_returns_tokenizer_and_dataset(assets_root, tmp_path, tiny_assets):
    facts = validate(assets_root, tmp_path)
    assert facts.tokenizer is None and facts.dataset is None and facts.num_samples is None
    facts = validate(assets_root, tmp_path, build_data=True)
    assert facts.num_samples == tiny_assets["num_train"] == len(facts.dataset)
    assert facts.tokenizer.max_seq_len == 256
    assert set(facts.dataset[0]) >= {"tokens", "labels"}
    assert (facts.student_max_seq_len, facts.teacher_max_seq_len) == (512, 512)


def test_dataset_list_is_concatenated(assets_root, tmp_path, tiny_assets):
    # A list of datasets is YAML-only (``tune run`` cannot replace a component by a list): write one.
    yaml = OmegaConf.load(TINY_CONFIG)
    yaml.dataset = [yaml.dataset, yaml.dataset]
    OmegaConf.save(yaml, tmp_path / "two_datasets.yaml")
    cfg = tiny_config(assets_root, tmp_path / "out", config=tmp_path / "two_datasets.yaml")
    facts = preflight.validate_config(cfg, check_device=False, build_data=True)
    assert facts.num_samples == 2 * tiny_assets["num_train"]


def test_packed_dataset_builds(assets_root, tmp_path, tiny_assets):
    facts = validate(assets_root, tmp_path, "dataset.packed=true", build_data=True)
    assert 0 < facts.num_samples <= tiny_assets["num_train"]


@pytest.mark.parametrize("which, kind", [("tokenizer_json", "a JSON file"), ("weights", "a safetensors weights file")])
def test_tokenizer_path_of_the_wrong_kind_is_named(tiny_assets, assets_root, tmp_path, which, kind):
    path = (
        Path(tiny_assets["tokenizer_dir"]) / "tokenizer.json"
        if which == "tokenizer_json"
        else Path(tiny_assets["student_dir"]) / "model.safetensors"
    )
    message = problems(assets_root, tmp_path, f"tokenizer.path={path}", build_data=True)
    expect(
        message,
        rf"tokenizer\.path='{re.escape(str(path))}' is {kind}, but torchtune\.models\.llama3\.llama3_tokenizer "
        r"expects a tiktoken BPE file .*: point tokenizer\.path at it",
    )
    assert len(message) < 2000


def test_tokenizer_longer_than_the_model_is_named(assets_root, tmp_path):
    message = problems(assets_root, tmp_path, "tokenizer.max_seq_len=1024", "teacher_model.max_seq_len=2048")
    expect(
        message,
        r"tokenizer\.max_seq_len=1024 is larger than model\.max_seq_len=512: lower tokenizer\.max_seq_len or raise "
        r"model\.max_seq_len",
    )
    assert "teacher_model.max_seq_len" not in message


def test_packed_without_tokenizer_max_seq_len_is_named(assets_root, tmp_path):
    expect(
        problems(assets_root, tmp_path, "dataset.packed=true", "tokenizer.max_seq_len=null"),
        r"dataset\.packed=True needs tokenizer\.max_seq_len",
    )


def write_data(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))
    return path


RECORDS = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(8)]


@pytest.mark.parametrize(
    "name, content, pattern",
    [
        ("empty.json", "", r"dataset\.data_files='{path}' is empty: put the samples in it"),
        # An empty JSON list parses, and `datasets` then names no file ("corresponds to no data").
        ("empty_list.json", [], r"dataset\.data_files='{path}' holds no samples: put the samples in it"),
        ("broken.json", '[{"instruction": "a", "output": "b"', r"dataset\.data_files='{path}' is not valid JSON "
                                                                r"\(line 1, column \d+: .*\)"),
        ("broken.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c" "output": "d"}\n',
         r"dataset\.data_files='{path}' is not valid JSON \(line 2, column \d+: .*\)"),
        ("renamed.json", [{"instruction": r["instruction"], "answer": r["output"]} for r in RECORDS],
         r"dataset\.data_files='{path}' lacks column\(s\) \['output'\] that torchtune\.datasets\.alpaca_dataset "
         r"needs \(columns present: \['answer', 'instruction'\]\): rename them in the file or map them with "
         r"dataset\.column_map"),
    ],
)
@pytest.mark.parametrize("packed", [False, True])
def test_bad_data_file_is_named(assets_root, tmp_path, name, content, pattern, packed):
    path = write_data(tmp_path, name, content)
    message = problems(assets_root, tmp_path, f"dataset.data_files={path}", f"dataset.packed={packed}", build_data=True)
    expect(message, pattern.format(path=re.escape(str(path))))
    assert "1 problem(s)" in message


def test_data_folder_is_named(assets_root, tmp_path, tiny_assets):
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(tiny_assets["data"]["train"], folder)
    message = problems(assets_root, tmp_path, f"dataset.data_files={folder}")
    expect(
        message,
        rf"dataset\.data_files='{re.escape(str(folder))}' is a folder: point it at the data file itself "
        r"\(it holds alpaca_train\.json\)",
    )


def test_too_few_samples_for_one_step_is_named(assets_root, tmp_path):
    path = write_data(tmp_path, "three.json", RECORDS[:3])
    message = problems(
        assets_root, tmp_path, f"dataset.data_files={path}", "batch_size=2", "gradient_accumulation_steps=2",
        build_data=True,
    )
    expect(
        message,
        r"batch_size=2 x gradient_accumulation_steps=2 = 4 samples per optimiser step, but the dataset has 3 samples "
        r"\(the last partial batch is dropped, so an epoch has no step\): lower batch_size or "
        r"gradient_accumulation_steps, or use more data",
    )


def test_instruct_dataset_with_column_map(assets_root, tmp_path):
    path = write_data(tmp_path, "qa.json", [{"question": r["instruction"], "answer": r["output"]} for r in RECORDS])
    base = ["dataset._component_=torchtune.datasets.instruct_dataset", f"dataset.data_files={path}", "batch_size=2"]
    facts = validate(assets_root, tmp_path, *base, "dataset.column_map={input: question, output: answer}",
                     build_data=True)
    assert facts.num_samples == len(RECORDS)
    expect(
        problems(assets_root, tmp_path, *base, "dataset.column_map={input: question, output: reply}", build_data=True),
        r"dataset\.data_files='.*qa\.json' lacks column\(s\) \['reply'\] that torchtune\.datasets\.instruct_dataset "
        r"needs \(columns present: \['answer', 'question'\]\)",
    )


def test_chat_dataset_with_conversation_column(assets_root, tmp_path):
    chats = [{"dialogue": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
             for r in RECORDS]
    path = write_data(tmp_path, "chat.json", chats)
    base = ["dataset._component_=torchtune.datasets.chat_dataset", f"dataset.data_files={path}",
            "dataset.conversation_style=openai", "batch_size=2"]
    facts = validate(assets_root, tmp_path, *base, "dataset.conversation_column=dialogue", build_data=True)
    assert facts.num_samples == len(RECORDS)
    expect(
        problems(assets_root, tmp_path, *base, "dataset.conversation_column=messages", build_data=True),
        r"dataset\.data_files='.*chat\.json' lacks column\(s\) \['messages'\] that torchtune\.datasets\.chat_dataset "
        r"needs \(columns present: \['dialogue'\]\): rename them in the file or set dataset\.conversation_column",
    )


def test_data_is_not_built_over_an_earlier_tokenizer_problem(assets_root, tmp_path):
    message = problems(assets_root, tmp_path, f"tokenizer.path={tmp_path}/nope.model", build_data=True)
    assert "1 problem(s)" in message and "tokenizer.path" in message
