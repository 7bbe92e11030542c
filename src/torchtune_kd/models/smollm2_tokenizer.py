"""SmolLM2's tokenizer for torchtune: byte-level BPE through tiktoken, ChatML chats as the model's template.

:class:`SmolLM2Tokenizer` (builder :func:`smollm2_tokenizer`) is a torchtune ``ModelTokenizer`` + ``Transform``
that gives the same ids as the transformers tokenizer and formats chats exactly like SmolLM2's ChatML template.

Two facts shape it. SmolLM2's vocabulary is a GPT-2-style byte-level BPE whose merged tokens are numbered in merge
order, so tiktoken's rank-based BPE (with the GPT-2 split regex) reproduces it. And 21 byte values have no token
(six control characters such as ``\\x04`` and the UTF-8 lead bytes of the unassigned planes 4-11, plus bytes UTF-8
never uses); transformers silently drops such bytes, tiktoken would abort the process, so text containing them
takes a slower path that drops them the same way.

The GGUF's own ``smollm`` pre-tokeniser (which splits digits) is dropped by transformers' GGUF converter; we match
transformers. In practice the vocabulary has no multi-digit tokens, so digits come out one by one either way.

The YAML path stays ``torchtune_kd.models.smollm2``, which re-exports every public name here.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import regex
from tiktoken import Encoding
from tiktoken.load import load_tiktoken_bpe
from torchtune.data import ChatMLTemplate, Message, PromptTemplate
from torchtune.models.qwen2._tokenizer import bytes_to_unicode
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import ModelTokenizer

TIKTOKEN_FILENAME = "smollm2.tiktoken"

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
