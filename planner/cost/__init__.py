"""The cost model: what one layout costs in time and memory.

- ``shape``: the per-GPU shapes of one micro batch;
- ``efficiency``: how fast one kernel runs (GEMM by shape, flash attention,
  memory-bound kernels);
- ``compute`` and ``activations``: estimated kernel time and bytes kept for
  backward of each piece of the model; ``moe``: what an MoE layer spends
  beyond a dense layer (TE's per-expert GEMMs, the dispatcher's traffic and
  permutations, token dropping); ``host``: the CPU time to issue a layer;
- ``measured``: a layers profile resolved once per job into corrections of
  those estimates; ``layers``: where the two meet (what the models below read);
- ``collectives`` and ``network``: alpha-beta collective times and the link
  each group of a layout lands on; ``contention``: the SMs a collective
  holds from the compute it hides behind;
- ``memory``: per-stage memory; ``time_model``: the priced parts of a step and
  its closed form; ``simulated_step``: the step by simulating the schedule.

Imports: ``planner.specs``, ``planner.schedule``, ``loom.profiles``
catalogues, ``loom.solvers.links``.
"""
