"""The training core: everything a distillation recipe needs, none of it depending on which recipe calls it.

- ``alignment``: ``layer_mapping`` validation, forward hooks on the mapped layers, one learned projection per pair.
- ``loss_weighting``: torchtune's ``kd_ratio`` blend, manual and dynamic (EMA-normalised) scales.
- ``preflight``: validates the whole config before any weights load, reporting every problem at once.
- ``loss_step``: token-sum CE, label shifting, the collator's real-token mask, KD diagnostics, loss compilation.
- ``checkpointing``: atomic saves, Hugging Face and PEFT exports, training states, output-folder guards.
- ``models`` / ``data``: building the student and the frozen teacher; the dataloader.
- ``safety``: the divergence guard and SIGTERM/SIGINT stops.
- ``distributed`` / ``seeded_init``: data-parallel collectives and FSDP2 helpers; starting weights from the seed.
- ``fused_output``: the output layer, CE and KD in one chunked pass (no full logits).
- ``teacher_cache``: the teacher's top-k log-probabilities computed once, fingerprinted, read back by sample id.
"""
