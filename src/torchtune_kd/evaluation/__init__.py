"""Evaluation tooling: lm-eval on exported folders, comparison tables, held-out metrics, run logs and plots.

- ``lm_eval_tasks``: the offline task files shipped as package data (``task_data/``) and the task YAMLs that run
  lm-eval's own tasks on them.
- ``lm_eval_runner``: model-folder checks, ``lm_eval.simple_evaluate`` on one folder, several folders to one table.
- ``tables``: lm-eval results dicts -> comparison rows (value, stderr, delta to a baseline), markdown and CSV; the
  plain markdown table every report uses.
- ``report``: the demo's results (tables, CSVs, plots) from the held-out metrics and lm-eval of its checkpoints.
- ``heldout_metrics``: held-out perplexity and top-1 agreement with the teacher.
- ``run_logs``: torchtune ``DiskLogger`` files -> ``{metric: [(step, value)]}``.
- ``plots``: loss curves of one or more runs.

Importing the package imports none of them (the scripts set hub-access variables before lm-eval is imported).
"""
