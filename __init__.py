"""loom: plan how to lay out large-model training on a GPU cluster.

Subpackages: ``loom.planner`` (specs, memory and time models, search, plan,
emitters), ``loom.profiles`` (GPU and model catalogues), ``loom.solvers``
(integer programs over plain numbers) and ``loom.cli`` (the ``loom`` command).
"""

__version__ = "0.1.0"
