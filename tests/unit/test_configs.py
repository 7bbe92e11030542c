"""Every shipped YAML parses, instantiates and passes pre-flight; every bad input gets the promised error."""

from argparse import Namespace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config as tt_config
from torchtune.config._utils import _merge_yaml_and_cli_args

from torchtune_kd.core import alignment
from torchtune_kd.core import preflight

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def load(name: str, *overrides: str):
    """A shipped config with overrides merged as ``tune run`` merges them (so each case is reproducible there)."""
    yaml = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / name), resolve=False)
    return _merge_yaml_and_cli_args(Namespace(**yaml), list(overrides))


def test_configs_are_shipped():
    names = {p.name for p in SHIPPED}
    assert "distillation.yaml" in names and "tiny_cpu.yaml" in names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_validates_and_instantiates(path):
    cfg = OmegaConf.load(path)
    facts = preflight.validate_config(cfg, check_files=False, check_device=False)
    assert facts is not None
    for key in ("loss", "kd_loss", "ir_loss"):
        if cfg.get(key) is not None:
            tt_config.instantiate(cfg[key])
    if facts.layer_pairs:
        aligner = alignment.HiddenStateAligner(
            facts.layer_pairs, facts.student_dim, facts.teacher_dim, tt_config.instantiate(cfg.ir_loss)
        )
        for projection in aligner.projections.values():
            if facts.student_dim != facts.teacher_dim:
                assert tuple(projection.weight.shape) == (facts.teacher_dim, facts.student_dim)


def test_real_config_matches_llama_3_2_shapes():
    facts = preflight.validate_config(load("distillation.yaml"), check_files=False, check_device=False)
    assert (facts.student_depth, facts.teacher_depth) == (16, 28)
    # 1B -> 3B projections fall out of the models themselves.
    assert (facts.student_dim, facts.teacher_dim) == (2048, 3072)
    assert facts.student_vocab == facts.teacher_vocab == 128256
    assert facts.student_is_lora
    assert facts.layer_pairs == [(0, 15), (1, 20), (2, 25)]


def problems_of(cfg) -> str:
    with pytest.raises(preflight.ConfigError) as info:
        preflight.validate_config(cfg, check_files=False, check_device=False)
    return str(info.value)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["kd_ration=0.5"], r"unknown key 'kd_ration': did you mean 'kd_ratio'\?"),
        (["layer_mapping=[[0,28]]"], r"teacher layer 28 is out of range; the teacher has 28 layers"),
        (["layer_mapping=[[16,3]]"], r"student layer 16 is out of range; the student has 16 layers"),
        (["layer_mapping=[[0,1],[0,2]]"], r"student layer 0 is already mapped"),
        (["loss_scaling.manual_scales.kd=-1"], r"manual_scales\.kd=-1"),
        (["loss_scaling.manual_scales={ce: 0, kd: 0, ir: 0}"], r"all 0"),
        (["loss_scaling.method=magic"], r"method='magic'"),
        (["loss_scaling.enabeld=true"], r"unknown key 'loss_scaling\.enabeld'"),
        (["teacher_model._component_=torchtune.models.llama2.llama2_7b"], r"model has more vocabulary rows \(128256\) than teacher_model \(32000\)"),
        (["kd_loss._component_=torchtune.modules.loss.ForwardKLWithChunkedOutputLoss"], r"soft cross-entropy"),
        (["kd_loss.num_output_chunks=4"], r"num_output_chunks=8 differs from kd_loss\.num_output_chunks=4"),
        (["kd_loss._component_=kd_losses.JSDistanceLoss"], r"both be chunked or both unchunked"),
        (["dtype=fp16"], r"dtype='fp16'"),
        (["batch_size=0"], r"batch_size=0 must be an integer >= 1"),
        (["gradient_accumulation_steps=1.5"], r"gradient_accumulation_steps=1.5"),
        (["clip_grad_norm=-1"], r"clip_grad_norm=-1"),
        (["layer_mapping=null"], r"is true but layer_mapping is empty"),
        (["layer_mapping=null", "model.output_hidden_states=false", "teacher_model.output_hidden_states=false"],
         r"manual_scales\.ir=0\.2 but layer_mapping is empty"),
        (["ir_loss=None"], r"ir_loss is missing"),
        (["model.output_hidden_states=[1,2]"], r"must be true or false"),
        (["model.lora_rnk=8"], r"model: could not build"),
    ],
)
def test_bad_input_is_named(overrides, match):
    assert __import__("re").search(match, problems_of(load("distillation.yaml", *overrides))), problems_of(
        load("distillation.yaml", *overrides)
    )


def test_all_problems_reported_together():
    message = problems_of(load("distillation.yaml", "kd_ration=1", "layer_mapping=[[0,99]]", "batch_size=0"))
    assert "3 problem(s)" in message
    assert "kd_ration" in message and "teacher layer 99" in message and "batch_size" in message


def test_missing_files_are_named(tmp_path):
    cfg = load("distillation.yaml", f"checkpointer.checkpoint_dir={tmp_path}", f"tokenizer.path={tmp_path}/nope.model")
    with pytest.raises(preflight.ConfigError) as info:
        preflight.validate_config(cfg, check_files=True, check_device=False)
    message = str(info.value)
    assert f"checkpointer.checkpoint_dir='{tmp_path}' has no config.json" in message
    assert "teacher_checkpointer.checkpoint_dir" in message and "does not exist" in message
    assert "tokenizer.path" in message


def test_cuda_requested_without_gpu_is_named():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(preflight.ConfigError, match=r"device='cuda' but no CUDA device"):
        preflight.validate_config(load("distillation.yaml"), check_files=False, check_device=True)


def test_blend_with_mapping_gives_a_notice_not_silence():
    facts = preflight.validate_config(
        load("distillation.yaml", "loss_scaling.enabled=false"), check_files=False, check_device=False
    )
    assert any("NOT optimised" in n for n in facts.notices)
    facts = preflight.validate_config(
        load("distillation.yaml", "model.output_hidden_states=false"), check_files=False, check_device=False
    )
    assert any("hidden states are captured although model.output_hidden_states" in n for n in facts.notices)


@pytest.mark.parametrize("path", sorted((CONFIG_DIR / "teacher").glob("*.yaml")), ids=lambda p: p.name)
def test_teacher_lora_configs_build_for_torchtunes_recipe(path):
    """Configs for torchtune's own lora_finetune_single_device: the model builds (meta) and has LoRA adapters."""
    from torchtune.modules.peft import get_adapter_params

    cfg = OmegaConf.load(path)
    with torch.device("meta"):
        model = tt_config.instantiate(cfg.model)
    assert get_adapter_params(model)
    tt_config.instantiate(cfg.loss)
    for key in ("checkpointer", "tokenizer", "dataset", "optimizer", "lr_scheduler", "metric_logger"):
        assert key in cfg


@pytest.mark.parametrize(
    "name, world_size, depths, dims, lora, pairs",
    [
        ("distributed_8B_to_1B.yaml", 8, (16, 32), (2048, 4096), False, [(3, 7), (7, 15), (11, 23), (15, 31)]),
        ("distributed_3B_to_1B.yaml", 2, (16, 28), (2048, 3072), True, [(0, 15), (1, 20), (2, 25)]),
    ],
)
def test_distributed_configs_match_their_models(name, world_size, depths, dims, lora, pairs):
    """The multi-GPU configs pass the distributed recipe's pre-flight with the real architectures on meta."""
    facts = preflight.validate_config(load(name), check_files=False, check_device=False, world_size=world_size)
    assert (facts.student_depth, facts.teacher_depth) == depths
    assert (facts.student_dim, facts.teacher_dim) == dims
    assert facts.student_vocab == facts.teacher_vocab == 128256
    assert facts.student_is_lora is lora
    assert facts.layer_pairs == pairs
    assert [n for n in facts.notices if not n.startswith("Output pass: ")] == []


def test_fsdp_keys_are_checked_for_the_distributed_recipe_and_noted_for_the_single_device_one():
    cfg = load("distributed_3B_to_1B.yaml", "fsdp_cpu_offload=maybe", "custom_sharded_layers=output")
    with pytest.raises(preflight.ConfigError) as info:
        preflight.validate_config(cfg, check_files=False, check_device=False, world_size=2)
    assert "fsdp_cpu_offload='maybe' must be true or false" in str(info.value)
    assert "custom_sharded_layers='output' must be a list of module names" in str(info.value)
    facts = preflight.validate_config(load("distributed_3B_to_1B.yaml"), check_files=False, check_device=False)
    assert any("only apply to recipes/knowledge_distillation_distributed.py" in notice for notice in facts.notices)


@pytest.mark.parametrize(
    "overrides, world_size, match",
    [
        (["fused_output.enabled=maybe"], None, r"fused_output.enabled='maybe' must be auto, true or false"),
        (["fused_output.enabled=true", "fused_output.chunk_size=0"], None, r"fused_output.chunk_size=0 must be auto .* or an integer >= 1"),
        (["fused_output.enabeld=true"], None, r"unknown key 'fused_output.enabeld': did you mean 'fused_output.enabled'\?"),
        (["fused_output.enabled=true", "model.apply_lora_to_output=true"], None,
         r"fused_output.enabled=true, but model.apply_lora_to_output=true: .* fix that, or set fused_output.enabled=false"),
    ],
)
def test_fused_output_settings_are_checked(overrides, world_size, match):
    with pytest.raises(preflight.ConfigError, match=match):
        preflight.validate_config(load("distillation.yaml", *overrides), check_files=False, check_device=False,
                                  world_size=world_size)


def test_fused_output_validates_on_the_real_config():
    facts = preflight.validate_config(load("distillation.yaml", "fused_output.enabled=true"), check_files=False,
                                      check_device=False)
    assert facts.student_vocab == 128256 and facts.output_path.fused and not facts.output_path.auto


# The demo's published table (docs/demo/) was made on the unfused pass: its config keeps that pass until the table
# is regenerated (configs/demo_smollm2.yaml says so).
PINNED_UNFUSED = {"demo_smollm2.yaml"}
# Configs whose setting the fused pass cannot run: auto takes the unfused pass and says why.
UNFUSED_BY_AUTO = {"cross_tokenizer_smollm2.yaml": "cross_tokenizer is set"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_takes_the_fused_pass_by_default(path):
    facts = preflight.validate_config(load(path.name), check_files=False, check_device=False)
    assert facts.output_path.chunk_size is None, path.name
    if path.name in PINNED_UNFUSED:
        assert not facts.output_path.fused and "Output pass: unfused (fused_output.enabled=false)." in facts.notices
        return
    if path.name in UNFUSED_BY_AUTO:
        assert not facts.output_path.fused and facts.output_path.auto
        assert any(notice.startswith("Output pass: unfused (fused_output.enabled=auto") and
                   UNFUSED_BY_AUTO[path.name] in notice for notice in facts.notices)
        return
    assert facts.output_path.fused and facts.output_path.auto, path.name
    assert any(notice.startswith("Output pass: fused") for notice in facts.notices)
