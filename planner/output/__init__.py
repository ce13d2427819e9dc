"""What loom writes: launch files (``launch``: Megatron-LM's ``train.sh``
(``megatron``), SLURM (``slurm``), DeepSpeed (``deepspeed``), torchtitan
(``torchtitan``), and the optimiser settings they share (``optimizer``)), the JSON
report and its schema (``report``), CI gates (``gates``), and writing a set
of files without half-written ones (``files``).

Imports: ``planner.plan`` and everything below it.
"""
