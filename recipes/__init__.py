"""torchtune-kd recipes.

``tune run recipes/knowledge_distillation_single_device.py`` imports this folder as the package ``recipes``.
torchtune's wheel installs a top-level ``recipes`` package of its own whose ``__init__`` only raises, and
``tune run`` appends the working directory to the *end* of ``sys.path``; ``torchtune_kd.recipes_path`` (installed by
``make setup``) puts this repository first so that ``recipes`` means this folder.
"""
