"""torchtune-kd: knowledge distillation for LLMs on top of torchtune 0.6.1.

Layout (what each part is; see the README's module map):

- ``kd_losses`` (top-level module, so YAML can say ``_component_: kd_losses.JSDistanceLoss``): the divergences and
  hidden-state (IR) losses.
- ``torchtune_kd.errors``: the user-facing error types every module raises.
- ``torchtune_kd.core``: the training core every recipe shares: the config pre-flight, the teacher source and the
  output pass, accumulation, layer alignment and projections, loss weighting, the training state, checkpoint I/O,
  the teacher cache.
- ``torchtune_kd.cli``: the commands behind ``scripts/`` (each script only calls its module's ``main``).
- ``torchtune_kd.evaluation``: lm-eval task files and runner, comparison tables, held-out metrics, run logs, plots.
- ``torchtune_kd.models`` / ``torchtune_kd.data``: the real small teacher (SmolLM2) and real-text preparation.
- ``torchtune_kd.experiment``: divergence × IR × seed grids with paired statistics.
- ``torchtune_kd.pruning``: depth pruning (block-influence scores, the pruned student's Hugging Face folder).
- ``torchtune_kd.testing``: deterministic stand-in tokenizer, models and data, and recipe runs for tests (not
  product code).
- ``torchtune_kd.recipes_path``: the install hook that lets ``tune run recipes/<recipe>.py`` work in a checkout.

Importing the package imports nothing heavy (it runs at interpreter start-up through the install hook).
"""

from torchtune_kd.checkout import warn_if_other_checkout as _warn_if_other_checkout

_warn_if_other_checkout(__file__)
