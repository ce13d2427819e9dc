"""What the user gives and what it means: the model (``model``), the cluster
(``cluster``, built from plain ``hardware`` data, and its ``topology``), the
job (``job``: model, cluster, batch, precision, framework, features, search
space, profiles), a layout (``layout``: parallel degrees and Megatron's rank
groups), pipeline stages and placements (``stages``), the rules a layout must
satisfy for a job (``rules``), spec-file reading (``files``) and the errors
that map to exit codes (``errors``).

Imports: ``loom.profiles`` catalogues and profile files; nothing else of the
planner.
"""
