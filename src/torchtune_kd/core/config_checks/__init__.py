"""The pre-flight's validators, one per config section; :mod:`torchtune_kd.core.preflight` runs them in order.

Each validator is a function from its section (and what it depends on: the models' sizes, the KD loss's class) to
:class:`~torchtune_kd.core.config_checks.common.Findings`: problems, each naming the key, the value and the fix, and
notices. A validator whose result others need returns it on its findings (the resolved layer pairs, the built data,
whether a section is well formed), so no check reads another's messages.

- :mod:`.common`: the findings type; reading and showing config values.
- :mod:`.components`: importing a ``_component_`` (with a did-you-mean) and checking its keywords.
- :mod:`.files`: looking at input files without loading them (safetensors headers, JSON, what a file is).
- :mod:`.top_level`: known and required keys, counts, flags, dtype, device.
- :mod:`.models`: ``model`` / ``teacher_model`` built on the meta device; :class:`~.models.ModelFacts`.
- :mod:`.checkpoints`: ``checkpointer`` / ``teacher_checkpointer`` folders, files and ``config.json``.
- :mod:`.data`: ``tokenizer`` / ``dataset`` files, ``max_seq_len``, and the data built (by ``core.data``) and explained.
- :mod:`.losses`: ``loss``, ``kd_loss``, ``ir_loss``, ``kd_ratio``, ``loss_scaling``, ``layer_mapping``.
- :mod:`.optimizer`: ``optimizer``, ``lr_scheduler``, ``profiler``.
- :mod:`.execution`: ``fused_output`` and the FSDP keys.
- :mod:`.output`: ``output_dir`` and ``resume_from_checkpoint``.
- :mod:`.cache`: ``teacher_cache`` (its section and, for a training run, its contents).
- :mod:`.on_policy`: ``on_policy`` (its settings; no cache, no packing, room for the samples, a prompt to continue).
"""
