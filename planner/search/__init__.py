"""Choosing: ``layouts`` enumerates and ranks layouts, ``split`` solves the
pipeline split (partition MILP), ``placement`` the rank-to-GPU placement,
and ``experts`` reads loads for and writes the files of ``loom experts``
(expert replicas on EP ranks).

Imports: ``planner.plan`` and every room below it, and ``loom.solvers``.
"""
