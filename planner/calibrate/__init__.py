"""Learning from runs: a plan set against what its runs reported
(``compare``), and the bounded correction profile fitted to them (``fit``:
``loom calibrate``). Reads logs through ``loom.profiles.run_logs``; may import
specs, cost, plan, output (the report it compares) and profiles.
"""
