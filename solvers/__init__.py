"""Integer programs over plain numbers (cost arrays, bandwidth matrices).

The pipeline-partition, rank-placement and expert-placement solvers land here;
``loom plan`` for dense models uses the uniform split Megatron runs by default.
"""
