"""``model`` and ``teacher_model``: built on the ``meta`` device to read their depths, sizes and vocabularies.

A meta-device model allocates no memory, so a real Llama 3.2 1B/3B pair costs nothing to inspect.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from torchtune_kd.core import alignment
from torchtune_kd.core.config_checks.common import Findings, component
from torchtune_kd.core.models import model_config_without_flag

# Hugging Face config.json key -> torchtune builder keyword, compared against the meta-device model.
HF_TO_BUILDER = (
    ("hidden_size", "embed_dim"),
    ("num_hidden_layers", "num_layers"),
    ("vocab_size", "vocab_size"),
    ("num_attention_heads", "num_heads"),
    ("num_key_value_heads", "num_kv_heads"),
    ("intermediate_size", "intermediate_dim"),
)


@dataclass
class ModelFacts:
    """What pre-flight learned about the two models (read from ``meta``-device instances) and, with
    ``build_data=True``, the tokenizer and dataset it built.

    Attributes:
        student_depth (int), teacher_depth (int): number of decoder layers.
        student_dim (int), teacher_dim (int): hidden sizes.
        student_vocab (int), teacher_vocab (int): vocabulary sizes.
        student_is_lora (bool): the student has LoRA adapters.
        student_max_seq_len (Optional[int]), teacher_max_seq_len (Optional[int]): the models' ``max_seq_len``.
        layer_pairs (list[tuple[int, int]]): the resolved layer mapping (empty: no IR loss).
        notices (list[str]): things the user should know that are not errors.
        tokenizer (Any): the built tokenizer (``build_data=True``), else ``None``.
        dataset (Any): the built dataset (a ``ConcatDataset`` for a list of datasets; ``build_data=True``), else
            ``None``.
        num_samples (Optional[int]): ``len(dataset)`` (packs when packed; ``build_data=True``), else ``None``.
        teacher_tokenizer (Any): with ``cross_tokenizer`` (``build_data=True``), the teacher's own tokenizer, built.
        shared_vocab (Optional[int]): when the teacher's vocabulary is the student's plus padding rows, the rows KD
            compares on (the student's vocabulary; ``core.vocabularies``); ``None``: one vocabulary.
        output_path (Any): the output pass the run takes (``config_checks.execution.OutputPathFindings``: fused or
            not, chunk size, why), set by the pre-flight.
    """

    student_depth: int
    teacher_depth: int
    student_dim: int
    teacher_dim: int
    student_vocab: int
    teacher_vocab: int
    student_is_lora: bool
    student_max_seq_len: Optional[int] = None
    teacher_max_seq_len: Optional[int] = None
    layer_pairs: list[tuple[int, int]] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    tokenizer: Any = field(default=None, repr=False, compare=False)
    dataset: Any = field(default=None, repr=False, compare=False)
    num_samples: Optional[int] = None
    shared_vocab: Optional[int] = None
    teacher_tokenizer: Any = field(default=None, repr=False, compare=False)
    output_path: Any = field(default=None, repr=False, compare=False)

    @property
    def kd_vocab(self) -> int:
        """The rows the teacher's distribution is compared on: the shared rows of a padded teacher, else its
        vocabulary (a teacher cache stores ids below it)."""
        return self.shared_vocab if self.shared_vocab is not None else self.teacher_vocab


@dataclass
class MetaModels(Findings):
    """The two models built on the ``meta`` device (``None`` where the section is missing or did not build)."""

    student: Optional[nn.Module] = None
    teacher: Optional[nn.Module] = None

    def by_key(self) -> dict[str, Optional[nn.Module]]:
        """Config key -> model."""
        return {"model": self.student, "teacher_model": self.teacher}


@dataclass
class FactsFindings(Findings):
    """The problems found reading the models' sizes, and the facts (``None`` when they could not be read)."""

    facts: Optional[ModelFacts] = None


def builder_sizes(model: nn.Module) -> dict[str, int]:
    """The builder keywords of ``HF_TO_BUILDER`` as the meta-device model has them (those it exposes)."""
    sizes: dict[str, int] = {}
    try:
        layers = alignment.decoder_layers(model)
        sizes["num_layers"] = len(layers)
        sizes["embed_dim"] = alignment.model_embed_dim(model)
        sizes["vocab_size"] = alignment.model_vocab_size(model)
        attn = getattr(layers[0], "attn", None)
        for name in ("num_heads", "num_kv_heads"):
            if isinstance(getattr(attn, name, None), int):
                sizes[name] = getattr(attn, name)
        # w1's weight is (intermediate_dim, embed_dim) for nn.Linear and LoRA/DoRA linears alike.
        weight = getattr(getattr(getattr(layers[0], "mlp", None), "w1", None), "weight", None)
        if weight is not None:
            sizes["intermediate_dim"] = int(weight.shape[0])
    except (ValueError, IndexError, AttributeError):
        pass  # not a torchtune decoder: the caller compares the sizes that could be read
    return sizes


def _meta_model(cfg_model: DictConfig, key: str, problems: list[str]) -> Optional[nn.Module]:
    from torchtune import config as tt_config

    plain, _ = model_config_without_flag(cfg_model)
    try:
        with torch.device("meta"):
            return tt_config.instantiate(plain)
    except Exception as err:  # the builder is the user's choice and may raise anything; its message says most
        problems.append(f"{key}: could not build {component(cfg_model)!r}: {type(err).__name__}: {err}")
        return None


def build_meta_models(cfg: DictConfig) -> MetaModels:
    """``model`` and ``teacher_model`` built on the ``meta`` device; a builder's error is a problem of its key."""
    found = MetaModels()
    if isinstance(cfg.get("model"), DictConfig):
        found.student = _meta_model(cfg.model, "model", found.problems)
    if isinstance(cfg.get("teacher_model"), DictConfig):
        found.teacher = _meta_model(cfg.teacher_model, "teacher_model", found.problems)
    return found


def read_facts(models: MetaModels) -> FactsFindings:
    """Depths, sizes and vocabularies of both models.

    Args:
        models (MetaModels): both models built (``student`` and ``teacher`` not ``None``).
    """
    from torchtune.modules.peft import get_adapter_params

    found = FactsFindings()
    student, teacher = models.student, models.teacher
    try:
        facts = ModelFacts(
            student_depth=len(alignment.decoder_layers(student)),
            teacher_depth=len(alignment.decoder_layers(teacher)),
            student_dim=alignment.model_embed_dim(student),
            teacher_dim=alignment.model_embed_dim(teacher),
            student_vocab=alignment.model_vocab_size(student),
            teacher_vocab=alignment.model_vocab_size(teacher),
            student_is_lora=bool(get_adapter_params(student)),
            student_max_seq_len=getattr(student, "max_seq_len", None),
            teacher_max_seq_len=getattr(teacher, "max_seq_len", None),
        )
    except ValueError as err:  # alignment names the model that is not a decoder it can read
        found.problems.append(str(err))
        return found
    found.facts = facts  # whether the two vocabularies can be paired is config_checks.vocab's question
    return found
