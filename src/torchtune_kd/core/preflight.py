"""Config pre-flight for the distillation recipes: validate the whole config once, up front.

:func:`validate_config` runs before any weights load. It reports every problem together in one
:class:`ConfigError` (a ``ValueError``), each naming the key, the value and the fix: unknown keys, bad numbers,
missing files, inconsistent loss/chunk settings, loss and optimiser arguments (the losses are built, the optimiser
class is imported and its keywords checked against its signature), bad layer mappings and scales, a
student/teacher vocabulary mismatch (a padded teacher must prove its tokenizer the student's), a tokenizer longer than the models, and, with files, truncated safetensors,
checkpoint folders whose ``config.json`` does not match the builder and an output folder that cannot be written.
With ``build_data=True`` it also builds the tokenizer and the dataset (and hands them back for the recipe to reuse)
and names empty, malformed or mis-columned data files and a dataset too small for one optimiser step.

Each config section has its validator in :mod:`torchtune_kd.core.config_checks` (a function from the section, and
what it depends on, to :class:`~torchtune_kd.core.config_checks.common.Findings`); this module only runs them in
order, passes on what one learned to those that need it, and skips the checks a broken section would only make fail
again. Models are instantiated on the ``meta`` device to read their depths and sizes, so a real Llama 3.2 1B/3B pair
costs no memory.
"""

from __future__ import annotations

from typing import Optional

from omegaconf import DictConfig

from torchtune_kd.core.config_checks import cache as cache_checks
from torchtune_kd.core.config_checks import checkpoints, execution, output, top_level
from torchtune_kd.core.config_checks import cross_tokenizer as cross_tokenizer_checks
from torchtune_kd.core.config_checks import data as data_checks
from torchtune_kd.core.config_checks import losses as loss_checks
from torchtune_kd.core.config_checks import models as model_checks
from torchtune_kd.core.config_checks import on_policy as on_policy_checks
from torchtune_kd.core.config_checks import optimizer as optimizer_checks
from torchtune_kd.core.config_checks import vocab as vocab_checks
from torchtune_kd.core.config_checks.common import Findings
from torchtune_kd.errors import ConfigError

# The names callers use as ``preflight.X``.
ModelFacts = model_checks.ModelFacts
builder_sizes = model_checks.builder_sizes
disable_null_components = top_level.disable_null_components

__all__ = ["ConfigError", "ModelFacts", "builder_sizes", "disable_null_components", "validate_config"]


def validate_config(
    cfg: DictConfig,
    *,
    check_files: bool = True,
    check_device: bool = True,
    build_data: bool = False,
    world_size: Optional[int] = None,
    writing_cache: bool = False,
) -> ModelFacts | None:
    """Validate a distillation config before any heavy work.

    Args:
        cfg (DictConfig): the full recipe config (after CLI overrides).
        check_files (bool): check the files: checkpoint, tokenizer and data files exist, safetensors headers are
            complete, each checkpoint's ``config.json`` matches its model builder, ``output_dir`` can be written
            under the shared output-folder rule (``checkpointing.check_output_dir``) and, on resume, its newest
            training state was trained with this loss-scaling method and (mid-epoch) this global batch.
            Default True.
        check_device (bool): check that the requested device exists. Default True.
        build_data (bool): also build the tokenizer and the dataset(s) (a list becomes a ``ConcatDataset``, as in the
            recipe), check their files, columns and size, and return them on the facts for the recipe to reuse.
            Skipped when the ``tokenizer`` or ``dataset`` section already has a problem (missing, its files, or
            ``tokenizer.max_seq_len``). Default False.
        world_size (Optional[int]): the number of data-parallel ranks for the distributed recipe (its FSDP keys
            are checked and the data must give every rank a step); ``None`` for the single-device recipe.
        writing_cache (bool): the config is for the teacher-cache pre-pass (``recipes/cache_teacher.py``):
            ``teacher_cache.path`` is required, the cache itself is not checked (it is being written) and
            ``output_dir`` is not (the pre-pass writes nothing there). Otherwise a ``teacher_cache`` section means
            training from the cache: it must be complete and made from this config's teacher, tokenizer, data,
            ``max_seq_len`` and temperature (checked with ``build_data``), and IR is refused (the cache holds no
            hidden states).

    Returns:
        ModelFacts | None: depths, sizes, the resolved layer pairs and notices for the user (and, with
        ``build_data``, the tokenizer, dataset and sample count); ``None`` only if the models could not be built
        (which is reported as an error).

    Raises:
        ConfigError: listing every problem found.

    Optional sections whose ``_component_`` is null (``lr_scheduler=None`` on the command line) are set to ``None``
    in ``cfg`` first (:func:`disable_null_components`).
    """
    disable_null_components(cfg)
    report = Findings()
    has_cache = cfg.get("teacher_cache", None) is not None
    # Checked first because the fused pass and the cache need the KD loss's class; listed in its place below.
    losses = loss_checks.check_losses(cfg)

    report.add(top_level.check_keys(cfg))
    report.add(top_level.check_run_size(cfg))
    report.add(execution.check_fsdp(cfg, world_size))
    output_path = execution.check_fused_output(cfg, losses.kd_class)
    if writing_cache:  # the pre-pass runs no output pass: which one training would take is not its news
        output_path.notices.clear()
    report.add(output_path)
    report.add(top_level.check_training(cfg, check_device=check_device))
    report.add(on_policy_checks.check_section(cfg))
    report.add(cross_tokenizer_checks.check_section(cfg))
    weighting = report.add(loss_checks.check_weighting(cfg)).weighting
    report.add(losses)
    report.add(optimizer_checks.check_optimizer(cfg))
    report.add(optimizer_checks.check_profiler(cfg))
    if writing_cache and not has_cache:
        report.problems.append(
            "teacher_cache.path is missing: the pre-pass needs a folder to write to, e.g. teacher_cache.path=cache/teacher_top64"
        )

    data_files_ok = True
    if check_files:
        report.add(checkpoints.check_files(cfg, teacher_optional=has_cache and not writing_cache))
        data_files_ok = report.add(data_checks.check_files(cfg)).ok
        if not writing_cache and report.add(output.check_output_dir(cfg)).folder_ok:
            report.add(output.check_resume(cfg, weighting, world_size or 1))

    models = report.add(model_checks.build_meta_models(cfg))
    seq_len_ok = report.add(data_checks.check_seq_len(cfg, models.by_key())).ok
    if check_files:
        report.add(checkpoints.check_configs(cfg, models))
    facts = None
    if models.student is not None and models.teacher is not None:
        facts = report.add(model_checks.read_facts(models)).facts
        if facts is not None:
            mapping = loss_checks.check_layer_mapping(cfg, facts.student_depth, facts.teacher_depth, weighting)
            facts.layer_pairs = report.add(mapping).layer_pairs
            vocabularies = report.add(vocab_checks.check_sizes(cfg, facts.student_vocab, facts.teacher_vocab))
            facts.shared_vocab = vocabularies.shared_vocab
            if facts.shared_vocab is not None:
                report.add(on_policy_checks.check_padded_teacher(cfg))
    del models

    cache_ok = False
    if has_cache:
        section = cache_checks.check_section(
            cfg,
            teacher_vocab=facts.kd_vocab if facts is not None else None,
            layer_pairs=facts.layer_pairs if facts is not None else [],
            kd_class=losses.kd_class,
            writing=writing_cache,
        )
        cache_ok = report.add(section).section_ok
    # Building the data over a problem of its own sections would only fail again, less clearly.
    data_ok = data_files_ok and seq_len_ok and not top_level.missing(cfg, "tokenizer", "dataset")
    if build_data and data_ok:
        built = report.add(data_checks.build(cfg))
        if built.dataset is not None:
            report.add(data_checks.check_sample_count(cfg, built.dataset, world_size or 1))
            report.add(on_policy_checks.check_prompts(cfg, built.dataset, losses.ignore_index))
            if facts is not None:
                facts.tokenizer, facts.dataset, facts.num_samples = built.tokenizer, built.dataset, len(built.dataset)
                facts.teacher_tokenizer = report.add(vocab_checks.check_tokenizers(
                    cfg, built.tokenizer, built.dataset, shared_vocab=facts.shared_vocab,
                    teacher_vocab=facts.teacher_vocab, student_vocab=facts.student_vocab,
                )).teacher_tokenizer
                if cache_ok and not writing_cache:
                    report.add(cache_checks.check_contents(
                        cfg, built.dataset, loss_settings=losses.cache_settings(), teacher_vocab=facts.kd_vocab
                    ))

    if not report.ok:
        raise ConfigError(report.problems)
    if facts is not None:
        facts.notices = report.notices
        facts.output_path = output_path
    return facts
