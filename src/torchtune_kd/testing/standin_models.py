"""The stand-ins' models: tiny Llama 3 architecture models built with torchtune, initialised from a seed
(optionally pre-trained on the alpaca records) and saved as Hugging Face folders; and random-weight checkpoints of
any configured architecture for benchmarks.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from torchtune_kd.testing.standin_spec import MODEL_COMMON, SEEDS, TOKENIZER_FILES, check_int, write_json
from torchtune_kd.testing.standin_text import read_tokenizer_info, standin_tokenizer


def init_small_(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Re-initialise in place: every matrix (linear, embedding) ~ Normal(0, std), every norm scale = 1.

    torchtune's default init starts a tiny Llama at a CE loss near 90; this one starts near ``ln(vocab)``.
    Samples are drawn in float64 from a private generator (the scalar sampling path, the same on every CPU) and
    rounded to the parameter's dtype, so the weights do not depend on the machine or on the global RNG.

    Args:
        model (torch.nn.Module): the model to initialise.
        seed (int): generator seed.
        std (float): standard deviation of the matrices.

    Raises:
        ValueError: if ``std`` is not a positive finite number or the model has a 1-D parameter that is not a norm
            scale (this init would not know what to do with it).
    """
    if not (isinstance(std, (int, float)) and math.isfinite(std) and std > 0):
        raise ValueError(f"std={std!r} must be a positive finite float, e.g. 0.02")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2:
                sample = torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * std
                parameter.copy_(sample.to(parameter.dtype))
            elif name.endswith("scale"):
                parameter.fill_(1.0)
            else:
                raise ValueError(f"init_small_ does not know how to initialise parameter {name!r} of shape "
                                 f"{tuple(parameter.shape)}; only matrices and norm scales are handled")


def hf_llama_config(kwargs: dict[str, Any], tokens: dict[str, Any]) -> dict[str, Any]:
    """A transformers ``LlamaConfig`` dict for a model built with ``torchtune.models.llama3.llama3(**kwargs)``.

    Args:
        kwargs (dict): torchtune builder kwargs (``vocab_size``, ``num_layers``, ``num_heads``, ...).
        tokens (dict): ``bos_id``, ``eos_id``, ``pad_id``.

    Returns:
        dict: the ``config.json`` content (untied embeddings, no RoPE scaling, float32).
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": kwargs["vocab_size"],
        "hidden_size": kwargs["embed_dim"],
        "intermediate_size": kwargs["intermediate_dim"],
        "num_hidden_layers": kwargs["num_layers"],
        "num_attention_heads": kwargs["num_heads"],
        "num_key_value_heads": kwargs["num_kv_heads"],
        "head_dim": kwargs["embed_dim"] // kwargs["num_heads"],
        "max_position_embeddings": kwargs["max_seq_len"],
        "rms_norm_eps": kwargs["norm_eps"],
        "rope_theta": float(kwargs["rope_base"]),
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": "float32",
        "bos_token_id": tokens["bos_id"],
        "eos_token_id": tokens["eos_id"],
        "pad_token_id": tokens["pad_id"],
    }


def _validate_shape(num_layers: int, embed_dim: int, num_heads: int, num_kv_heads: int, intermediate_dim: int,
                    max_seq_len: int) -> None:
    check_int("num_layers", num_layers, 1)
    check_int("embed_dim", embed_dim, 2)
    check_int("num_heads", num_heads, 1)
    check_int("num_kv_heads", num_kv_heads, 1)
    check_int("intermediate_dim", intermediate_dim, 1)
    check_int("max_seq_len", max_seq_len, 2)
    if embed_dim % num_heads or (embed_dim // num_heads) % 2:
        raise ValueError(
            f"embed_dim={embed_dim} must split into num_heads={num_heads} heads of even size (RoPE rotates pairs); "
            f"pick embed_dim a multiple of 2*num_heads"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads} (grouped-query attention)")


def pretrain_causal_lm(
    model: torch.nn.Module,
    *,
    tokenizer_dir: Path,
    train_json: Path,
    steps: int,
    seed: int = SEEDS["pretrain"],
    batch_size: int = 8,
    lr: float = 3e-3,
    max_seq_len: int = 256,
) -> list[float]:
    """Train in place with plain next-token CE on the alpaca training records, as the KD recipe will tokenise them.

    Samples are torchtune's ``alpaca_dataset`` tokens (prompt template included, every position trained), so a
    pre-trained teacher carries real signal on exactly the sequences distillation shows it. Deterministic for a
    fixed seed and thread count (CPU reductions may round differently with other thread counts).

    Args:
        model (torch.nn.Module): a torchtune decoder; left in eval mode.
        tokenizer_dir (Path): tokenizer folder from :func:`build_tokenizer`.
        train_json (Path): alpaca JSON list from :func:`build_alpaca_data`.
        steps (int): optimiser steps (0 returns at once).
        seed (int): batch-sampling seed.
        batch_size (int): sequences per step.
        lr (float): AdamW peak learning rate (linear warm-up over 10% of the steps, cosine decay to 10%).
        max_seq_len (int): sequences are truncated to this many tokens.

    Returns:
        list[float]: the mean token loss of every step.

    Raises:
        ValueError: for a negative ``steps`` or a non-positive ``batch_size`` / ``lr`` / ``max_seq_len``.
    """
    check_int("steps", steps, 0)
    check_int("batch_size", batch_size, 1)
    check_int("max_seq_len", max_seq_len, 2)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr!r} must be a positive finite float, e.g. 3e-3")
    if steps == 0:
        return []
    from torchtune.datasets import alpaca_dataset

    tokenizer = standin_tokenizer(tokenizer_dir, max_seq_len=max_seq_len)
    dataset = alpaca_dataset(tokenizer, source="json", data_files=str(train_json), split="train")
    sequences = [dataset[i]["tokens"] for i in range(len(dataset))]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    losses: list[float] = []
    model.train()
    for _ in range(steps):
        picks = torch.randint(len(sequences), (batch_size,), generator=generator).tolist()
        length = max(len(sequences[i]) for i in picks)
        tokens = torch.full((batch_size, length), tokenizer.pad_id, dtype=torch.long)  # (bsz, seq_len)
        for row, index in enumerate(picks):
            tokens[row, : len(sequences[index])] = torch.tensor(sequences[index])
        targets = tokens[:, 1:].masked_fill(tokens[:, 1:] == tokenizer.pad_id, -100)  # (bsz, seq_len - 1)
        logits = model(tokens)[:, :-1]  # (bsz, seq_len - 1, vocab)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    model.eval()
    return losses


def build_model_folder(
    out_dir: Path,
    *,
    tokenizer_dir: Path,
    num_layers: int,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_dim: int,
    seed: int,
    max_seq_len: int,
    rope_base: int,
    norm_eps: float,
    init_std: float,
    pretrain_steps: int,
    pretrain_data: Optional[Path],
) -> tuple[dict[str, Any], list[float]]:
    """:func:`build_llama_model` (same arguments, none defaulted), also returning the pre-training losses.

    Returns:
        tuple: the builder kwargs and the loss of every pre-training step (empty without pre-training).
    """
    _validate_shape(num_layers, embed_dim, num_heads, num_kv_heads, intermediate_dim, max_seq_len)
    check_int("seed", seed, 0)
    check_int("pretrain_steps", pretrain_steps, 0)
    if pretrain_steps > 0 and (pretrain_data is None or not Path(pretrain_data).is_file()):
        raise ValueError(
            f"pretrain_data={pretrain_data!r} must be an alpaca JSON file when pretrain_steps={pretrain_steps} > 0; "
            f"build one with build_alpaca_data"
        )
    from safetensors.torch import save_file
    from torchtune.models import convert_weights
    from torchtune.models.llama3 import llama3

    tokens = read_tokenizer_info(tokenizer_dir)
    kwargs = {
        "vocab_size": tokens["vocab_size"],
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "embed_dim": embed_dim,
        "intermediate_dim": intermediate_dim,
        "max_seq_len": max_seq_len,
        "rope_base": rope_base,
        "norm_eps": norm_eps,
    }
    # The builder's own init draws from the global RNG; fork it so building assets never shifts a caller's seeds.
    with torch.random.fork_rng(devices=[]):
        model = llama3(**kwargs)
    init_small_(model, seed=seed, std=init_std)
    losses: list[float] = []
    if pretrain_steps:
        losses = pretrain_causal_lm(
            model, tokenizer_dir=tokenizer_dir, train_json=Path(pretrain_data), steps=pretrain_steps
        )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_state = convert_weights.tune_to_hf(
        model.state_dict(), num_heads=num_heads, num_kv_heads=num_kv_heads, dim=embed_dim,
        head_dim=embed_dim // num_heads,
    )
    save_file(
        {key: value.detach().contiguous() for key, value in hf_state.items()},
        str(out_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    write_json(out_dir / "config.json", hf_llama_config(kwargs, tokens))
    write_json(
        out_dir / "generation_config.json",
        {"bos_token_id": tokens["bos_id"], "eos_token_id": tokens["eos_id"], "pad_token_id": tokens["pad_id"],
         "do_sample": False},
    )
    for name in TOKENIZER_FILES:
        shutil.copyfile(Path(tokenizer_dir) / name, out_dir / name)
    return kwargs, losses


def build_llama_model(
    out_dir: Path,
    *,
    tokenizer_dir: Path,
    num_layers: int,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_dim: int,
    seed: int,
    max_seq_len: int = MODEL_COMMON["max_seq_len"],
    rope_base: int = MODEL_COMMON["rope_base"],
    norm_eps: float = MODEL_COMMON["norm_eps"],
    init_std: float = 0.02,
    pretrain_steps: int = 0,
    pretrain_data: Optional[Path] = None,
) -> dict[str, Any]:
    """Build a Llama 3 architecture model with torchtune, initialise it from ``seed`` and save it in HF format.

    The folder gets ``model.safetensors`` (``convert_weights.tune_to_hf`` names), ``config.json``,
    ``generation_config.json`` and the tokenizer files, so ``FullModelHFCheckpointer(model_type="LLAMA3")``,
    transformers and lm-eval all load it.

    Args:
        out_dir (Path): destination folder (created).
        tokenizer_dir (Path): tokenizer folder from :func:`build_tokenizer` (sets ``vocab_size`` and token ids).
        num_layers (int): decoder layers.
        embed_dim (int): model width; ``embed_dim / num_heads`` must be even.
        num_heads (int): query heads.
        num_kv_heads (int): key / value heads; must divide ``num_heads``.
        intermediate_dim (int): SwiGLU hidden width.
        seed (int): initialisation seed.
        max_seq_len (int): RoPE cache length.
        rope_base (int): RoPE theta.
        norm_eps (float): RMSNorm epsilon.
        init_std (float): standard deviation of every weight matrix.
        pretrain_steps (int): next-token CE steps on ``pretrain_data`` before saving (0: save the random init).
        pretrain_data (Optional[Path]): alpaca JSON list; required when ``pretrain_steps > 0``.

    Returns:
        dict: keyword arguments for ``torchtune.models.llama3.llama3`` that rebuild this model.

    Raises:
        ValueError: for inconsistent sizes, a negative seed or step count, or a missing tokenizer / data file.
    """
    kwargs, _ = build_model_folder(
        out_dir, tokenizer_dir=tokenizer_dir, num_layers=num_layers, embed_dim=embed_dim, num_heads=num_heads,
        num_kv_heads=num_kv_heads, intermediate_dim=intermediate_dim, seed=seed, max_seq_len=max_seq_len,
        rope_base=rope_base, norm_eps=norm_eps, init_std=init_std, pretrain_steps=pretrain_steps,
        pretrain_data=pretrain_data,
    )
    return kwargs


def write_random_checkpoint(cfg_model: Any, out_dir: Path, *, dtype: torch.dtype, seed: int) -> None:
    """The model a config's ``model`` / ``teacher_model`` section builds, with random weights, as a Hugging Face
    folder (``model.safetensors`` and ``config.json``; a LoRA model's adapters left out, a tied output left tied).

    Real architectures on dummy weights: what a run's memory and speed depend on, without a download. Nothing is
    written when ``out_dir/config.json`` already exists. Weight matrices are N(0, 0.02), norms 1.
    """
    from safetensors.torch import save_file
    from torchtune import config, training
    from torchtune.models import convert_weights
    from torchtune.modules.peft import get_adapter_state_dict

    from torchtune_kd.core import models, preflight

    if (out_dir / "config.json").is_file():
        return
    cfg_plain, _ = models.model_config_without_flag(cfg_model)
    with training.set_default_dtype(dtype), torch.device("meta"):
        model = config.instantiate(cfg_plain)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            else:
                param.fill_(1.0)
    adapters = set(get_adapter_state_dict(model.state_dict(), device=None))
    state = {k: v for k, v in model.state_dict().items() if k not in adapters}
    sizes = preflight.builder_sizes(model)
    head_dim = sizes["embed_dim"] // sizes["num_heads"]
    hf_state = convert_weights.tune_to_hf(
        state, num_heads=sizes["num_heads"], num_kv_heads=sizes["num_kv_heads"], dim=sizes["embed_dim"], head_dim=head_dim
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf_state.items()}, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tied = "output.weight" not in state
    hf_config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": sizes["embed_dim"],
        "num_hidden_layers": sizes["num_layers"], "num_attention_heads": sizes["num_heads"],
        "num_key_value_heads": sizes["num_kv_heads"], "intermediate_size": sizes["intermediate_dim"],
        "vocab_size": sizes["vocab_size"], "head_dim": head_dim, "tie_word_embeddings": tied,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "torch_dtype": "bfloat16" if dtype == torch.bfloat16 else "float32",
    }
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
