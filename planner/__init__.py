"""The domain, in rooms that follow the data (each may import only the rooms
above it in this list, never one below):

- ``specs/``: what the user gives and what it means: the model, the cluster
  and its topology, the job, a layout, its pipeline stages and the rules a
  layout must satisfy; reading spec files; the errors that map to exit codes.
- ``schedule/``: pipeline schedules as plain numbers: each stage's op order
  (what Megatron-Core runs) and the discrete-event simulator.
- ``cost/``: the cost model: kernel times, activation bytes, measured layers
  in their place, collectives and the links groups land on, memory per
  stage and the step time (closed form and simulated).
- ``plan.py``: a plan (one layout priced whole) and ``evaluate``.
- ``search/``: enumerating layouts, the pipeline split, rank placement, and
  the expert placement behind ``loom experts``.
- ``output/``: what loom writes: launch files (Megatron-LM, SLURM,
  DeepSpeed), the JSON report and its schema, CI gates.
- ``calibrate/``: learning from runs: a saved plan against its runs' logs
  and traces (``loom compare``), and the calibration fitted to them
  (``loom calibrate``).

``loom.profiles`` (catalogues, profilers, profile files) sits beside
``specs/``: specs read its catalogues and profile files, and the profilers
read the cost model's estimates. ``loom.solvers`` (integer programs over
plain numbers) imports nothing of the planner.
"""
