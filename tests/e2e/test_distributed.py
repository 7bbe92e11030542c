"""The distributed recipe (torchrun + FSDP2, two gloo processes on CPU) against the single-device recipe.

On the tiny stand-ins, for a full fine-tune and a LoRA student, with IR on two layer pairs, dynamic loss scaling,
gradient accumulation and an epoch boundary: the two-process run on the same global batches (``batch_size`` 2 per
rank x 2 ranks x 2 micro-batches = 4 x 1 x 2 on one device) logs the same per-step values (1e-5) and ends with the
same weights (1e-5); its export loads in transformers; a training state from either recipe resumes in the other
(mid-epoch from one to two processes, at an epoch end from two to one) and reproduces the uninterrupted run; a
problem on one rank ends the whole job with that rank's error instead of a hang.
"""

from __future__ import annotations

import shutil
import signal
import textwrap
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from torchtune_kd import tune_cli
from torchtune_kd.core import checkpointing
from torchtune_kd.evaluation import run_logs
from torchtune_kd.testing import launch
from torchtune_kd.testing.recipes import LORA_OVERRIDES, REPO, run_recipe, tiny_config

DIST_RECIPE = "recipes/knowledge_distillation_distributed.py"
KIND = {"full": [], "lora": list(LORA_OVERRIDES)}
COMMON = [
    "epochs=2", "max_steps_per_epoch=2", "gradient_accumulation_steps=2", "loss_scaling.method=dynamic",
    "save_every_n_steps=1", "keep_last_n=10", "seed=3",
]
SINGLE_BATCH, DIST_BATCH, WORLD = 4, 2, 2
# Everything a run logs except wall-clock and memory figures.
NOT_COMPARED = {"tokens_per_second", "tokens_per_second_per_gpu"}
RUN_TIMEOUT = 300


def logged(log_dir: Path) -> dict[str, dict[int, float]]:
    return {
        k: dict(v) for k, v in run_logs.read_disk_log(log_dir).items()
        if k not in NOT_COMPARED and not k.startswith("peak_memory")
    }


def run_distributed(cfg, out: Path, *, env: dict | None = None, timeout: float = RUN_TIMEOUT, torchrun: bool = False):
    """The distributed recipe on ``WORLD`` processes: forked from a warm fork server (``testing.launch``: the same
    recipe code, ~20 s less start-up), or through ``tune run --nproc_per_node`` (``torchrun=True``) where the test is
    about what torchrun does with a failing or signalled worker."""
    out.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    OmegaConf.save(cfg, path)
    if torchrun:
        return tune_cli.tune_run(DIST_RECIPE, path, cwd=REPO, timeout=timeout, nproc_per_node=WORLD, env=env)
    return launch.run_distributed_recipe(path, nproc=WORLD, recipe_file=DIST_RECIPE, env=env, timeout=timeout)


def assert_same_logs(reference: dict, other: dict, steps) -> None:
    assert set(reference) == set(other), set(reference) ^ set(other)
    for name in reference:
        for step in steps:
            assert other[name][step] == pytest.approx(reference[name][step], rel=1e-5, abs=1e-6), (name, step)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model-00001-of-00001.safetensors"), load_file(b / "model-00001-of-00001.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-5, msg=name)


def keep_states_up_to(src: Path, dst: Path, step: int) -> None:
    """A copy of a run folder as it was right after optimiser step ``step`` was checkpointed."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "logs")
    for state in (dst / checkpointing.TRAINING_STATE_DIR).iterdir():
        if int(state.name.split("_")[1]) > step:
            shutil.rmtree(state)
    last_epoch = torch.load(dst / checkpointing.TRAINING_STATE_DIR / f"step_{step}" / checkpointing.STATE_FILE,
                            weights_only=True)["epochs_run"]
    for export in list(dst.glob("epoch_*")) + list(dst.glob("*/epoch_*")):
        if int(export.name.split("_")[1]) >= last_epoch:
            shutil.rmtree(export)


@pytest.fixture(scope="module", params=sorted(KIND))
def runs(request, tiny_assets, assets_root, tmp_path_factory):
    """Straight runs of both recipes (and their configs) for one kind of student."""
    kind, root = request.param, tmp_path_factory.mktemp(f"dist_{request.param}")
    single_cfg = tiny_config(assets_root, root / "single", [*KIND[kind], *COMMON, f"batch_size={SINGLE_BATCH}"])
    run_recipe(single_cfg)
    dist_cfg = tiny_config(assets_root, root / "dist", [*KIND[kind], *COMMON, f"batch_size={DIST_BATCH}"])
    result = run_distributed(dist_cfg, root / "dist")
    assert result.returncode == 0, result.stdout[-6000:]
    return {"kind": kind, "root": root, "single_cfg": single_cfg, "dist_cfg": dist_cfg, "dist_stdout": result.stdout}


def test_two_processes_match_one_step_by_step(runs):
    single, dist = logged(runs["root"] / "single" / "logs"), logged(runs["root"] / "dist" / "logs")
    assert {"ce_loss", "kd_loss", "ir_loss", "ir_loss/0-1", "ir_loss/1-3", "weight/ir", "grad_norm"} <= set(single)
    assert_same_logs(single, dist, steps=range(1, 5))
    # Dynamic scaling moved the weights after step 1, identically on both.
    assert single["weight/ce"][2] != pytest.approx(single["weight/ce"][1], rel=1e-3)
    assert_same_weights(runs["root"] / "single" / "epoch_1", runs["root"] / "dist" / "epoch_1")
    projections = [torch.load(runs["root"] / run / "projections" / "epoch_1" / "projections.pt", weights_only=True)
                   for run in ("single", "dist")]
    for name, value in projections[0]["state_dict"].items():
        torch.testing.assert_close(projections[1]["state_dict"][name], value, rtol=1e-5, atol=1e-6)


def test_rank_zero_logs_and_writes_alone(runs):
    out = runs["root"] / "dist"
    assert len(list((out / "logs").glob("log_*.txt"))) == 1
    # Rank 1's informational lines are filtered: the job's log says each set-up step once.
    assert runs["dist_stdout"].count("Optimizer is initialized.") == 1
    metrics = run_logs.read_disk_log(out / "logs")
    assert metrics["tokens_per_second_per_gpu"][0][1] == pytest.approx(metrics["tokens_per_second"][0][1] / WORLD)
    # Memory of every rank, and the largest.
    ranks = [metrics[f"peak_memory_rss_gib/rank{r}"][0][1] for r in range(WORLD)]
    assert all(value > 0.1 for value in ranks)
    assert metrics["peak_memory_rss_gib/max_over_ranks"][0][1] == max(ranks)
    assert metrics["peak_memory_rss_gib"][0][1] == ranks[0]


def test_export_loads_in_transformers(runs):
    from transformers import AutoModelForCausalLM

    folder = runs["root"] / "dist" / "epoch_1"
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    weights = load_file(folder / "model-00001-of-00001.safetensors")
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight, weights["model.layers.1.mlp.down_proj.weight"])
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    if runs["kind"] == "lora":
        assert (runs["root"] / "dist" / "adapters" / "epoch_1" / "adapter_model.safetensors").is_file()


def test_single_device_state_resumes_on_two_processes_mid_epoch(runs):
    """World size 1 -> 2 from step 3 (inside the second epoch): the global position carries over."""
    root = runs["root"]
    keep_states_up_to(root / "single", root / "single_to_dist", step=3)
    cfg = OmegaConf.merge(runs["dist_cfg"], {
        "output_dir": str(root / "single_to_dist"), "resume_from_checkpoint": True,
        "checkpointer": {"output_dir": str(root / "single_to_dist")},
        "metric_logger": {"log_dir": str(root / "single_to_dist" / "logs")},
    })
    result = run_distributed(cfg, root / "single_to_dist")
    assert result.returncode == 0, result.stdout[-6000:]
    resumed = logged(root / "single_to_dist" / "logs")
    assert sorted(resumed["loss"]) == [4]
    assert_same_logs(logged(root / "single" / "logs"), resumed, steps=[4])
    assert_same_weights(root / "single" / "epoch_1", root / "single_to_dist" / "epoch_1")


def test_two_process_state_resumes_on_one_device(runs):
    """World size 2 -> 1 from the end of the first epoch."""
    root = runs["root"]
    keep_states_up_to(root / "dist", root / "dist_to_single", step=2)
    out = root / "dist_to_single"
    cfg = OmegaConf.merge(runs["single_cfg"], {
        "output_dir": str(out), "resume_from_checkpoint": True, "checkpointer": {"output_dir": str(out)},
        "metric_logger": {"log_dir": str(out / "logs")},
    })
    run_recipe(cfg)
    resumed = logged(out / "logs")
    assert sorted(resumed["loss"]) == [3, 4]
    assert_same_logs(logged(root / "dist" / "logs"), resumed, steps=[3, 4])
    assert_same_weights(root / "dist" / "epoch_1", out / "epoch_1")


FEATURES = [
    # The kd_ratio blend, an unchunked divergence, packed samples, clipping of sharded gradients, activation
    # checkpointing and compile (the "eager" backend: the wiring is what is tested here, not inductor's code).
    "loss_scaling.enabled=false", "kd_ratio=0.4", "loss=torch.nn.CrossEntropyLoss", "~loss.num_output_chunks",
    "kd_loss=kd_losses.ReverseKLLoss", "~kd_loss.num_output_chunks", "~kd_loss.lambda_weight",
    "dataset.packed=true", "tokenizer.max_seq_len=128", "enable_activation_checkpointing=true", "compile=true",
    "epochs=1", "max_steps_per_epoch=3", "gradient_accumulation_steps=2", "seed=11", "clip_grad_norm=0.05",
    "fused_output.enabled=false",  # the unfused pass on two processes (the other tests take the default, fused)
]


def test_blend_unchunked_packed_checkpointing_and_compile_match_too(assets_root, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_COMPILE_BACKEND", "eager")
    single_cfg = tiny_config(assets_root, tmp_path / "single", [*LORA_OVERRIDES, *FEATURES, f"batch_size={SINGLE_BATCH}"])
    run_recipe(single_cfg)
    dist_cfg = tiny_config(assets_root, tmp_path / "dist", [*LORA_OVERRIDES, *FEATURES, f"batch_size={DIST_BATCH}"])
    result = run_distributed(dist_cfg, tmp_path / "dist", env={"TORCH_COMPILE_BACKEND": "eager"})
    assert result.returncode == 0, result.stdout[-6000:]
    single, dist = logged(tmp_path / "single" / "logs"), logged(tmp_path / "dist" / "logs")
    assert single["weight/kd"][1] == pytest.approx(0.4)
    assert min(single["grad_norm"].values()) > 0.05  # the clip was active on every step
    assert_same_logs(single, dist, steps=range(1, 4))
    assert_same_weights(tmp_path / "single" / "epoch_0", tmp_path / "dist" / "epoch_0")


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_tied_embeddings_full_fine_tune_matches_too(assets_root, tmp_path, fused):
    """Llama 3.2's tied output/embedding (the 8B -> 1B config's full fine-tune student): the shared weight gets both
    gradients on every rank; ``custom_sharded_layers`` leaves the tied pair in the root unit. Also with the fused
    output pass, whose output weight is gathered from its shards and whose gradient is averaged like FSDP's."""
    from torchtune_kd.testing import standins

    tied = "torchtune.models.llama3_2._component_builders.llama3_2"
    models = [f"model._component_={tied}", f"teacher_model._component_={tied}",
              "checkpointer.model_type=LLAMA3_2", "teacher_checkpointer.model_type=LLAMA3_2"]
    probe = tiny_config(assets_root, tmp_path / "probe", models)
    for key, folder, seed in (("model", "student", 0), ("teacher_model", "teacher", 1)):
        standins.write_random_checkpoint(probe[key], tmp_path / folder, dtype=torch.float32, seed=seed)
    models += [f"checkpointer.checkpoint_dir={tmp_path / 'student'}", f"teacher_checkpointer.checkpoint_dir={tmp_path / 'teacher'}",
               "epochs=1", "max_steps_per_epoch=3", "gradient_accumulation_steps=2", "seed=5"]
    models += ["fused_output.enabled=true", "fused_output.chunk_size=96"] if fused else ["fused_output.enabled=false"]
    run_recipe(tiny_config(assets_root, tmp_path / "single", [*models, f"batch_size={SINGLE_BATCH}"]))
    dist_cfg = tiny_config(assets_root, tmp_path / "dist", [*models, f"batch_size={DIST_BATCH}",
                                                             "custom_sharded_layers=[tok_embeddings,output]"])
    result = run_distributed(dist_cfg, tmp_path / "dist")
    assert result.returncode == 0, result.stdout[-6000:]
    assert "ties its output to tok_embeddings" in result.stdout
    assert ("Fused output pass" in result.stdout) is fused
    assert_same_logs(logged(tmp_path / "single" / "logs"), logged(tmp_path / "dist" / "logs"), steps=range(1, 4))
    assert_same_weights(tmp_path / "single" / "epoch_0", tmp_path / "dist" / "epoch_0")
    exported = load_file(tmp_path / "dist" / "epoch_0" / "model-00001-of-00001.safetensors")
    assert "lm_head.weight" not in exported  # still tied in the export
    start = load_file(tmp_path / "student" / "model.safetensors")["model.embed_tokens.weight"]
    assert not torch.allclose(exported["model.embed_tokens.weight"], start)


@pytest.mark.parametrize("kind", sorted(KIND))
def test_fused_output_pass_matches_single_device(assets_root, tmp_path, kind):
    """fused_output on two processes (an untied output weight sharded on its own: trained in a full fine-tune, frozen
    under LoRA)."""
    extra = [*KIND[kind], "fused_output.enabled=true", "fused_output.chunk_size=100", "epochs=1",
             "max_steps_per_epoch=3", "gradient_accumulation_steps=2", "loss_scaling.method=dynamic", "seed=8"]
    run_recipe(tiny_config(assets_root, tmp_path / "single", [*extra, f"batch_size={SINGLE_BATCH}"]))
    # The output projection as its own FSDP unit: its weight is still sharded when the fused pass gathers it.
    dist_cfg = tiny_config(assets_root, tmp_path / "dist", [*extra, f"batch_size={DIST_BATCH}", "custom_sharded_layers=[output]"])
    result = run_distributed(dist_cfg, tmp_path / "dist")
    assert result.returncode == 0, result.stdout[-6000:]
    assert_same_logs(logged(tmp_path / "single" / "logs"), logged(tmp_path / "dist" / "logs"), steps=range(1, 4))
    assert_same_weights(tmp_path / "single" / "epoch_0", tmp_path / "dist" / "epoch_0")


# ------------------------------------------------------------------------------------------ a failing rank

FAULTS = textwrap.dedent(
    '''
    """Components that fail on one rank only (used by tests/e2e/test_distributed.py)."""
    import os

    import kd_losses
    from torchtune.datasets import alpaca_dataset


    def alpaca_missing_on_rank_1(tokenizer, **kwargs):
        if os.environ.get("RANK") == "1":
            kwargs["data_files"] = kwargs["data_files"] + ".not-on-this-node"
        return alpaca_dataset(tokenizer, **kwargs)


    class FailsOnRank1(kd_losses.ForwardKLWithChunkedOutputLoss):
        calls = 0

        # The step calls one of the two (the divergence's diagnostics come with its value): fail in either.
        def _count(self):
            FailsOnRank1.calls += 1
            if os.environ.get("RANK") == "1" and FailsOnRank1.calls == 3:
                raise RuntimeError("injected failure in rank 1's step")

        def token_sum(self, *args, **kwargs):
            self._count()
            return super().token_sum(*args, **kwargs)

        def token_sum_and_diagnostics(self, *args, **kwargs):
            self._count()
            return super().token_sum_and_diagnostics(*args, **kwargs)
    '''
)


@pytest.fixture()
def faults_module(tmp_path):
    folder = tmp_path / "faults"
    folder.mkdir()
    (folder / "kd_faults.py").write_text(FAULTS)
    return {"PYTHONPATH": f"{folder}:{REPO / 'src'}"}


def test_a_data_file_missing_on_one_rank_stops_every_rank_with_its_error(assets_root, tmp_path, faults_module):
    cfg = tiny_config(assets_root, tmp_path / "out", ["dataset._component_=kd_faults.alpaca_missing_on_rank_1",
                                                      "batch_size=2", "max_steps_per_epoch=2"])
    result = run_distributed(cfg, tmp_path / "out", env=faults_module, timeout=180, torchrun=True)
    assert result.returncode != 0
    assert "on rank 1 of 2" in result.stdout and "not-on-this-node" in result.stdout, result.stdout[-4000:]
    assert "Traceback" not in result.stdout.split("Error:")[-1].split("ChildFailedError")[0]
    assert not (tmp_path / "out" / "training_state").exists()


def test_an_exception_in_one_ranks_step_ends_the_job(assets_root, tmp_path, faults_module):
    cfg = tiny_config(assets_root, tmp_path / "out", [
        "kd_loss._component_=kd_faults.FailsOnRank1", "~kd_loss.lambda_weight", "batch_size=2",
        "max_steps_per_epoch=4", "fused_output.enabled=false",  # the unfused pass calls the failing methods
    ])
    result = run_distributed(cfg, tmp_path / "out", env=faults_module, timeout=180, torchrun=True)
    assert result.returncode != 0
    assert "injected failure in rank 1's step" in result.stdout, result.stdout[-4000:]


def worker_with_rank(launcher_pid: int, rank: int) -> int:
    """The pid of the launcher's worker process with ``RANK=rank`` (read from /proc)."""
    for child in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no worker with RANK={rank} under {launcher_pid}")


@pytest.mark.parametrize("target", ["rank 1", "launcher"])
def test_a_signal_checkpoints_every_rank_and_torchrun_reports_a_failed_job(assets_root, tmp_path, target):
    """SIGTERM to rank 1 only, or to torchrun (which forwards it to every worker, as a scheduler's preemption does):
    all ranks stop after the same step and rank 0 writes one resumable state. Each worker exits with 128 + SIGTERM,
    which torchrun turns into its own exit status 1 (a worker cannot change that: the README says so); rank 0's last
    line says it, and where the complete checkpoint is."""
    overrides = ["max_steps_per_epoch=40", "batch_size=1"]
    cfg = tiny_config(assets_root, tmp_path / "out", overrides)
    OmegaConf.save(cfg, tmp_path / "out.yaml")
    process = tune_cli.start_tune_run(DIST_RECIPE, tmp_path / "out.yaml", cwd=REPO, nproc_per_node=WORLD)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            logs = list((tmp_path / "out" / "logs").glob("log_*.txt"))
            if logs and "Step 2 " in logs[0].read_text():
                break
            time.sleep(0.5)
        assert process.poll() is None, process.communicate()[0][-3000:]
        import os

        os.kill(worker_with_rank(process.pid, 1) if target == "rank 1" else process.pid, signal.SIGTERM)
        output, _ = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, output[-4000:]
    assert "Received SIGTERM" in output and "resume_from_checkpoint=True" in output, output[-4000:]
    assert (f"Each rank exits with status {128 + signal.SIGTERM} (128 + SIGTERM); torchrun reports that as a failed "
            "job (exit status 1") in output
    if target == "rank 1":
        assert "ChildFailedError" in output
        assert f"exitcode  : {128 + signal.SIGTERM}" in output  # the workers' own status, in torchrun's summary
    else:
        assert "SignalException" in output and "got signal: 15" in output
    states = checkpointing.list_training_states(tmp_path / "out")
    assert len(states) == 1
    step, path = states[0]
    assert 2 <= step < 40 and f"resumable checkpoint in {path.parent}" in output
    state = checkpointing.load_training_state(path)
    assert state["steps_in_epoch"] == step and state["world_size"] == WORLD
    if target == "launcher":
        return
    resumed_cfg = tiny_config(assets_root, tmp_path / "out", [*overrides, "resume_from_checkpoint=true"])
    result = run_distributed(resumed_cfg, tmp_path / "out")
    assert result.returncode == 0, result.stdout[-6000:]
    assert sorted(step for step, _ in run_logs.read_disk_log(tmp_path / "out" / "logs")["loss"])[-1] == 40
    assert (tmp_path / "out" / "epoch_0" / "config.json").is_file()


def test_the_check_script_runs_both_commands(tmp_path, capsys):
    """scripts/distributed_check.py (what scripts/gpu_check.sh runs on GPUs) on CPU: it compares and it reports. Its
    ``main`` runs in this process (the script is one call of it; the test of the thin scripts checks that), and it
    launches the recipes through ``tune run`` as on a GPU machine."""
    from torchtune_kd.cli import distributed_check

    assert distributed_check.main(["equivalence", "--kinds", "lora", "--steps", "2", "--workdir", str(tmp_path)]) == 0
    equivalence = capsys.readouterr().out
    rows = [line.split() for line in equivalence.splitlines() if line.startswith("lora ")]
    assert [row[1] for row in rows] == ["loss", "ce_loss", "kd_loss", "ir_loss", "weights"]
    assert all(float(row[2]) <= 1e-5 for row in rows) and "OK" in equivalence
    assert distributed_check.main(["dummy", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--steps", "2",
                                   "--workdir", str(tmp_path)]) == 0
    dummy = capsys.readouterr().out
    assert "peak_memory_rss_gib/rank0" in dummy and "peak_memory_rss_gib/rank1" in dummy
    assert (tmp_path / "dummy" / "tiny_cpu" / "teacher_model" / "config.json").is_file()


def test_without_a_launcher_the_recipe_says_how_to_start_it(assets_root, tmp_path):
    cfg = tiny_config(assets_root, tmp_path / "out")
    OmegaConf.save(cfg, tmp_path / "out.yaml")
    result = tune_cli.tune_run(DIST_RECIPE, tmp_path / "out.yaml", cwd=REPO, timeout=120)
    assert result.returncode == 1
    assert "tune run --nproc_per_node N" in result.stdout and "Traceback" not in result.stdout, result.stdout[-3000:]
