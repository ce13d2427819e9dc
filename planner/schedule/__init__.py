"""Pipeline schedules: ``simulate`` runs 1F1B, interleaved 1F1B, GPipe and
ZB-H1 over plain per-chunk costs; ``step`` feeds it a layout's priced parts
and puts the step together.

Imports: ``planner.cost`` and ``planner.specs``.
"""
