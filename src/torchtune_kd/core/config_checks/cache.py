"""``teacher_cache``: the section (``teacher_cache.section_problems``), what it excludes (IR, a KD loss that is
not a divergence) and, for a training run, the cache's contents against this config (``teacher_cache.check_cache``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import DictConfig

import kd_losses
from torchtune_kd import output_folder
from torchtune_kd.core import teacher_cache
from torchtune_kd.core.config_checks.common import Findings, show


@dataclass
class SectionFindings(Findings):
    """The problems of the ``teacher_cache`` section and what it excludes; ``section_ok``: the section itself is
    well formed (its settings can be read), so the cache's contents can be checked against the config."""

    section_ok: bool = False


def check_section(
    cfg: DictConfig,
    *,
    teacher_vocab: Optional[int],
    layer_pairs: list[tuple[int, int]],
    kd_class: Any,
    writing: bool,
) -> SectionFindings:
    """``teacher_cache: {path, top_k, dtype, samples_per_shard, batch_size, overwrite, verify, rehash_inputs}``.

    For the pre-pass (``writing``) the folder must be one it may write (the output-folder rule) and IR is a notice
    (it is refused when training from the cache); a training run needs a KD loss that is a ``kd_losses``
    divergence (they take the cache's top-k form).

    Args:
        cfg (DictConfig): the config (with a ``teacher_cache`` section).
        teacher_vocab (Optional[int]): the teacher's vocabulary (``None``: the models could not be read).
        layer_pairs (list[tuple[int, int]]): the resolved layer mapping.
        kd_class (Any): the imported ``kd_loss._component_``, ``None`` when it does not import (reported there).
        writing (bool): the config is for the pre-pass (``recipes/cache_teacher.py``).
    """
    found = SectionFindings()
    section = cfg.teacher_cache
    found.problems.extend(teacher_cache.section_problems(section, teacher_vocab))
    if not found.ok:
        return found
    found.section_ok = True
    if writing:
        cache = teacher_cache.settings(section)
        found.problems.extend(output_folder.check(
            cache.path, owner=teacher_cache.OWNER, option="teacher_cache.path", overwrite=cache.overwrite,
            overwrite_hint="teacher_cache.overwrite=true",
        ))
    if layer_pairs:
        message = (
            f"layer_mapping={show(cfg.get('layer_mapping'))} needs the teacher's hidden states, which a teacher cache "
            "does not hold: set layer_mapping=null (and loss_scaling.manual_scales.ir=0), or remove teacher_cache to "
            "distil from the live teacher"
        )
        if writing:
            found.notices.append(message.replace("needs", "(IR) needs") + " when training from this cache")
        else:
            found.problems.append(message)
    if not writing and kd_class is not None and not kd_losses.is_divergence(kd_class):
        found.problems.append(
            f"teacher_cache needs a kd_losses divergence (they take the cache's top-k form), but "
            f"kd_loss._component_={cfg.kd_loss._component_!r} is not one: use e.g. kd_losses.ForwardKLLoss"
        )
    return found


def check_contents(
    cfg: DictConfig, dataset: Any, *, loss_settings: Optional[tuple[float, int]], teacher_vocab: int
) -> Findings:
    """The cache is complete and made from this config's teacher, tokenizer, data, max_seq_len, k and temperature.

    Args:
        cfg (DictConfig): the config (its ``teacher_cache`` section passed :func:`check_section`).
        dataset (Any): the built training dataset.
        loss_settings (Optional[tuple[float, int]]): the built losses' (temperature, ignore_index); ``None`` when
            they could not be built (reported where they are checked), and then nothing is compared.
        teacher_vocab (int): the teacher's vocabulary size.
    """
    if loss_settings is None:
        return Findings()
    temperature, ignore_index = loss_settings
    problems, notices = teacher_cache.check_cache(
        cfg, dataset, temperature=temperature, ignore_index=ignore_index, vocab_size=teacher_vocab
    )
    return Findings(problems=list(problems), notices=list(notices))
