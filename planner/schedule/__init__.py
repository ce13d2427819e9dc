"""Pipeline schedules as plain numbers (seconds and bytes per chunk): each
stage's op order under GPipe, 1F1B, interleaved 1F1B (Megatron-Core's two)
and ZB-H1, and the discrete-event simulator that runs them.

Imports nothing of the planner: the cost model feeds it (cost/simulated_step.py)
and reads its op orders for the activations a stage holds (cost/memory.py).
"""
