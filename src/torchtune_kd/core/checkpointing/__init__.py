"""Checkpoint I/O for the distillation recipes: nothing lost, nothing unsafe, nothing of the user's deleted.

Layout of an output folder (``output_dir``)::

    .torchtune_kd_outputs.json          the marker: this folder is the recipes', and which entries they wrote
    epoch_{N}/                          the student as a clean Hugging Face model (what lm-eval and transformers load)
    adapters/epoch_{N}/                 LoRA adapter (PEFT format + torchtune's .pt) for LoRA students
    projections/epoch_{N}/projections.pt  learned student->teacher projections
    training_state/step_{S}/recipe_state.pt  everything resume needs, after optimiser step S (mid-epoch or epoch end)
    logs/                               the metric logger's folder (and the profiler's), when inside ``output_dir``

Modules:

- :mod:`~torchtune_kd.core.checkpointing.atomic`: every file and folder is written under a temporary name and moved
  into place, so a crash or a failed write leaves the old version or the new one; the next save removes what an
  interrupted one left (``.epoch_N.staging``, ``.epoch_N.old``, ``.*.tmp``);
- :mod:`~torchtune_kd.core.checkpointing.output_dir`: the output-folder rule (owner :data:`OWNER`): only entries the
  marker lists are the run's, to replace or delete; a user's file is never touched; no input may lie where a run
  writes;
- :mod:`~torchtune_kd.core.checkpointing.states`: the ``training_state/step_S`` files (the newest ``keep_last_n``);
  what a state holds and how it is checked on resume is :mod:`torchtune_kd.core.training_state`, loaded with
  ``torch.load(weights_only=True)`` (a crafted file cannot run code);
- :mod:`~torchtune_kd.core.checkpointing.export`: the epoch's exports (Hugging Face, PEFT, projections); non-finite
  weights are never written.

Every name below is importable from this package (``checkpointing.save_training_state``), as the recipes use them.
"""

from torchtune_kd.core.checkpointing.atomic import atomic_torch_save, clean_leftovers, replace_dir, stage_dir
from torchtune_kd.core.checkpointing.export import (
    LoraSpec,
    checkpoint_file_names,
    cpu_copy,
    export_hf,
    non_finite_tensors,
    require_finite,
    save_peft_adapter,
    save_projections,
    save_student,
)
from torchtune_kd.core.checkpointing.output_dir import (
    CONFIG_COPY,
    OPTION,
    OVERWRITE_HINT,
    OWNER,
    RUN_OUTPUTS,
    check_output_dir,
    claim_output_dir,
    config_input_paths,
    entries_to_claim,
    previous_run_outputs,
    run_entries,
    save_failure,
    side_dirs,
    side_entries,
    written_paths,
)
from torchtune_kd.core.checkpointing.states import (
    STATE_FILE,
    TRAINING_STATE_DIR,
    clean_incomplete_states,
    latest_training_state,
    list_training_states,
    load_latest_training_state,
    peek_training_state,
    prune_training_states,
    save_training_state,
    state_dir,
)
from torchtune_kd.core.training_state import (
    RESUME_SETTINGS,
    STATE_FORMAT,
    check_resumed_settings,
    describe_change,
    global_batch_problem,
    loss_scaling_problem,
    lr_schedule_change,
    resume_settings,
)
from torchtune_kd.core.training_state import load as load_training_state
from torchtune_kd.errors import CheckpointError

__all__ = [
    "CONFIG_COPY", "CheckpointError", "LoraSpec", "OPTION", "OVERWRITE_HINT", "OWNER", "RESUME_SETTINGS", "RUN_OUTPUTS",
    "STATE_FILE", "STATE_FORMAT", "TRAINING_STATE_DIR", "atomic_torch_save", "check_output_dir", "check_resumed_settings",
    "checkpoint_file_names", "claim_output_dir", "clean_incomplete_states", "clean_leftovers", "config_input_paths",
    "cpu_copy", "describe_change", "entries_to_claim", "export_hf", "global_batch_problem", "latest_training_state",
    "list_training_states", "load_latest_training_state", "load_training_state", "loss_scaling_problem",
    "lr_schedule_change", "non_finite_tensors", "peek_training_state", "previous_run_outputs", "prune_training_states",
    "replace_dir", "require_finite", "resume_settings", "run_entries", "save_failure", "save_peft_adapter",
    "save_projections", "save_student", "save_training_state", "side_dirs", "side_entries", "stage_dir", "state_dir",
    "written_paths",
]
