"""``on_policy``: on-policy distillation's settings, and what it cannot run with (before any weights load)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from torchtune_kd.core import on_policy
from torchtune_kd.core.config_checks.common import Findings, show
from torchtune_kd.core.data import packed_sections

# How many samples are read to tell whether the dataset has a prompt part.
PROMPT_PROBE_SAMPLES = 16


def _settings(cfg: DictConfig) -> on_policy.OnPolicySettings | None:
    section = cfg.get("on_policy", None)
    if not isinstance(section, DictConfig):
        return None
    container = OmegaConf.to_container(section, resolve=True)
    return None if on_policy.section_problems(container) else on_policy.settings(container)


def check_section(cfg: DictConfig) -> Findings:
    """The section's keys, types and ranges; with generation on, no teacher cache, no packing, and room in
    ``tokenizer.max_seq_len`` for a prompt and ``max_new_tokens``."""
    found = Findings()
    section = cfg.get("on_policy", None)
    if section is None:
        return found
    if not isinstance(section, DictConfig):
        found.problems.append(
            f"on_policy={show(section)} must be a mapping, e.g. on_policy: {{fraction: 0.5, max_new_tokens: 128}}"
        )
        return found
    found.problems.extend(on_policy.section_problems(OmegaConf.to_container(section, resolve=True)))
    settings = _settings(cfg)
    if settings is None or not settings.active:
        return found
    what = f"on_policy (fraction={settings.fraction}, teacher_generated={settings.teacher_generated})"
    if cfg.get("teacher_cache", None) is not None:
        found.problems.append(
            f"{what} with teacher_cache: a cache holds the teacher's distributions on the dataset's own sequences, "
            "and generated sequences must be scored by the live teacher. Remove teacher_cache (teacher_cache=null), "
            "or turn generation off (on_policy.fraction=0, on_policy.teacher_generated=false)"
        )
    tokenizer = cfg.get("tokenizer", None)
    max_seq_len = tokenizer.get("max_seq_len", None) if isinstance(tokenizer, DictConfig) else None
    if isinstance(max_seq_len, int) and not isinstance(max_seq_len, bool):
        prompt = settings.prompt_tokens or 1
        if prompt + settings.max_new_tokens > max_seq_len:
            prompt_part = f"on_policy.prompt_tokens={settings.prompt_tokens}" if settings.prompt_tokens else "a prompt of 1 token"
            found.problems.append(
                f"on_policy.max_new_tokens={settings.max_new_tokens} with {prompt_part} exceeds "
                f"tokenizer.max_seq_len={max_seq_len}: a sampled sequence must fit in a training sequence. Lower "
                f"on_policy.max_new_tokens (or prompt_tokens) so that their sum is at most {max_seq_len}, or raise "
                "tokenizer.max_seq_len"
            )
    for where in packed_sections(cfg.get("dataset", None)):
        found.problems.append(
            f"{where}.packed=True with {what}: a pack holds several samples, so there is no one prompt to "
            f"continue. Set {where}.packed=False"
        )
    return found


def check_padded_teacher(cfg: DictConfig) -> Findings:
    """A padded-vocabulary teacher (``core.vocabularies``) does not sample: its padding rows are not the student's."""
    found = Findings()
    settings = _settings(cfg)
    if settings is not None and settings.teacher_generated:
        found.problems.append(
            "on_policy.teacher_generated=true with a padded teacher (teacher_model has more vocabulary rows than "
            "model): the teacher could sample a padding id the student has no row for. Set "
            "on_policy.teacher_generated=false (the student's own samples work with a padded teacher)"
        )
    return found


def _prompt_length(labels: Any, ignore_index: int) -> int:
    for position, label in enumerate(labels):
        if int(label) != ignore_index:
            return position
    return len(labels)


def check_prompts(cfg: DictConfig, dataset: Any, ignore_index: int) -> Findings:
    """With generation on and ``prompt_tokens`` null, the dataset must have a prompt part (tokens before the first
    counted label) to continue; read on its first samples."""
    found = Findings()
    settings = _settings(cfg)
    if settings is None or not settings.active or settings.prompt_tokens is not None:
        return found
    probed = [dataset[i] for i in range(min(PROMPT_PROBE_SAMPLES, len(dataset)))]
    # At most one ignored token (the BOS, which torchtune never trains on) is no prompt.
    if probed and all(_prompt_length(sample["labels"], ignore_index) <= 1 for sample in probed):
        found.problems.append(
            f"on_policy.prompt_tokens=None takes each sample's prompt part (the tokens before its first counted label), "
            f"but none of the dataset's first {len(probed)} samples has one: every token is a label (plain text, or "
            "train_on_input=True). Set on_policy.prompt_tokens to a prefix length (e.g. on_policy.prompt_tokens=32), "
            "or use an instruct dataset with train_on_input=False"
        )
    return found
