"""The training core: everything a distillation recipe needs, none of it depending on which recipe calls it.

- ``preflight`` and ``config_checks``: the whole config validated before any weights load, one validator per
  section, every problem reported at once.
- ``teacher_source``: the teacher's signal for a micro-batch (live teacher or cache) behind one interface;
  ``output_pass``: the one micro-batch path, unfused (logits) or fused (``fused_output``: hidden states, chunked).
- ``loss_step``: token-sum CE, label shifting, the collator's real-token mask, token-exact accumulation, compile.
- ``alignment``: ``layer_mapping`` validation, forward hooks on the mapped layers, one learned projection per pair.
- ``loss_weighting``: torchtune's ``kd_ratio`` blend, manual and dynamic (EMA-normalised) scales.
- ``models`` / ``data``: building the student and the frozen teacher; the tokenizer, dataset and dataloader.
- ``training_state``: what a resume needs, written, read and checked in one format.
- ``checkpointing``: atomic saves, Hugging Face and PEFT exports, training-state files, the output-folder rule.
- ``teacher_cache``: the teacher's top-k log-probabilities computed once, fingerprinted, read back by sample id.
- ``safety``: the divergence guard and SIGTERM/SIGINT stops.
- ``distributed`` / ``seeded_init``: data-parallel collectives and FSDP2 helpers; starting weights from the seed.
"""
