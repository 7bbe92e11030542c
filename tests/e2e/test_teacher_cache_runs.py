"""Teacher cache end to end: the pre-pass, training from the cache (= the live teacher at k = vocab), resume, stale
caches refused, an interrupted pre-pass resumed to the same bytes.

Runs use the first 96 training samples (``dataset.split=train[:96]``) to keep the pre-pass short.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from torchtune_kd.testing.recipes import LORA_OVERRIDES, REPO, load_recipe_module, run_recipe, tiny_config
from torchtune_kd.core import preflight, teacher_cache
from torchtune_kd.evaluation import run_logs

RECIPE = load_recipe_module()
VOCAB = 1280
SUBSET = "dataset.split=train[:96]"
# The same distillation with and without the cache: no IR (a cache holds no hidden states), temperature 2.
NO_IR = [
    "layer_mapping=null", "loss_scaling.manual_scales.ir=0", "model.output_hidden_states=false",
    "teacher_model.output_hidden_states=false",
]
COMMON = [SUBSET, *NO_IR, "kd_loss.temperature=2.0"]


PREPASS = importlib.import_module("recipes.cache_teacher")


def build_cache(assets_root: Path, folder: Path, overrides=(), *, common=COMMON) -> dict:
    cfg = tiny_config(assets_root, folder.parent / "unused_output", [*common, f"teacher_cache.path={folder}", *overrides])
    prepass = PREPASS.TeacherCachePrepass(cfg)
    prepass.run()
    prepass.cleanup()
    return json.loads((folder / teacher_cache.MANIFEST).read_text())


@pytest.fixture(scope="module")
def full_cache(tiny_assets, assets_root, tmp_path_factory) -> Path:
    """k = vocab in fp32 at T = 2: the cached distributions are the teacher's, exactly."""
    folder = tmp_path_factory.mktemp("cache") / "full"
    build_cache(assets_root, folder, ["teacher_cache.top_k=1280", "teacher_cache.dtype=float32",
                                      "teacher_cache.samples_per_shard=40"])
    return folder


def without_checksums(shards: list) -> list:
    """A manifest's shard records but their SHA-256s: safetensors writes a header's metadata in any order, so equal
    tensors need not give equal bytes."""
    return [{key: value for key, value in shard.items() if key != "sha256"} for shard in shards]


def logged(out: Path) -> dict:
    return {k: dict(v) for k, v in run_logs.read_disk_log(out / "logs").items()
            if k not in ("tokens_per_second", "peak_memory_rss_gib")}


def assert_same_logged(a: dict, b: dict) -> None:
    """Every logged value of every step equal (1e-5)."""
    assert a.keys() == b.keys(), set(a) ^ set(b)
    for key, values in a.items():
        for step, value in values.items():
            assert b[key][step] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, step)


def final_weights(out: Path, epoch: int = 0) -> dict:
    return load_file(out / f"epoch_{epoch}" / "model-00001-of-00001.safetensors")


@pytest.mark.parametrize("kind", ["full", "lora", "full_fused", "lora_default"])
def test_cached_run_equals_the_live_run_step_by_step(tiny_assets, assets_root, tmp_path, full_cache, kind):
    """k = vocab: every logged value (CE, KD, agreement, entropy, grad norm, loss) and the final weights of a run
    from the cache equal the live-teacher run's, with shuffling and gradient accumulation; the teacher is never
    built."""
    extra = [*(LORA_OVERRIDES if kind.startswith("lora") else []), "max_steps_per_epoch=3",
             "gradient_accumulation_steps=2", "seed=5"]
    # full and lora: the unfused pass; full_fused: the fused one at a fixed chunk size; lora_default: the config's
    # default (fused, chunk size from the shapes).
    extra += {"full_fused": ["fused_output.enabled=true", "fused_output.chunk_size=100"], "lora_default": []}.get(
        kind, ["fused_output.enabled=false"])
    live = run_recipe(tiny_config(assets_root, tmp_path / "live", [*COMMON, *extra]), RECIPE)
    cached = run_recipe(
        tiny_config(assets_root, tmp_path / "cached", [*COMMON, *extra, f"teacher_cache.path={full_cache}"]), RECIPE
    )
    assert live._teacher_model is not None and cached._teacher_model is None
    a, b = logged(tmp_path / "live"), logged(tmp_path / "cached")
    assert len(a["kd_loss"]) == 3
    assert_same_logged(a, b)
    wa, wb = final_weights(tmp_path / "live"), final_weights(tmp_path / "cached")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("extra", [["fused_output.enabled=false"], []], ids=["unfused", "default"])
def test_a_cached_step_makes_no_host_sync(tiny_assets, assets_root, tmp_path, full_cache, extra):
    """Reading a cached teacher's rows (ids, log-probabilities, entropy) adds no device sync to the step."""
    from torchtune_kd.testing.host_sync import host_reads

    cfg = tiny_config(assets_root, tmp_path, [*COMMON, "gradient_accumulation_steps=2", "batch_size=2",
                                              f"teacher_cache.path={full_cache}", *extra])
    recipe = RECIPE.KDRecipeSingleDevice(cfg=cfg)
    recipe.setup(cfg=cfg)
    assert recipe._teacher_model is None and recipe._output_pass.fused is (not extra)
    batches = next(recipe._micro_batches())
    with host_reads() as reads:
        recipe._accumulate_gradients(batches)
    assert reads == []
    recipe.cleanup()


def test_packed_unchunked_compiled_cached_run_equals_the_live_run(tiny_assets, assets_root, tmp_path, monkeypatch):
    """Packs (document masks, positions), an unchunked divergence and compile: still the live run, at k = vocab
    (compiled with ``aot_eager``: what is tested is the cached path's wiring under compile, not inductor's code)."""
    monkeypatch.setenv("TORCH_COMPILE_BACKEND", "aot_eager")
    extra = ["dataset.packed=true", "tokenizer.max_seq_len=128", "loss._component_=torch.nn.CrossEntropyLoss",
             "~loss.num_output_chunks", "kd_loss._component_=kd_losses.ReverseKLLoss", "~kd_loss.num_output_chunks",
             "~kd_loss.lambda_weight", "compile=true", "max_steps_per_epoch=2", "seed=2"]
    folder = tmp_path / "cache"
    manifest = build_cache(assets_root, folder, [*extra, "teacher_cache.top_k=1280", "teacher_cache.dtype=float32"])
    assert manifest["fingerprint"]["dataset"]["config"]["packed"] is True
    run_recipe(tiny_config(assets_root, tmp_path / "live", [*COMMON, *extra]), RECIPE)
    run_recipe(tiny_config(assets_root, tmp_path / "cached", [*COMMON, *extra, f"teacher_cache.path={folder}"]), RECIPE)
    assert_same_logged(logged(tmp_path / "live"), logged(tmp_path / "cached"))


def test_resume_from_a_cached_run_continues_exactly(tiny_assets, assets_root, tmp_path, full_cache):
    common = [*COMMON, f"teacher_cache.path={full_cache}", "max_steps_per_epoch=4", "lr_scheduler=None"]
    run_recipe(tiny_config(assets_root, tmp_path / "straight", [*common, "epochs=1"]), RECIPE)
    # Stopped after 2 steps (a mid-epoch checkpoint), then resumed.
    first = tiny_config(assets_root, tmp_path / "resumed", [*common, "save_every_n_steps=2", "epochs=1"])
    recipe = RECIPE.KDRecipeSingleDevice(cfg=first)
    recipe.setup(cfg=first)
    original = recipe._stop_signal
    calls = {"n": 0}

    def stop_after_two():
        calls["n"] += 1
        return 15 if calls["n"] == 2 else original()

    recipe._stop_signal = stop_after_two
    recipe.train()
    recipe.cleanup()
    assert recipe.global_step == 2
    run_recipe(tiny_config(assets_root, tmp_path / "resumed", [*common, "epochs=1", "resume_from_checkpoint=true"]), RECIPE)
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


def _problems(assets_root: Path, out: Path, overrides) -> str:
    cfg = tiny_config(assets_root, out, overrides)
    with pytest.raises(preflight.ConfigError) as err:
        preflight.validate_config(cfg, build_data=True)
    return str(err.value)


def test_each_kind_of_stale_cache_is_refused_before_training(tiny_assets, assets_root, tmp_path, full_cache):
    use = [*COMMON, f"teacher_cache.path={full_cache}"]
    # Sanity: the matching config passes.
    preflight.validate_config(tiny_config(assets_root, tmp_path / "ok", use), build_data=True)

    teacher = tmp_path / "teacher_copy"
    shutil.copytree(assets_root / "teacher", teacher)
    weights = load_file(teacher / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] * 1.001
    from safetensors.torch import save_file

    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    message = _problems(assets_root, tmp_path / "a", [*use, f"teacher_checkpointer.checkpoint_dir={teacher}"])
    assert "the teacher's weights" in message and "model.safetensors differ" in message

    tokenizer = tmp_path / "tokenizer_copy"
    shutil.copytree(assets_root / "tokenizer", tokenizer)
    special = tokenizer / "tokenizer.json"
    special.write_text(special.read_text() + "\n")
    message = _problems(assets_root, tmp_path / "b", [*use, f"tokenizer.path={tokenizer}/tokenizer.model",
                                                        f"tokenizer.special_tokens_path={special}"])
    assert "the tokenizer" in message

    records = json.loads((assets_root / "data" / "alpaca_train.json").read_text())
    records[0]["output"] = records[0]["output"] + " changed"
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    message = _problems(assets_root, tmp_path / "c", [*use, f"dataset.data_files={data}"])
    assert "the dataset (its config, data files or number of items) differs" in message and "files differ" in message
    assert "tokenisation" in message  # item 0 is one of the fingerprinted items

    message = _problems(assets_root, tmp_path / "d", [*use, "tokenizer.max_seq_len=128"])
    assert "max_seq_len (tokenizer.max_seq_len)" in message and "cache: 256, config: 128" in message
    message = _problems(assets_root, tmp_path / "e", [*use, "teacher_cache.top_k=64"])
    assert "k (teacher_cache.top_k)" in message and "cache: 1280, config: 64" in message
    message = _problems(assets_root, tmp_path / "f", [*use, "kd_loss.temperature=1.0"])
    assert "the temperature (kd_loss.temperature)" in message and "cache: 2.0, config: 1.0" in message
    message = _problems(assets_root, tmp_path / "g", [*use, "dataset.split=train[:80]"])
    assert "items: cache 96, config 80" in message
    # Every message says how to rebuild.
    assert "recipes/cache_teacher.py" in message and "teacher_cache.overwrite=true" in message


def test_cache_refusals_name_the_fix(tiny_assets, assets_root, tmp_path, full_cache):
    message = _problems(assets_root, tmp_path / "a", [SUBSET, "kd_loss.temperature=2.0", f"teacher_cache.path={full_cache}"])
    assert "needs the teacher's hidden states" in message and "layer_mapping=null" in message
    message = _problems(assets_root, tmp_path / "b", [*COMMON, f"teacher_cache.path={tmp_path / 'nothing'}"])
    assert "holds no complete teacher cache" in message and "tune run recipes/cache_teacher.py" in message
    message = _problems(assets_root, tmp_path / "c", [*COMMON, f"teacher_cache.path={full_cache}", "teacher_cache.topk=3"])
    assert "unknown key 'teacher_cache.topk'" in message
    # Without the teacher's files a cached run still starts (the weights cannot be verified: a notice).
    facts = preflight.validate_config(
        tiny_config(assets_root, tmp_path / "d", [*COMMON, f"teacher_cache.path={full_cache}",
                                                  f"teacher_checkpointer.checkpoint_dir={tmp_path / 'absent'}"]),
        build_data=True,
    )
    assert any("cannot be verified" in notice for notice in facts.notices)


def test_changed_item_is_caught_at_lookup(tiny_assets, assets_root, tmp_path, full_cache):
    """Defence in depth: each looked-up item's tokens are checked against the hash they were cached from."""
    cfg = tiny_config(assets_root, tmp_path, [*COMMON, f"teacher_cache.path={full_cache}"])
    recipe = RECIPE.KDRecipeSingleDevice(cfg=cfg)
    recipe.setup(cfg=cfg)
    batch = next(recipe._micro_batches())[0]
    from torchtune_kd.core import loss_step

    labels = loss_step.shift_labels(batch["labels"], -100)
    args = (batch["sample_id"], labels, batch["tokens"], batch["real_tokens"], batch["labels"])
    recipe._teacher_cache.lookup(*args)
    tokens = batch["tokens"].clone()
    tokens[0, 3] += 1
    with pytest.raises(teacher_cache.CacheError, match="tokens differ"):
        recipe._teacher_cache.lookup(batch["sample_id"], labels, tokens, batch["real_tokens"], batch["labels"])
    recipe.cleanup()


def test_interrupted_prepass_resumes_to_the_same_cache(tiny_assets, assets_root, tmp_path, monkeypatch):
    overrides = ["teacher_cache.top_k=16", "teacher_cache.samples_per_shard=24"]
    straight = build_cache(assets_root, tmp_path / "straight", overrides)
    assert straight["num_items"] == 96 and len(straight["shards"]) == 4 and straight["top_k"] == 16
    assert 0.0 < straight["mean_tail_mass"] < 1.0

    real_write = teacher_cache.write_shard
    written = []

    def dies_on_the_third(folder, index, *args, **kwargs):
        if len(written) == 2:
            # A half-written temporary, as a kill during the write leaves it.
            (Path(folder) / f".{teacher_cache.shard_name(index)}.tmp").write_bytes(b"partial")
            raise KeyboardInterrupt
        written.append(index)
        return real_write(folder, index, *args, **kwargs)

    monkeypatch.setattr(teacher_cache, "write_shard", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        build_cache(assets_root, tmp_path / "resumed", overrides)
    monkeypatch.setattr(teacher_cache, "write_shard", real_write)
    assert not (tmp_path / "resumed" / teacher_cache.MANIFEST).exists()
    resumed = build_cache(assets_root, tmp_path / "resumed", overrides)
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == sorted(p.name for p in (tmp_path / "straight").iterdir())
    from safetensors import safe_open

    for shard in straight["shards"]:
        # Same tensors and metadata (the header's key order is not deterministic, so not compared as bytes).
        a, b = load_file(tmp_path / "straight" / shard["file"]), load_file(tmp_path / "resumed" / shard["file"])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), shard["file"]
        with safe_open(str(tmp_path / "straight" / shard["file"]), "pt") as x, safe_open(str(tmp_path / "resumed" / shard["file"]), "pt") as y:
            assert x.metadata() == y.metadata()
    for key in ("fingerprint", "num_rows", "bytes"):
        assert resumed[key] == straight[key]
    assert without_checksums(resumed["shards"]) == without_checksums(straight["shards"])

    # A third run finds the cache complete and writes nothing.
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "resumed").iterdir()}
    build_cache(assets_root, tmp_path / "resumed", overrides)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "resumed").iterdir()} == before


def test_prepass_never_touches_foreign_files_and_replaces_only_when_asked(tiny_assets, assets_root, tmp_path,
                                                                          monkeypatch):
    overrides = ["teacher_cache.top_k=4", "teacher_cache.samples_per_shard=48"]
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded")

    # Refused by the pre-flight, before the teacher loads and before anything is written.
    monkeypatch.setattr(PREPASS.TeacherCachePrepass, "_build_teacher", no_teacher)
    with pytest.raises(preflight.ConfigError, match="teacher_cache.path=.*notes.txt.*teacher_cache.overwrite=true"):
        build_cache(assets_root, folder, overrides)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    monkeypatch.undo()
    # With overwrite the folder is adopted: the cache is written beside the file, which is never touched.
    build_cache(assets_root, folder, [*overrides, "teacher_cache.overwrite=true"])
    with pytest.raises(teacher_cache.CacheError, match="teacher_cache.overwrite=true"):
        build_cache(assets_root, folder, ["teacher_cache.top_k=8", "teacher_cache.samples_per_shard=48"])
    replaced = build_cache(assets_root, folder, ["teacher_cache.top_k=8", "teacher_cache.samples_per_shard=48",
                                                 "teacher_cache.overwrite=true"])
    assert replaced["top_k"] == 8
    assert (folder / "notes.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def small_cache(tiny_assets, assets_root, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cache") / "small"
    build_cache(assets_root, folder, ["teacher_cache.top_k=8", "teacher_cache.samples_per_shard=40"])
    return folder


def _damaged_copy(small_cache: Path, tmp_path: Path, how: str) -> Path:
    folder = tmp_path / f"cache_{how}"
    shutil.copytree(small_cache, folder)
    shard = folder / "shard_00001.safetensors"
    data = shard.read_bytes()
    if how == "truncated":
        shard.write_bytes(data[: len(data) // 3])
    elif how == "junk":
        shard.write_bytes(bytes(torch.randint(0, 256, (len(data),), generator=torch.Generator().manual_seed(0),
                                              dtype=torch.uint8).tolist()))
    elif how == "pickle":
        import pickle

        shard.write_bytes(pickle.dumps({"ids": list(range(10))}, protocol=4))
    elif how == "bytes_inside":  # the same size and modification time, the header intact
        stat = shard.stat()
        changed = bytearray(data)
        for offset in range(len(data) - 4000, len(data), 37):
            changed[offset] ^= 0x5A
        shard.write_bytes(bytes(changed))
        import os

        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return folder


@pytest.mark.parametrize("how", ["truncated", "junk", "pickle"])
def test_a_damaged_shard_is_refused_before_the_student_loads(tiny_assets, assets_root, tmp_path, small_cache, how):
    folder = _damaged_copy(small_cache, tmp_path, how)
    cfg = tiny_config(assets_root, tmp_path / "out", [*COMMON, f"teacher_cache.path={folder}"])
    # The recipe's constructor runs the pre-flight; the models are built later, in setup().
    with pytest.raises(preflight.ConfigError) as err:
        RECIPE.KDRecipeSingleDevice(cfg=cfg)
    message = str(err.value)
    assert "shard_00001.safetensors is damaged" in message
    assert "tune run recipes/cache_teacher.py" in message and "teacher_cache.overwrite=true" in message


def test_a_damaged_shard_ends_the_cli_run_with_one_message_before_any_model_loads(tiny_assets, assets_root, tmp_path,
                                                                                 small_cache):
    from torchtune_kd import tune_cli

    folder = _damaged_copy(small_cache, tmp_path, "pickle")
    result = tune_cli.tune_run(
        "recipes/knowledge_distillation_single_device.py", REPO / "configs" / "tiny_cpu.yaml",
        [*COMMON, f"teacher_cache.path={folder}", f"output_dir={tmp_path / 'o'}"],
        cwd=REPO, env={"KD_ASSETS": str(assets_root)}, timeout=300,
    )
    assert result.returncode == 1, result.stdout[-3000:]
    assert "shard_00001.safetensors is damaged: it is a pickle" in result.stdout
    assert "Traceback" not in result.stdout
    assert "Loss is initialized" not in result.stdout and "Teacher cache " not in result.stdout


def test_changed_bytes_inside_a_shard_stop_training_at_its_first_read(tiny_assets, assets_root, tmp_path, small_cache):
    """The quick pre-flight reads headers only; the shard's checksum is checked when training first reads it, and
    teacher_cache.verify=full checks it before the models load."""
    folder = _damaged_copy(small_cache, tmp_path, "bytes_inside")
    common = [*COMMON, f"teacher_cache.path={folder}"]
    with pytest.raises(teacher_cache.CacheError, match="shard_00001.safetensors is damaged: its SHA-256 differs"):
        run_recipe(tiny_config(assets_root, tmp_path / "quick", common), RECIPE)
    message = _problems(assets_root, tmp_path / "full", [*common, "teacher_cache.verify=full"])
    assert "shard_00001.safetensors is damaged: its SHA-256 differs" in message


def test_prepass_cli(tiny_assets, assets_root, tmp_path):
    """``tune run recipes/cache_teacher.py`` as a user runs it: a complete cache and its size per token printed."""
    from torchtune_kd import tune_cli

    result = tune_cli.tune_run(
        "recipes/cache_teacher.py", REPO / "configs" / "tiny_cpu.yaml",
        [SUBSET, f"teacher_cache.path={tmp_path / 'c'}", "teacher_cache.top_k=8", f"output_dir={tmp_path / 'o'}"],
        cwd=REPO, env={"KD_ASSETS": str(assets_root)},
    )
    assert result.returncode == 0, result.stdout[-2000:]
    assert "bytes/token" in result.stdout
    manifest = json.loads((tmp_path / "c" / teacher_cache.MANIFEST).read_text())
    assert manifest["num_items"] == 96 and manifest["top_k"] == 8 and manifest["dtype"] == "float16"


# ------------------------------------------------------------------------------------------- two processes


def test_prepass_on_two_processes_writes_the_same_cache(tiny_assets, assets_root, tmp_path, full_cache):
    """``recipes/cache_teacher.py`` on two processes (``testing.launch``: torchrun's environment, forked from a warm
    server): each rank writes every other shard, rank 0 the manifest; the result equals the one-process cache."""
    from omegaconf import OmegaConf

    from torchtune_kd.testing import launch

    folder = tmp_path / "cache"
    cfg = tiny_config(assets_root, tmp_path / "o", [*COMMON, f"teacher_cache.path={folder}", "teacher_cache.top_k=1280",
                                                    "teacher_cache.dtype=float32", "teacher_cache.samples_per_shard=40"])
    OmegaConf.save(cfg, tmp_path / "cfg.yaml")
    result = launch.run_distributed_recipe(tmp_path / "cfg.yaml", recipe_file="recipes/cache_teacher.py",
                                           module="recipes.cache_teacher", timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]
    one = json.loads((full_cache / teacher_cache.MANIFEST).read_text())
    assert one["mean_tail_mass"] == 0.0  # k = vocab: nothing outside
    two = json.loads((folder / teacher_cache.MANIFEST).read_text())
    assert two["world_size"] == 2 and two["fingerprint"] == one["fingerprint"]
    assert without_checksums(two["shards"]) == without_checksums(one["shards"])
    for shard in one["shards"]:
        a, b = load_file(full_cache / shard["file"]), load_file(folder / shard["file"])
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-6, msg=f"{shard['file']}:{key}")


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_distributed_run_from_the_cache_matches_single_device(tiny_assets, assets_root, tmp_path, full_cache, kind):
    """Two processes (FSDP2, gloo) distilling from the cache equal one process on the same global batches."""
    from omegaconf import OmegaConf

    from torchtune_kd.testing import launch

    extra = [*COMMON, *(LORA_OVERRIDES if kind == "lora" else []), f"teacher_cache.path={full_cache}", "epochs=1",
             "max_steps_per_epoch=3", "gradient_accumulation_steps=2", "seed=6"]
    run_recipe(tiny_config(assets_root, tmp_path / "single", [*extra, "batch_size=4"]), RECIPE)
    cfg = tiny_config(assets_root, tmp_path / "dist", [*extra, "batch_size=2"])
    OmegaConf.save(cfg, tmp_path / "dist.yaml")
    result = launch.run_distributed_recipe(tmp_path / "dist.yaml", timeout=300)
    assert result.returncode == 0, result.stdout[-6000:]
    b = {k: v for k, v in logged(tmp_path / "dist").items() if k != "tokens_per_second_per_gpu" and not k.startswith("peak_memory")}
    assert_same_logged(logged(tmp_path / "single"), b)
    wa, wb = final_weights(tmp_path / "single"), final_weights(tmp_path / "dist")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-5, msg=name)
